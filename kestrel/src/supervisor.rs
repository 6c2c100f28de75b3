//! The workload: started with its environment, sent the signals PID 1 receives, reaped along
//! with every orphan that ends up as PID 1's child.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::cmdline::Workload;

/// How long the workload has to exit after SIGTERM before it is killed.
const GRACE: Duration = volant_boot::WORKLOAD_GRACE;

/// Reaps every exited child; returns the exit code of `workload` if it was among them.
fn reap(workload: libc::pid_t) -> Option<i32> {
    let mut found = None;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status of a child it reaped into `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return found;
        }
        if pid == workload {
            found = Some(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            });
        }
    }
}

fn signal_group(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) on the workload's process group.
    unsafe { libc::kill(-pid, sig) };
}

/// A running workload and the signals PID 1 listens to.
pub struct Supervised {
    pid: libc::pid_t,
    child_exit: Signal,
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// Starts the workload. The signal handlers are installed first, so no exit can be missed.
pub fn start(w: &Workload, vm: Option<&str>) -> Result<Supervised, String> {
    let child_exit = signal(SignalKind::child()).map_err(|e| format!("SIGCHLD: {e}"))?;
    let term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;

    let mut cmd = std::process::Command::new(&w.entrypoint[0]);
    cmd.args(&w.entrypoint[1..])
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .current_dir(w.workdir.as_deref().unwrap_or("/"));
    if let Some(vm) = vm {
        cmd.env("VOLANT_VM", vm);
    }
    cmd.envs(&w.env);
    // SAFETY: setsid is async-signal-safe; the workload leads its own process group.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", w.entrypoint[0]))?;
    Ok(Supervised {
        pid: child.id() as libc::pid_t,
        child_exit,
        term,
        int,
        hup,
    })
}

impl Supervised {
    /// The workload's pid.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Supervises the workload until it exits; returns its exit code. SIGTERM, SIGINT
    /// (Ctrl-Alt-Del) and `shutdown` (the power button) ask it to stop, and it is killed after
    /// a grace period; SIGHUP is passed on. Orphans are reaped all along.
    pub async fn wait(mut self, shutdown: impl std::future::Future<Output = ()>) -> i32 {
        let pid = self.pid;
        let mut deadline: Option<tokio::time::Instant> = None;
        tokio::pin!(shutdown);
        let mut asked = false;
        loop {
            if let Some(code) = reap(pid) {
                return code;
            }
            let kill_at = deadline
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
            tokio::select! {
                _ = self.child_exit.recv() => {}
                _ = self.term.recv() => {
                    println!("kestrel: SIGTERM, stopping the workload");
                    signal_group(pid, libc::SIGTERM);
                    deadline.get_or_insert(tokio::time::Instant::now() + GRACE);
                }
                _ = self.int.recv() => {
                    println!("kestrel: shutdown requested, stopping the workload");
                    signal_group(pid, libc::SIGTERM);
                    deadline.get_or_insert(tokio::time::Instant::now() + GRACE);
                }
                () = &mut shutdown, if !asked => {
                    asked = true;
                    println!("kestrel: power button, stopping the workload");
                    signal_group(pid, libc::SIGTERM);
                    deadline.get_or_insert(tokio::time::Instant::now() + GRACE);
                }
                _ = self.hup.recv() => signal_group(pid, libc::SIGHUP),
                _ = tokio::time::sleep_until(kill_at), if deadline.is_some() => {
                    println!("kestrel: the workload ignored SIGTERM for {GRACE:?}; killing it");
                    signal_group(pid, libc::SIGKILL);
                    deadline = None;
                }
            }
        }
    }
}
