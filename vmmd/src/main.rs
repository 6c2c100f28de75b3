//! vmmd: the owner of plugins, VMs and their hypervisors.

mod accel;
mod boot;
mod cgroup;
mod driver;
mod error;
mod grpc;
mod guest;
mod initramfs;
mod jail;
mod logs;
mod manifest;
mod metrics;
mod peers;
mod process;
mod records;
mod states;
mod vmm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use volant_services::api::vmm::v1::vmm_server::VmmServer;
use volant_services::daemon::{self, Daemon, DaemonArgs, Services};

use crate::manifest::Hypervisor;

/// Volant's VM manager: plugins, VMs, their lifecycle and their hypervisors. It asks ipamd for
/// addresses and netd for TAPs, at unix:<run-dir>/<peer>.sock unless the config says otherwise.
#[derive(Parser)]
#[command(name = "vmmd", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// `name` found in PATH: the first that any user may execute (hypervisors run under uids of
/// their own), else the first.
fn which(name: &str) -> Option<PathBuf> {
    let found: Vec<PathBuf> = std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .filter(|p| p.is_file())
        .collect();
    found.iter().find(|p| public(p)).or(found.first()).cloned()
}

/// Whether every user may execute `path`: the file and every directory above it are open to
/// others.
fn public(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors().all(|p| {
        p.as_os_str().is_empty()
            || std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    })
}

/// The uids hypervisors run as; none when vmmd is not root (they then run as vmmd does).
fn jail(c: &volant_services::config::VmmdConfig) -> anyhow::Result<Option<jail::Jail>> {
    let range = c.hypervisor_uids.as_deref().unwrap_or(jail::DEFAULT_UIDS);
    let jail = jail::Jail::parse(range).map_err(anyhow::Error::msg)?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("vmmd is not root: hypervisors run as vmmd's own user, not one per VM");
        return Ok(None);
    }
    Ok(Some(jail))
}

/// Where VMs' cgroups go, unless the config turns limits off.
fn cgroups(c: &volant_services::config::VmmdConfig) -> anyhow::Result<Option<cgroup::Cgroups>> {
    if c.resource_limits == Some(false) {
        tracing::warn!("vmmd.resource_limits is false: VMs run without CPU, memory or pid limits");
        return Ok(None);
    }
    let name = c.cgroup.as_deref().unwrap_or("volant-vms");
    cgroup::check_name(name).map_err(anyhow::Error::msg)?;
    let groups = cgroup::Cgroups::discover(Path::new("/sys/fs/cgroup"), name).map_err(|e| {
        anyhow::anyhow!(
            "{e}: vmmd needs cgroups it may create (systemd: Delegate=yes) to limit its VMs, or \
             vmmd.resource_limits: false to run them unlimited"
        )
    })?;
    Ok(Some(groups))
}

/// How long a guest has to stop cleanly: by default kestrel's whole clean stop; a shorter
/// setting cuts the workload's grace short, which is allowed and said.
fn stop_timeout(secs: Option<u64>) -> Duration {
    let Some(secs) = secs else {
        return volant_boot::CLEAN_STOP;
    };
    let t = Duration::from_secs(secs);
    if t < volant_boot::CLEAN_STOP {
        tracing::warn!(
            "vmmd.stop_timeout_secs is {secs}: a workload that uses its {:?} of grace after \
             SIGTERM is cut off before the guest powers off cleanly ({:?} would let it)",
            volant_boot::WORKLOAD_GRACE,
            volant_boot::CLEAN_STOP
        );
    }
    t
}

fn settings(daemon: &Daemon) -> anyhow::Result<vmm::Settings> {
    let c = &daemon.config.vmmd;
    let hypervisor = match c.hypervisor.as_deref() {
        None | Some("auto") => None,
        Some("qemu") => Some(Hypervisor::Qemu),
        Some("cloud-hypervisor") => Some(Hypervisor::CloudHypervisor),
        Some(other) => anyhow::bail!(
            "config vmmd.hypervisor: {other:?} is neither qemu, cloud-hypervisor nor auto"
        ),
    };
    let qemu = c
        .qemu_binary
        .clone()
        .or_else(|| which("qemu-system-x86_64"))
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let cloud_hypervisor = c
        .cloud_hypervisor_binary
        .clone()
        .or_else(|| which("cloud-hypervisor"));
    let vsock_backend = c
        .vhost_device_vsock_binary
        .clone()
        .or_else(|| which("vhost-device-vsock"))
        .or_else(|| {
            let cargo = Path::new(&std::env::var_os("HOME")?).join(".cargo/bin/vhost-device-vsock");
            cargo.is_file().then_some(cargo)
        })
        .unwrap_or_else(|| "vhost-device-vsock".into());
    // SAFETY: geteuid cannot fail.
    let jailed = unsafe { libc::geteuid() } == 0;
    for (key, binary) in [
        ("qemu_binary", &qemu),
        ("vhost_device_vsock_binary", &vsock_backend),
    ]
    .into_iter()
    .chain(
        cloud_hypervisor
            .as_ref()
            .map(|b| ("cloud_hypervisor_binary", b)),
    ) {
        if jailed && binary.is_absolute() && binary.exists() && !public(binary) {
            tracing::warn!(
                "vmmd.{key}: {} cannot be run by the hypervisors' own uids (it, or a directory \
                 above it, is closed to other users), so VMs that need it will not start; \
                 install it where every user may run it, e.g. /usr/local/bin",
                binary.display()
            );
        }
    }
    Ok(vmm::Settings {
        vsock_backend,
        state_dir: daemon.state_dir.clone(),
        run_dir: daemon.run_dir.clone(),
        default_network: daemon.config.networking.bridge.name.clone(),
        dns: c
            .dns
            .clone()
            .unwrap_or_else(|| vec![[1, 1, 1, 1].into(), [8, 8, 8, 8].into()]),
        hypervisor,
        qemu,
        cloud_hypervisor,
        stop_timeout: stop_timeout(c.stop_timeout_secs),
        boot_timeout: Duration::from_secs(c.boot_timeout_secs.unwrap_or(120)),
        cgroups: cgroups(c)?,
        jail: jail(c)?,
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("vmmd", args.daemon)?;
    let c = &daemon.config.vmmd;
    let forced = match c.accel.as_deref() {
        None | Some("auto") => None,
        Some(a @ ("kvm" | "tcg")) => Some(a.to_string()),
        Some(other) => anyhow::bail!("config vmmd.accel: {other:?} is neither auto, kvm nor tcg"),
    };
    let cache = c
        .accel_cache
        .clone()
        .unwrap_or_else(|| daemon.state_dir.join("accel.json"));
    let settings = settings(&daemon)?;
    let drivers = driver::Drivers::of(&settings);
    let peers = peers::Grpc::new(
        daemon.dial_peer("ipamd")?,
        daemon.dial_peer("netd")?,
        daemon.dial_peer("proxyd")?,
    );
    let store = records::Store::open(&daemon.state_dir).map_err(anyhow::Error::msg)?;
    let vmm = Arc::new(
        vmm::Vmm::open(
            settings,
            store,
            Arc::new(peers),
            drivers,
            accel::Accel::new(forced, cache),
        )
        .map_err(anyhow::Error::msg)?,
    );
    vmm.reconcile_local().await;
    let every = c.reconcile_interval_secs.unwrap_or(30);
    anyhow::ensure!(
        every >= 1,
        "vmmd.reconcile_interval_secs is {every}; it must be at least 1"
    );
    tokio::spawn(vmm.clone().reconcile_forever(Duration::from_secs(every)));
    metrics::watch_vms(vmm.clone());
    let (state_dir, run_dir) = (daemon.state_dir.clone(), daemon.run_dir.clone());
    let paths = Box::new(move |name: &str| records::Paths::of(&state_dir, &run_dir, name));
    let service = VmmServer::new(grpc::VmmService::new(vmm, paths));
    daemon.serve(Services::default().with(service)).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("vmmd", || run(args))
}
