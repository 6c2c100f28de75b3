//! Hypervisor drivers behind one trait: QEMU (QMP) and Cloud Hypervisor (REST API).

pub mod cloud_hypervisor;
pub mod qemu;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::records::Paths;

/// The drivers vmmd has: QEMU always, Cloud Hypervisor when it is installed.
pub struct Drivers {
    /// QEMU.
    pub qemu: Box<dyn Driver>,
    /// Cloud Hypervisor.
    pub cloud_hypervisor: Option<Box<dyn Driver>>,
}

impl Drivers {
    /// The real drivers, of the binaries in `settings`.
    pub fn of(settings: &crate::vmm::Settings) -> Drivers {
        Drivers {
            qemu: Box::new(qemu::Qemu {
                binary: settings.qemu.clone(),
                vsock_backend: settings.vsock_backend.clone(),
            }),
            cloud_hypervisor: settings.cloud_hypervisor.clone().map(|binary| {
                Box::new(cloud_hypervisor::CloudHypervisor { binary }) as Box<dyn Driver>
            }),
        }
    }
}

/// A NIC: the TAP netd made and the guest's MAC.
pub struct Nic {
    /// TAP device.
    pub tap: String,
    /// Guest MAC.
    pub mac: String,
}

/// A vsock device: the guest's context id and the host end of its hybrid vsock.
pub struct Vsock {
    /// Context id (>= 3).
    pub cid: u32,
    /// `<run-dir>/vsock-<cid>.sock`.
    pub socket: PathBuf,
}

/// Everything a driver needs to start a VM.
pub struct LaunchSpec<'a> {
    /// VM name.
    pub name: &'a str,
    /// Kernel path.
    pub kernel: &'a str,
    /// Initramfs path.
    pub initramfs: &'a str,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// The NIC, in bridge mode.
    pub nic: Option<Nic>,
    /// The vsock device, in vsock mode.
    pub vsock: Option<Vsock>,
    /// Where its files go.
    pub paths: &'a Paths,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    /// The VM's open `cgroup.procs` files, which its processes join before they execute.
    pub cgroup: &'a [std::os::fd::RawFd],
    /// The identity its processes take before they execute; `None`: vmmd's own.
    pub identity: Option<&'a crate::jail::Identity>,
}

/// A started hypervisor.
pub struct Launched {
    /// Its process.
    pub child: tokio::process::Child,
    /// How long spawning the process took (the control plane's share ends here).
    pub spawned_in: Duration,
}

/// Starting, stopping and probing one kind of hypervisor.
#[tonic::async_trait]
pub trait Driver: Send + Sync {
    /// Starts the VM; returns once the hypervisor answers on its control socket.
    async fn launch(&self, spec: &LaunchSpec<'_>) -> Result<Launched, String>;
    /// Asks the guest to shut down cleanly.
    async fn request_shutdown(&self, api: &Path) -> Result<(), String>;
    /// Tells the hypervisor to stop at once.
    async fn force_stop(&self, api: &Path) -> Result<(), String>;
    /// Whether the hypervisor behind `api` answers.
    async fn ping(&self, api: &Path) -> Result<(), String>;
    /// Stops what the driver started beside the hypervisor (a vsock backend) once the
    /// hypervisor has exited or is being torn down. Idempotent.
    async fn release(&self, _paths: &Paths) {}
}

/// Spawns a hypervisor process: its own session (signals to vmmd do not reach it, and it
/// survives vmmd), in the VM's cgroup (`cgroup`: open `cgroup.procs` files), as the VM's
/// `identity`, `no_new_privs`
/// (nothing it executes can gain privileges: no setuid or file capabilities), stdout and
/// stderr appended to `log`.
pub fn spawn(
    binary: &Path,
    args: &[String],
    log: &Path,
    cgroup: &[std::os::fd::RawFd],
    identity: Option<&crate::jail::Identity>,
) -> Result<(tokio::process::Child, Duration), String> {
    let started = Instant::now();
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(false);
    let cgroup = cgroup.to_vec();
    let identity = identity.cloned();
    // SAFETY: setsid, write and prctl are async-signal-safe system calls, and nothing here
    // allocates.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            crate::cgroup::join(&cgroup)?;
            if let Some(id) = &identity {
                crate::jail::enter(id)?;
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    Ok((child, started.elapsed()))
}

/// The last lines of a hypervisor's log, for error messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Waits until `ready` succeeds, the process exits (an error with its log's tail) or `limit`
/// passes.
pub async fn wait_ready<F, Fut>(
    child: &mut tokio::process::Child,
    log: &Path,
    limit: Duration,
    mut ready: F,
) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the hypervisor exited ({status}): {}", tail(log)));
        }
        let last = match ready().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "the hypervisor did not answer within {limit:?} ({last}): {}",
                tail(log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Removes a stale socket (or lock) before a launch.
pub fn clear_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}
