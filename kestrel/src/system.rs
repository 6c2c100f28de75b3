//! What PID 1 does to the machine: file systems, kernel modules, host name, resolver, power.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a constant")
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /tmp and /run; already mounted is fine.
pub fn mount_all() -> io::Result<()> {
    let mounts = [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("devpts", "/dev/pts", "devpts"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
    ];
    for (source, target, fstype) in mounts {
        std::fs::create_dir_all(target)?;
        let (s, t, f) = (cstr(source), cstr(target), cstr(fstype));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
        match check(rc) {
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
                return Err(io::Error::new(e.kind(), format!("mounting {target}: {e}")));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Makes Ctrl-Alt-Del (which hypervisors send to ask for a clean shutdown) arrive as SIGINT
/// instead of an immediate reboot.
pub fn disable_ctrl_alt_del() {
    // SAFETY: reboot(2) with CAD_OFF only changes how the kernel handles the key combination.
    unsafe { libc::reboot(libc::RB_DISABLE_CAD) };
}

/// Loads the kernel modules listed in `list` (one path per line, in dependency order, relative
/// to `/lib/modules` unless absolute). A module already loaded or built in is fine.
pub fn load_modules(list: &Path) -> Result<Vec<String>, String> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(format!("reading {}: {e}", list.display())),
    };
    let mut loaded = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = if line.starts_with('/') {
            Path::new(line).to_path_buf()
        } else {
            Path::new("/lib/modules").join(line)
        };
        let file =
            std::fs::File::open(&path).map_err(|e| format!("module {}: {e}", path.display()))?;
        let params = cstr("");
        // SAFETY: finit_module reads the module from a valid open descriptor.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("loading {}: {e}", path.display()));
            }
        }
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or(line);
        loaded.push(name.trim_end_matches(".ko").to_string());
    }
    Ok(loaded)
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe a valid buffer.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Writes /etc/resolv.conf.
pub fn write_resolv(dns: &[Ipv4Addr]) -> io::Result<()> {
    std::fs::create_dir_all("/etc")?;
    let text: String = dns.iter().map(|ip| format!("nameserver {ip}\n")).collect();
    std::fs::write("/etc/resolv.conf", text)
}

/// Flushes the file systems and powers the machine off; the hypervisor then exits.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot(2) have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}
