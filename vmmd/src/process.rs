//! Hypervisor processes seen from outside: identity across restarts, exit, and discovery of
//! processes that a crash left unrecorded.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

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

/// A process held by a pidfd: its signals reach it, never a later process that reuses its pid,
/// and its exit can be awaited whoever its parent is.
pub struct Process {
    fd: OwnedFd,
    /// Its pid, for messages.
    pub pid: u32,
}

impl Process {
    /// Process `pid` if it runs and is the one that started at `start` (any, with `None`).
    /// Reads /proc: call it off the async threads ([`blocking`]).
    pub fn open(pid: u32, start: Option<u64>) -> Option<Process> {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd is open: a process that matches now is the one it holds.
        alive(pid, start).then_some(Process { fd, pid })
    }

    /// Sends SIGKILL.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal reads nothing through its null siginfo pointer.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Whether it has exited (its pidfd is readable then).
    pub fn has_exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut p, 1, 0) > 0 }
    }

    /// Waits until it exits.
    pub async fn exited(self) {
        // SAFETY: the pidfd is owned by the AsyncFd alone and never closed behind its back.
        match unsafe { AsyncFd::register(self.fd) } {
            Ok(afd) => {
                let _ = afd.readable().await;
            }
            Err(e) => {
                tracing::warn!(pid = self.pid, "waiting for a process: {e}");
            }
        }
    }
}

/// The processes one of whose arguments contains `needle`, held (a scan of /proc: call it off
/// the async threads, [`blocking`]).
pub fn find_by_arg(needle: &str) -> Vec<Process> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let start = start_time(pid)?;
            let p = Process::open(pid, Some(start))?;
            // Read again through the held process: its arguments, not a successor's.
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let named = args
                .split(|b| *b == 0)
                .any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_bytes()));
            (named && alive(pid, Some(start))).then_some(p)
        })
        .collect()
}

/// Runs `f` (file system or /proc work) on a thread for blocking work, not on the runtime's.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
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
