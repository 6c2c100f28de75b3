//! Hypervisor processes seen from outside: identity across restarts, exit, and discovery of
//! processes that a crash left unrecorded.

use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

/// The start time of process `pid` (clock ticks after boot, field 22 of /proc/PID/stat): with the
/// pid, it names one process even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether process `pid` still runs and is the one that started at `start`.
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    match (start_time(pid), start) {
        (Some(now), Some(then)) => now == then && !zombie(pid),
        (Some(_), None) => !zombie(pid),
        _ => false,
    }
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

/// The pids of processes one of whose arguments contains `needle`.
pub fn find_by_arg(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_bytes()))
            })
        })
        .filter(|pid| !zombie(*pid))
        .collect()
}

/// The identity of this boot of the host (or of the container vmmd runs in), kept in
/// `<run-dir>/host-boot`: the run directory lives in /run, which every boot starts empty, so the
/// file is made anew (from a fresh random id) once per boot. A VM launched under another boot
/// did not crash: the host restarted.
pub fn host_boot(run_dir: &std::path::Path) -> Option<String> {
    let file = run_dir.join("host-boot");
    if let Ok(id) = std::fs::read_to_string(&file) {
        return Some(id.trim().to_string());
    }
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid").ok()?;
    let tmp = run_dir.join("host-boot.tmp");
    std::fs::write(&tmp, &id).ok()?;
    // A racing writer's id wins as well as ours: both name this boot.
    std::fs::rename(&tmp, &file).ok()?;
    std::fs::read_to_string(&file)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Waits until process `pid` exits, whoever its parent is (a pidfd becomes readable then).
pub async fn exited(pid: u32) {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // Gone already.
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the pidfd is owned by the AsyncFd alone and never closed behind its back.
    match unsafe { AsyncFd::register(fd) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // Without a reactor registration, poll.
            while alive(pid, None) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
