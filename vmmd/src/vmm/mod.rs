//! VMs and plugins: the create/delete saga, the lifecycle, and reconciliation.
//!
//! Every state change is written to the store before the side effect it announces and made
//! durable before a reply. Operations on one VM are serialised; different VMs proceed in
//! parallel. A failed create undoes its steps in reverse (hypervisor, TAP, lease) and leaves the
//! VM `failed` with the reason; delete is idempotent, and with `force` removes whatever is left
//! even when a step fails.

mod create;
#[cfg(test)]
mod fakes;
mod forwards;
mod hypervisor;
mod lifecycle;
mod networks;
mod plugins;
mod reconcile;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, watch};
use tracing::Instrument;
use volant_services::api::vmm::v1 as pb;
use volant_services::durability::Durability;
use volant_services::validate::dns_label;

use crate::accel::Accel;
use crate::boot::{cmdline, workload_json};
use crate::cgroup::{Cgroups, Limits};
use crate::driver::{Driver, Drivers, LaunchSpec, Nic, Vsock};
use crate::error::{Error, Kind, Result};
use crate::guest;
use crate::initramfs;
use crate::jail::{self, Jail};
use crate::manifest::{Hypervisor, Manifest, Mode};
use crate::peers::{Forward, Peers};
use crate::process;
use crate::records::{Paths, Plugin, PortForward, Status as VmStatus, Store, VmRecord};
use crate::states::{self, Event};

/// How many locks the VMs' operations are spread over.
const VM_LOCKS: usize = 64;
/// How many creates, starts and deletes run at once; the rest wait their turn, so that a burst
/// of requests queues here instead of piling up calls on the peers until their deadlines pass.
const MAX_SAGAS: usize = 16;
/// How long a hypervisor may take to exit after it was told to stop.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How often a booting guest's console is read for `kestrel: ready`.
const BOOT_POLL: Duration = Duration::from_millis(100);

/// How vmmd runs VMs.
pub struct Settings {
    /// The state directory (store, VM logs).
    pub state_dir: PathBuf,
    /// The run directory (control sockets).
    pub run_dir: PathBuf,
    /// The network of `bridge` without a name.
    pub default_network: String,
    /// Name servers for guests.
    pub dns: Vec<IpAddr>,
    /// The configured hypervisor, if any.
    pub hypervisor: Option<Hypervisor>,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The Cloud Hypervisor binary, when installed.
    pub cloud_hypervisor: Option<PathBuf>,
    /// The vsock backend of QEMU.
    pub vsock_backend: PathBuf,
    /// How long a guest has to shut down cleanly.
    pub stop_timeout: Duration,
    /// How long a booting guest has to say it is ready.
    pub boot_timeout: Duration,
    /// Where each VM's cgroup goes; `None`: VMs run without limits.
    pub cgroups: Option<Cgroups>,
    /// The uids VMs' hypervisors run as; `None` when vmmd is not root (they run as vmmd).
    pub jail: Option<Jail>,
}

/// A request to create a VM, as received.
pub struct CreateRequest {
    /// Name.
    pub name: String,
    /// Plugin.
    pub plugin: String,
    /// vCPUs (0: the manifest's).
    pub cpu_cores: u32,
    /// MiB (0: the manifest's).
    pub memory_mb: u32,
    /// `""`, `bridge`, `bridge=<network>` or `vsock`.
    pub network: String,
    /// A fixed address.
    pub ip: String,
    /// Extra kernel command line.
    pub kernel_cmdline: String,
}

/// The VM manager.
pub struct Vmm {
    settings: Arc<Settings>,
    store: Arc<Store>,
    durability: Durability,
    peers: Arc<dyn Peers>,
    accel: Accel,
    drivers: Drivers,
    plugins: Mutex<BTreeMap<String, Plugin>>,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Per running hypervisor: becomes true when it has exited.
    exits: Mutex<HashMap<String, watch::Receiver<bool>>>,
    events: broadcast::Sender<pb::VmEvent>,
    /// Poked when a teardown left something behind at a peer, so reconciling comes early.
    dirty: tokio::sync::Notify,
    /// Network changes, one at a time.
    network_changes: tokio::sync::Mutex<()>,
    /// Turns for the sagas ([`MAX_SAGAS`]).
    sagas: tokio::sync::Semaphore,
    /// This boot of the host ([`process::host_boot`]).
    host_boot: Option<String>,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

fn store_err(e: String) -> Error {
    Error::internal(e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a hypervisor's exit is awaited: as vmmd's child, or held by a pidfd after a restart of
/// vmmd.
enum Waiter {
    Child(tokio::process::Child),
    Adopted(process::Process),
}

/// Moves record `r` by `event` through the table ([`states::next`]).
fn advance(r: &mut VmRecord, event: Event) -> Result<()> {
    r.status = states::next(r.status, event)
        .map_err(|e| Error::precondition(format!("vm {:?}: {e}", r.name)))?;
    Ok(())
}

/// The status as the API spells it.
pub fn status_pb(s: VmStatus) -> pb::VmStatus {
    match s {
        VmStatus::Creating => pb::VmStatus::Creating,
        VmStatus::Booting => pb::VmStatus::Booting,
        VmStatus::Running => pb::VmStatus::Running,
        VmStatus::Stopping => pb::VmStatus::Stopping,
        VmStatus::Stopped => pb::VmStatus::Stopped,
        VmStatus::Failed => pb::VmStatus::Failed,
        VmStatus::Deleting => pb::VmStatus::Deleting,
    }
}

/// A port forward as the API shows it.
pub fn forward_pb(f: &PortForward) -> pb::PortForward {
    pb::PortForward {
        host_port: f.host_port.into(),
        protocol: f.protocol.clone(),
        guest_port: f.guest_port.into(),
    }
}

/// A VM as the API shows it.
pub fn vm_pb(r: &VmRecord) -> pb::Vm {
    pb::Vm {
        name: r.name.clone(),
        status: status_pb(r.status).into(),
        plugin: r.plugin.clone(),
        hypervisor: r.hypervisor.as_str().into(),
        network_mode: r.mode.as_str().into(),
        network: r.network.clone(),
        ip_address: r.ip.map(|ip| ip.to_string()).unwrap_or_default(),
        mac_address: r.mac.clone(),
        tap_device: r.tap.clone(),
        vsock_cid: r.cid.unwrap_or_default(),
        vsock_socket: r.vsock_socket.clone(),
        pid: r.pid.map(i64::from).unwrap_or_default(),
        cpu_cores: r.cpu_cores,
        memory_mb: r.memory_mb,
        created_at: Some(r.created_at.into()),
        updated_at: Some(r.updated_at.into()),
        error: r.error.clone(),
        kernel_cmdline: r.kernel_cmdline.clone(),
        accel: r.accel.clone(),
        prefix_len: r.prefix_len.into(),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        http_port: r.manifest.workload.http_port().map_or(0, u32::from),
        port_forwards: r.forwards.iter().map(forward_pb).collect(),
    }
}

impl Vmm {
    /// Loads plugins and VMs. Needs the multi-threaded Tokio runtime.
    pub fn open(
        settings: Settings,
        store: Store,
        peers: Arc<dyn Peers>,
        drivers: Drivers,
        accel: Accel,
    ) -> std::result::Result<Vmm, String> {
        let store = Arc::new(store);
        let plugins = store
            .plugins()?
            .into_iter()
            .map(|p| (p.manifest.name.clone(), p))
            .collect();
        let vms = store
            .vms()?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let flushed = store.clone();
        let (events, _) = broadcast::channel(1024);
        let settings_run_dir = settings.run_dir.clone();
        Ok(Vmm {
            drivers,
            settings: Arc::new(settings),
            durability: Durability::new(Box::new(move || flushed.flush())),
            store,
            peers,
            accel,
            plugins: Mutex::new(plugins),
            vms: Mutex::new(vms),
            locks: (0..VM_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            dirty: tokio::sync::Notify::new(),
            sagas: tokio::sync::Semaphore::new(MAX_SAGAS),
            network_changes: tokio::sync::Mutex::new(()),
            exits: Mutex::new(HashMap::new()),
            events,
            host_boot: process::host_boot(&settings_run_dir),
        })
    }

    /// Waits for a saga's turn.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.sagas
            .acquire()
            .await
            .map_err(|_| Error::unavailable("vmmd is shutting down"))
    }

    fn vm_lock(&self, name: &str) -> &tokio::sync::Mutex<()> {
        let h = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        &self.locks[h % VM_LOCKS]
    }

    fn driver(&self, h: Hypervisor) -> Result<&dyn Driver> {
        match h {
            Hypervisor::Qemu => Ok(self.drivers.qemu.as_ref()),
            Hypervisor::CloudHypervisor => {
                self.drivers.cloud_hypervisor.as_deref().ok_or_else(|| {
                    Error::precondition(
                        "cloud-hypervisor is not installed; install it or use the qemu hypervisor",
                    )
                })
            }
        }
    }

    fn paths(&self, name: &str) -> Paths {
        Paths::of(&self.settings.state_dir, &self.settings.run_dir, name)
    }

    /// New events.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::VmEvent> {
        self.events.subscribe()
    }

    fn emit(&self, name: &str, previous: Option<VmStatus>, now: Option<&VmRecord>, at: SystemTime) {
        let event = pb::VmEvent {
            name: name.to_string(),
            status: now
                .map(|r| status_pb(r.status))
                .unwrap_or(pb::VmStatus::Unspecified)
                .into(),
            previous: previous
                .map(status_pb)
                .unwrap_or(pb::VmStatus::Unspecified)
                .into(),
            at: Some(at.into()),
            error: now.map(|r| r.error.clone()).unwrap_or_default(),
            vm: now.map(vm_pb),
            deleted: now.is_none(),
        };
        // No subscriber is fine.
        let _ = self.events.send(event);
    }

    /// Applies `f` to the stored record of `name` and writes it; returns the record and the
    /// write's sequence number. Emits an event when the status changed. Its status only moves
    /// by [`Vmm::transition`].
    fn update(&self, name: &str, f: impl FnOnce(&mut VmRecord)) -> Result<(VmRecord, u64)> {
        self.change(name, |r| {
            let status = r.status;
            f(r);
            debug_assert_eq!(status, r.status, "a status changed outside the table");
            Ok(())
        })
    }

    /// Moves VM `name` by `event` through the table ([`states::next`]) and applies `f`; an
    /// illegal transition changes nothing and is a precondition error.
    fn transition(
        &self,
        name: &str,
        event: Event,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<(VmRecord, u64)> {
        self.change(name, |r| {
            advance(r, event)?;
            f(r);
            Ok(())
        })
    }

    /// [`Vmm::transition`] of the VM whose hypervisor is `pid`: nothing when another one
    /// replaced it.
    fn transition_of(
        &self,
        name: &str,
        pid: u32,
        event: Event,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<(VmRecord, u64)> {
        self.change(name, |r| {
            if r.pid != Some(pid) {
                return Err(Error::precondition(format!(
                    "vm {name:?} has another hypervisor"
                )));
            }
            advance(r, event)?;
            f(r);
            Ok(())
        })
    }

    /// Applies `f` to the stored record of `name` and writes it, unless `f` fails.
    fn change(
        &self,
        name: &str,
        f: impl FnOnce(&mut VmRecord) -> Result<()>,
    ) -> Result<(VmRecord, u64)> {
        let mut vms = lock(&self.vms);
        let current = vms
            .get(name)
            .ok_or_else(|| Error::not_found(format!("vm {name:?} does not exist")))?;
        let mut next = current.clone();
        f(&mut next)?;
        next.updated_at = SystemTime::now();
        self.store.put_vm(&next).map_err(store_err)?;
        let seq = self.durability.record();
        let previous = current.status;
        vms.insert(name.to_string(), next.clone());
        drop(vms);
        if previous != next.status {
            self.emit(name, Some(previous), Some(&next), next.updated_at);
        }
        Ok((next, seq))
    }

    async fn durable(&self, seq: u64) {
        self.durability.wait(seq).await;
    }

    /// One VM.
    pub fn get(&self, name: &str) -> Result<VmRecord> {
        dns_label("vm name", name).map_err(invalid)?;
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("vm {name:?} does not exist")))
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<VmRecord> {
        lock(&self.vms).values().cloned().collect()
    }

    /// Every VM's status.
    pub fn statuses(&self) -> Vec<VmStatus> {
        lock(&self.vms).values().map(|r| r.status).collect()
    }
}
