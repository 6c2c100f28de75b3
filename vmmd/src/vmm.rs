//! VMs and plugins: the create/delete saga, the lifecycle, and reconciliation.
//!
//! Every state change is written to the store before the side effect it announces and made
//! durable before a reply. Operations on one VM are serialised; different VMs proceed in
//! parallel. A failed create undoes its steps in reverse (hypervisor, TAP, lease) and leaves the
//! VM `failed` with the reason; delete is idempotent, and with `force` removes whatever is left
//! even when a step fails.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, watch};
use tonic::{Code, Status};
use tracing::Instrument;
use volant_services::api::vmm::v1 as pb;
use volant_services::durability::Durability;
use volant_services::validate::dns_label;

use crate::accel::Accel;
use crate::boot::{cmdline, workload_json};
use crate::cgroup::{Cgroups, Limits};
use crate::driver::cloud_hypervisor::CloudHypervisor;
use crate::driver::qemu::Qemu;
use crate::driver::{Driver, LaunchSpec, Nic, Vsock};
use crate::guest;
use crate::initramfs;
use crate::jail::{self, Jail};
use crate::manifest::{Hypervisor, Manifest, Mode};
use crate::peers::Peers;
use crate::process;
use crate::records::{Paths, Plugin, Status as VmStatus, Store, VmRecord};

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
    settings: Settings,
    store: Arc<Store>,
    durability: Durability,
    peers: Peers,
    accel: Accel,
    qemu: Qemu,
    ch: Option<CloudHypervisor>,
    plugins: Mutex<BTreeMap<String, Plugin>>,
    vms: Mutex<BTreeMap<String, VmRecord>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Per running hypervisor: becomes true when it has exited.
    exits: Mutex<HashMap<String, watch::Receiver<bool>>>,
    events: broadcast::Sender<pb::VmEvent>,
    /// Poked when a teardown left something behind at a peer, so reconciling comes early.
    dirty: tokio::sync::Notify,
    /// Turns for the sagas ([`MAX_SAGAS`]).
    sagas: tokio::sync::Semaphore,
    /// This boot of the host ([`process::host_boot`]).
    host_boot: Option<String>,
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m)
}

fn store_err(e: String) -> Status {
    Status::internal(e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    }
}

impl Vmm {
    /// Loads plugins and VMs. Needs the multi-threaded Tokio runtime.
    pub fn open(
        settings: Settings,
        store: Store,
        peers: Peers,
        accel: Accel,
    ) -> Result<Vmm, String> {
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
            qemu: Qemu {
                binary: settings.qemu.clone(),
                vsock_backend: settings.vsock_backend.clone(),
            },
            ch: settings
                .cloud_hypervisor
                .clone()
                .map(|binary| CloudHypervisor { binary }),
            settings,
            durability: Durability::new(Box::new(move || flushed.flush())),
            store,
            peers,
            accel,
            plugins: Mutex::new(plugins),
            vms: Mutex::new(vms),
            locks: (0..VM_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
            dirty: tokio::sync::Notify::new(),
            sagas: tokio::sync::Semaphore::new(MAX_SAGAS),
            exits: Mutex::new(HashMap::new()),
            events,
            host_boot: process::host_boot(&settings_run_dir),
        })
    }

    /// Waits for a saga's turn.
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.sagas
            .acquire()
            .await
            .map_err(|_| Status::unavailable("vmmd is shutting down"))
    }

    fn vm_lock(&self, name: &str) -> &tokio::sync::Mutex<()> {
        let h = name
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        &self.locks[h % VM_LOCKS]
    }

    fn driver(&self, h: Hypervisor) -> Result<&dyn Driver, Status> {
        match h {
            Hypervisor::Qemu => Ok(&self.qemu),
            Hypervisor::CloudHypervisor => {
                self.ch.as_ref().map(|c| c as &dyn Driver).ok_or_else(|| {
                    Status::failed_precondition(
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
    /// write's sequence number. Emits an event when the status changed.
    fn update(&self, name: &str, f: impl FnOnce(&mut VmRecord)) -> Result<(VmRecord, u64), Status> {
        let mut vms = lock(&self.vms);
        let current = vms
            .get(name)
            .ok_or_else(|| Status::not_found(format!("vm {name:?} does not exist")))?;
        let mut next = current.clone();
        f(&mut next);
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
    pub fn get(&self, name: &str) -> Result<VmRecord, Status> {
        dns_label("vm name", name).map_err(invalid)?;
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("vm {name:?} does not exist")))
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<VmRecord> {
        lock(&self.vms).values().cloned().collect()
    }

    // Plugins.

    /// Installs (or replaces) a plugin. Returns it and whether it is new.
    pub async fn install_plugin(&self, json: &str) -> Result<(Plugin, bool), Status> {
        let manifest = Manifest::parse(json).map_err(invalid)?;
        let plugin = Plugin {
            manifest,
            installed_at: SystemTime::now(),
        };
        let (created, seq) = {
            let mut plugins = lock(&self.plugins);
            self.store.put_plugin(&plugin).map_err(store_err)?;
            let seq = self.durability.record();
            let created = plugins
                .insert(plugin.manifest.name.clone(), plugin.clone())
                .is_none();
            (created, seq)
        };
        self.durable(seq).await;
        Ok((plugin, created))
    }

    /// One plugin.
    pub fn plugin(&self, name: &str) -> Result<Plugin, Status> {
        dns_label("plugin name", name).map_err(invalid)?;
        lock(&self.plugins).get(name).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "plugin {name:?} is not installed; install it with its manifest first"
            ))
        })
    }

    /// Every plugin.
    pub fn plugins(&self) -> Vec<Plugin> {
        lock(&self.plugins).values().cloned().collect()
    }

    /// Removes a plugin no VM was created from; returns whether it was installed.
    pub async fn remove_plugin(&self, name: &str) -> Result<bool, Status> {
        dns_label("plugin name", name).map_err(invalid)?;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| v.plugin == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "plugin {name:?} is used by vm(s) {}; delete them first",
                users.join(", ")
            )));
        }
        let seq = {
            let mut plugins = lock(&self.plugins);
            if plugins.remove(name).is_none() {
                return Ok(false);
            }
            self.store.delete_plugin(name).map_err(store_err)?;
            self.durability.record()
        };
        self.durable(seq).await;
        Ok(true)
    }

    // VMs.

    /// Creates a VM and starts it; see the module documentation.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<VmRecord, Status> {
        let started = Instant::now();
        dns_label("vm name", &req.name).map_err(invalid)?;
        let plugin = self.plugin(&req.plugin)?;
        let m = plugin.manifest;
        let (mode, network) = match req.network.trim() {
            "" => (m.networking.mode, self.settings.default_network.clone()),
            "bridge" => (Mode::Bridge, self.settings.default_network.clone()),
            "vsock" => (Mode::Vsock, String::new()),
            other => match other.strip_prefix("bridge=") {
                Some(net) => {
                    dns_label("network", net).map_err(invalid)?;
                    (Mode::Bridge, net.to_string())
                }
                None => {
                    return Err(invalid(format!(
                        "network {other:?}: use bridge, bridge=<network> or vsock"
                    )));
                }
            },
        };
        if mode == Mode::Vsock && !req.ip.trim().is_empty() {
            return Err(invalid(
                "ip: a vsock VM has no network device and so no address",
            ));
        }
        let requested_ip = match req.ip.trim() {
            "" => None,
            ip => Some(
                ip.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("ip {ip:?} is not an IP address")))?,
            ),
        };
        let cpu_cores = if req.cpu_cores == 0 {
            m.resources.cpu_cores
        } else {
            req.cpu_cores
        };
        let memory_mb = if req.memory_mb == 0 {
            m.resources.memory_mb
        } else {
            req.memory_mb
        };
        if !(1..=64).contains(&cpu_cores) {
            return Err(invalid(format!(
                "cpu_cores {cpu_cores} is out of range 1–64"
            )));
        }
        if !(64..=65536).contains(&memory_mb) {
            return Err(invalid(format!(
                "memory_mb {memory_mb} is out of range 64–65536"
            )));
        }
        if req.kernel_cmdline.len() > 512 {
            return Err(invalid("kernel_cmdline is longer than 512 bytes"));
        }
        volant_boot::check_user_text(&req.kernel_cmdline)
            .map_err(|e| invalid(format!("kernel_cmdline: {e}")))?;
        let hypervisor = match m.hypervisor.or(self.settings.hypervisor) {
            Some(h) => h,
            None => self.auto_hypervisor(&m).await,
        };
        self.driver(hypervisor)?;

        let _turn = self.turn().await?;
        let _vm = self.vm_lock(&req.name).lock().await;
        let now = SystemTime::now();
        let record = VmRecord {
            name: req.name.clone(),
            plugin: req.plugin.clone(),
            manifest: m,
            status: VmStatus::Creating,
            error: String::new(),
            hypervisor,
            accel: String::new(),
            mode,
            network,
            requested_ip,
            ip: None,
            prefix_len: 0,
            gateway: None,
            mac: String::new(),
            tap: String::new(),
            cid: None,
            vsock_socket: String::new(),
            uid: None,
            cpu_cores,
            memory_mb,
            extra_cmdline: req.kernel_cmdline.trim().to_string(),
            kernel_cmdline: String::new(),
            pid: None,
            pid_start: None,
            boot_started: None,
            host_boot: None,
            created_at: now,
            updated_at: now,
        };
        cmdline(&record, &self.settings.dns).map_err(invalid)?;
        let mut record = record;
        let recorded = async {
            let seq = {
                let mut vms = lock(&self.vms);
                if vms.contains_key(&req.name) {
                    return Err(Status::already_exists(format!(
                        "vm {:?} already exists; delete it first or choose another name",
                        req.name
                    )));
                }
                if mode == Mode::Vsock {
                    // The lowest context id no VM holds; 0–2 belong to the hypervisor and host.
                    let taken: std::collections::HashSet<u32> =
                        vms.values().filter_map(|v| v.cid).collect();
                    let cid = (3..u32::MAX).find(|c| !taken.contains(c));
                    record.cid = cid;
                    record.vsock_socket = cid
                        .map(|_| self.paths(&req.name).vsock.display().to_string())
                        .unwrap_or_default();
                }
                self.store.put_vm(&record).map_err(store_err)?;
                vms.insert(req.name.clone(), record.clone());
                self.durability.record()
            };
            self.durable(seq).await;
            Ok(())
        };
        recorded
            .instrument(tracing::info_span!("vm.record", vm = %req.name))
            .await?;
        self.emit(&req.name, None, Some(&record), now);

        match self.bring_up(&req.name).await {
            Ok(rec) => {
                tracing::info!(
                    vm = %rec.name,
                    ip = ?rec.ip,
                    pid = ?rec.pid,
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "vm created"
                );
                Ok(rec)
            }
            Err(e) => {
                let why = e.message().to_string();
                let leftover = self.tear_down(&req.name, false).await;
                // Refused by a peer before the hypervisor started (no pool, pool full, unknown
                // network, address taken, a peer down), with everything undone: no record, so
                // that the same create succeeds once the cause is fixed. A hypervisor that could
                // not start keeps a failed VM that says why.
                let refused = matches!(
                    e.code(),
                    Code::NotFound
                        | Code::ResourceExhausted
                        | Code::InvalidArgument
                        | Code::AlreadyExists
                        | Code::Unavailable
                );
                if refused && leftover.is_none() {
                    self.forget(&req.name).await?;
                    return Err(Status::new(
                        e.code(),
                        format!("{why}; nothing of vm {:?} was kept", req.name),
                    ));
                }
                let (_, seq) = self.update(&req.name, |r| {
                    r.status = VmStatus::Failed;
                    r.error = why.clone();
                })?;
                self.durable(seq).await;
                Err(e)
            }
        }
    }

    /// `hypervisor: auto`: Cloud Hypervisor when it is installed and boots this kernel here,
    /// else QEMU.
    async fn auto_hypervisor(&self, m: &Manifest) -> Hypervisor {
        let Some(ch) = &self.settings.cloud_hypervisor else {
            return Hypervisor::Qemu;
        };
        let (kernel, initramfs) = (&m.boot.kernel, &m.boot.initramfs);
        if self
            .accel
            .cloud_hypervisor_boots(ch, kernel, initramfs)
            .await
        {
            Hypervisor::CloudHypervisor
        } else {
            Hypervisor::Qemu
        }
    }

    /// Takes a created or stopped VM to running: address, TAP, hypervisor. On failure the
    /// caller undoes what was done.
    async fn bring_up(self: &Arc<Self>, name: &str) -> Result<VmRecord, Status> {
        self.prepare_jail(name).await?;
        let rec = self.get(name)?;
        if rec.mode == Mode::Vsock {
            self.peers
                .register_route(self.route(&rec)?)
                .instrument(tracing::info_span!("proxyd.register", vm = %name))
                .await?;
        }
        if rec.mode == Mode::Bridge {
            let lease = self
                .peers
                .allocate(&rec.network, name, rec.requested_ip)
                .instrument(
                    tracing::info_span!("ipamd.allocate", vm = %name, network = %rec.network),
                )
                .await
                .map_err(|s| match s.code() {
                    Code::NotFound => Status::not_found(format!(
                        "network {:?} has no address pool: {}",
                        rec.network,
                        s.message()
                    )),
                    _ => s,
                })?;
            let (tap, mac) = self
                .peers
                .create_tap(&rec.network, name, lease.ip, rec.uid.unwrap_or(0))
                .instrument(
                    tracing::info_span!("netd.create_tap", vm = %name, network = %rec.network),
                )
                .await?;
            self.update(name, |r| {
                r.ip = Some(lease.ip);
                r.prefix_len = lease.prefix_len;
                r.gateway = Some(lease.gateway);
                r.tap = tap;
                r.mac = mac;
            })?;
        }
        self.launch(name).await
    }

    /// Gives VM `name` its uid (the lowest of the range no other VM holds, kept from then on)
    /// and its directory in the run directory, owned by that uid. A record made before VM
    /// directories existed has its vsock socket moved into its directory.
    async fn prepare_jail(&self, name: &str) -> Result<(), Status> {
        let paths = self.paths(name);
        let vsock = paths.vsock.display().to_string();
        let (uid, seq) = {
            let mut vms = lock(&self.vms);
            let taken: std::collections::HashSet<u32> = vms
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .filter_map(|(_, r)| r.uid)
                .collect();
            let rec = vms
                .get_mut(name)
                .ok_or_else(|| Status::not_found(format!("vm {name:?} is gone")))?;
            let mut changed = false;
            if rec.cid.is_some() && rec.vsock_socket != vsock {
                rec.vsock_socket = vsock;
                changed = true;
            }
            if let Some(jail) = &self.settings.jail
                && !rec.uid.is_some_and(|u| jail.holds(u))
            {
                rec.uid = Some(jail.free_uid(&taken).ok_or_else(|| {
                    Status::resource_exhausted(
                        "every uid of vmmd.hypervisor_uids is taken: widen the range",
                    )
                })?);
                changed = true;
            }
            if changed {
                self.store.put_vm(rec).map_err(store_err)?;
            }
            (rec.uid, changed.then(|| self.durability.record()))
        };
        if let Some(seq) = seq {
            self.durable(seq).await;
        }
        let parent = paths.jail.parent().expect("a VM directory has a parent");
        std::fs::create_dir_all(parent)
            .map_err(|e| Status::internal(format!("creating {}: {e}", parent.display())))?;
        match (&self.settings.jail, uid) {
            (Some(_), Some(uid)) => jail::own_dir(&paths.jail, uid).map_err(Status::internal),
            _ => std::fs::create_dir_all(&paths.jail)
                .map_err(|e| Status::internal(format!("creating {}: {e}", paths.jail.display()))),
        }
    }

    /// The proxyd route of a vsock VM.
    fn route(&self, rec: &VmRecord) -> Result<volant_services::api::proxy::v1::Route, Status> {
        use volant_services::api::proxy::v1 as proxy;
        let cid = rec
            .cid
            .ok_or_else(|| Status::internal(format!("vsock vm {:?} has no cid", rec.name)))?;
        let p = rec.manifest.networking.proxy.clone();
        let rate = p.as_ref().and_then(|p| p.rate_limit.clone());
        Ok(proxy::Route {
            vm: rec.name.clone(),
            cid,
            socket: rec.vsock_socket.clone(),
            ingress_port: p.as_ref().map_or(8080, |p| p.port.into()),
            egress: Some(proxy::EgressPolicy {
                allow_outbound: p.as_ref().is_some_and(|p| p.allow_outbound),
                allowed_ports: p
                    .as_ref()
                    .map(|p| p.allowed_ports.iter().map(|&port| port.into()).collect())
                    .unwrap_or_default(),
                allowed_domains: p.map(|p| p.allowed_domains).unwrap_or_default(),
                requests_per_second: rate.as_ref().map_or(0, |r| r.requests_per_second),
                burst: rate.as_ref().map_or(0, |r| r.burst),
                bytes_per_second: rate.and_then(|r| r.bytes_per_second).unwrap_or(0),
            }),
            egress_socket: String::new(),
            ingress_disabled: rec
                .manifest
                .networking
                .proxy
                .as_ref()
                .is_some_and(|p| !p.enabled),
        })
    }

    /// Starts the hypervisor of a VM whose resources are in place.
    async fn launch(self: &Arc<Self>, name: &str) -> Result<VmRecord, Status> {
        let rec = self.get(name)?;
        let driver = self.driver(rec.hypervisor)?;
        let prepare = tracing::info_span!("vm.prepare", vm = %name);
        let line = cmdline(&rec, &self.settings.dns).map_err(invalid)?;
        let accel = match rec.hypervisor {
            Hypervisor::Qemu => {
                self.accel
                    .choose(
                        &self.settings.qemu,
                        &rec.manifest.boot.kernel,
                        &rec.manifest.boot.initramfs,
                    )
                    .await
            }
            Hypervisor::CloudHypervisor => "kvm".to_string(),
        };
        let paths = self.paths(name);
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| Status::internal(format!("creating {}: {e}", paths.dir.display())))?;
        guest::rotate(&paths);
        let (base, workload, composed) = (
            rec.manifest.boot.initramfs.clone(),
            workload_json(&rec.manifest),
            paths.initramfs.clone(),
        );
        tokio::task::spawn_blocking(move || {
            initramfs::compose(base.as_ref(), &workload, &composed)
        })
        .await
        .map_err(|e| Status::internal(format!("initramfs task: {e}")))?
        .map_err(Status::failed_precondition)?;
        let identity = match (&self.settings.jail, rec.uid) {
            (Some(jail), Some(uid)) => {
                jail::own_file(&paths.initramfs, uid, 0o400).map_err(Status::internal)?;
                jail::own_file(&paths.serial, uid, 0o640).map_err(Status::internal)?;
                Some(jail.identity(uid))
            }
            _ => None,
        };
        if let Some(cid) = rec.cid {
            let link = paths.vsock_link(cid);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&paths.vsock, &link)
                .map_err(|e| Status::internal(format!("linking {}: {e}", link.display())))?;
        }
        let initramfs = paths.initramfs.display().to_string();
        let limits = Limits {
            cpus: rec.cpu_cores,
            memory_mb: rec.memory_mb,
        };
        let procs = match &self.settings.cgroups {
            Some(groups) => groups.prepare(name, limits).map_err(Status::internal)?,
            None => Vec::new(),
        };
        let cgroup: Vec<std::os::fd::RawFd> =
            procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let (_, seq) = self.update(name, |r| {
            r.kernel_cmdline = line.clone();
            r.accel = accel.clone();
        })?;
        self.durable(seq).instrument(prepare).await;
        let spec = LaunchSpec {
            name,
            kernel: &rec.manifest.boot.kernel,
            initramfs: &initramfs,
            cmdline: &line,
            cpus: rec.cpu_cores,
            memory_mb: rec.memory_mb,
            nic: (rec.mode == Mode::Bridge).then(|| Nic {
                tap: rec.tap.clone(),
                mac: rec.mac.clone(),
            }),
            vsock: rec.cid.map(|cid| Vsock {
                cid,
                socket: rec.vsock_socket.clone().into(),
            }),
            paths: &paths,
            accel: &accel,
            cgroup: &cgroup,
            identity: identity.as_ref(),
        };
        let launched = driver
            .launch(&spec)
            .instrument(tracing::info_span!(
                "hypervisor.launch",
                vm = %name,
                hypervisor = rec.hypervisor.as_str(),
                accel = %accel
            ))
            .await
            .map_err(|e| Status::failed_precondition(format!("the VM could not start: {e}")))?;
        let pid = launched.child.id().unwrap_or_default();
        let (rec, seq) = self.update(name, |r| {
            r.status = VmStatus::Booting;
            r.error.clear();
            r.pid = Some(pid);
            r.pid_start = process::start_time(pid);
            r.boot_started = Some(SystemTime::now());
            r.host_boot = self.host_boot.clone();
        })?;
        self.watch_exit(name, pid, Some(launched.child));
        self.watch_boot(name, pid);
        self.durable(seq)
            .instrument(tracing::info_span!("vm.booting", vm = %name))
            .await;
        tracing::debug!(vm = %name, spawn_us = launched.spawned_in.as_micros() as u64, "hypervisor spawned");
        Ok(rec)
    }

    /// Follows the hypervisor `pid` of VM `name` until it exits, then removes what it left in
    /// the run directory. A VM that was booting or running is then `stopped` (its guest was ready
    /// and powered off cleanly) or `failed` with the reason, whoever started the hypervisor; a VM
    /// being stopped or deleted is left to that.
    fn watch_exit(self: &Arc<Self>, name: &str, pid: u32, child: Option<tokio::process::Child>) {
        let (tx, rx) = watch::channel(false);
        lock(&self.exits).insert(name.to_string(), rx);
        let vmm = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let status = match child {
                Some(mut child) => child.wait().await.ok(),
                None => {
                    process::exited(pid).await;
                    None
                }
            };
            let paths = vmm.paths(&name);
            if let Ok(rec) = vmm.get(&name) {
                if let Ok(driver) = vmm.driver(rec.hypervisor) {
                    driver.release(&paths).await;
                }
                vmm.clear_run_files(&rec);
            }
            let _ = tx.send(true);
            let was = vmm.get(&name).map(|r| r.status).ok();
            let result = vmm.update(&name, |r| {
                if r.pid != Some(pid) {
                    return;
                }
                if matches!(r.status, VmStatus::Booting | VmStatus::Running) {
                    let (next, why) = guest::ended(&paths, r.status, status);
                    r.status = next;
                    r.error = why;
                }
                r.pid = None;
                r.pid_start = None;
            });
            if let Ok((rec, seq)) = result {
                if rec.status == VmStatus::Failed && was != Some(VmStatus::Failed) {
                    tracing::warn!(vm = %name, "the VM failed: {}", rec.error);
                }
                vmm.durable(seq).await;
            }
        });
    }

    /// Follows the console of VM `name`'s boot by hypervisor `pid`: `running` once kestrel says
    /// it is ready; `failed` (and the hypervisor stopped) when the boot deadline passes first.
    /// The hypervisor's exit is [`Vmm::watch_exit`]'s.
    fn watch_boot(self: &Arc<Self>, name: &str, pid: u32) {
        let vmm = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let paths = vmm.paths(&name);
            let mut seen = 0u64;
            loop {
                let Ok(rec) = vmm.get(&name) else { return };
                if rec.status != VmStatus::Booting || rec.pid != Some(pid) {
                    return;
                }
                if guest::said_ready(&paths.serial, &mut seen) {
                    if let Ok((_, seq)) = vmm.update(&name, |r| {
                        if r.status == VmStatus::Booting && r.pid == Some(pid) {
                            r.status = VmStatus::Running;
                        }
                    }) {
                        vmm.durable(seq).await;
                    }
                    return;
                }
                let started = rec.boot_started.unwrap_or(rec.updated_at);
                let waited = started.elapsed().unwrap_or_default();
                if waited >= vmm.settings.boot_timeout {
                    let why = format!(
                        "the guest did not say it was ready within {:?}; its console ends: {}",
                        vmm.settings.boot_timeout,
                        guest::last_lines(&paths, 3)
                    );
                    tracing::warn!(vm = %name, "{why}");
                    if let Ok((rec, seq)) = vmm.update(&name, |r| {
                        if r.status == VmStatus::Booting && r.pid == Some(pid) {
                            r.status = VmStatus::Failed;
                            r.error = why.clone();
                        }
                    }) {
                        vmm.durable(seq).await;
                        if rec.status == VmStatus::Failed {
                            vmm.stop_hypervisor(&rec, false).await;
                        }
                    }
                    return;
                }
                tokio::time::sleep(BOOT_POLL).await;
            }
        });
    }

    /// Removes what a VM's hypervisor leaves in the run directory when it ends: its control
    /// socket and Cloud Hypervisor's lock beside it, and the host end of its vsock (Cloud
    /// Hypervisor binds it at boot and leaves it; a leftover makes the next boot fail).
    fn clear_run_files(&self, rec: &VmRecord) {
        let paths = self.paths(&rec.name);
        for f in [&paths.api_socket, &paths.api_lock, &paths.vhost_socket] {
            let _ = std::fs::remove_file(f);
        }
        if !rec.vsock_socket.is_empty() {
            let _ = std::fs::remove_file(&rec.vsock_socket);
        }
        if let Some(cid) = rec.cid {
            let _ = std::fs::remove_file(paths.vsock_link(cid));
        }
        self.remove_cgroup(&rec.name);
    }

    /// Removes the cgroups of VMs that have no hypervisor (or no record) any more.
    fn sweep_cgroups(&self) {
        let Some(groups) = &self.settings.cgroups else {
            return;
        };
        for name in groups.vms() {
            let running = self.get(&name).is_ok_and(|r| r.pid.is_some());
            if !running {
                self.remove_cgroup(&name);
            }
        }
    }

    /// Removes VM `name`'s cgroup; one still in use stays for the next reconciliation.
    fn remove_cgroup(&self, name: &str) {
        if let Some(groups) = &self.settings.cgroups
            && let Err(e) = groups.remove(name)
        {
            tracing::debug!(vm = %name, "{e}; the next reconciliation retries");
        }
    }

    /// Waits up to `limit` for the hypervisor of `name` to exit; returns whether it did.
    async fn exited(&self, name: &str, limit: Duration) -> bool {
        let rx = lock(&self.exits).get(name).cloned();
        let Some(mut rx) = rx else {
            return true;
        };
        tokio::time::timeout(limit, rx.wait_for(|done| *done))
            .await
            .is_ok()
    }

    /// Stops the hypervisor of `rec`: a clean shutdown request when `graceful`, then the
    /// hypervisor's own stop, then SIGKILL.
    async fn stop_hypervisor(&self, rec: &VmRecord, graceful: bool) {
        let Some(pid) = rec.pid else { return };
        if !process::alive(pid, rec.pid_start) {
            return;
        }
        let api = self.paths(&rec.name).api_socket;
        let Ok(driver) = self.driver(rec.hypervisor) else {
            process::signal(pid, libc::SIGKILL);
            return;
        };
        if graceful {
            match driver.request_shutdown(&api).await {
                Ok(()) if self.exited(&rec.name, self.settings.stop_timeout).await => return,
                Ok(()) => tracing::warn!(vm = %rec.name, "the guest did not shut down in time"),
                Err(e) => tracing::warn!(vm = %rec.name, "asking the guest to shut down: {e}"),
            }
        }
        if let Err(e) = driver.force_stop(&api).await {
            tracing::warn!(vm = %rec.name, "stopping the hypervisor: {e}");
        }
        if !self.exited(&rec.name, KILL_GRACE).await && process::alive(pid, rec.pid_start) {
            process::signal(pid, libc::SIGKILL);
            self.exited(&rec.name, KILL_GRACE).await;
        }
    }

    /// Undoes a VM's resources in reverse: hypervisor, port forwards and TAP, lease. Returns the
    /// first failure; with `keep_going` every step is attempted anyway.
    async fn tear_down(&self, name: &str, keep_going: bool) -> Option<Status> {
        let Ok(rec) = self.get(name) else { return None };
        self.stop_hypervisor(&rec, false).await;
        // A hypervisor started but not yet recorded (a crash mid-launch) is found by its socket.
        let api = self.paths(name).api_socket;
        for pid in process::find_by_arg(&api.display().to_string()) {
            process::signal(pid, libc::SIGKILL);
        }
        if let Ok(driver) = self.driver(rec.hypervisor) {
            driver.release(&self.paths(name)).await;
        }
        self.clear_run_files(&rec);
        let mut first = None;
        if rec.mode == Mode::Vsock
            && let Err(e) = self.peers.unregister_route(name).await
        {
            tracing::warn!(vm = %name, "tearing down: {}", e.message());
            first = Some(e);
        }
        if rec.mode == Mode::Bridge && (first.is_none() || keep_going) {
            let steps = [
                self.peers.remove_forwards(name).await,
                self.peers.delete_tap(name).await,
                self.peers.release_vm(name).await,
            ];
            for step in steps {
                if let Err(e) = step {
                    tracing::warn!(vm = %name, "tearing down: {}", e.message());
                    first.get_or_insert(e);
                    if !keep_going {
                        break;
                    }
                }
            }
        }
        if first.is_some() {
            self.dirty.notify_one();
        }
        let _ = self.update(name, |r| {
            r.pid = None;
            r.pid_start = None;
            if first.is_none() {
                r.ip = None;
                r.tap.clear();
                r.mac.clear();
            }
        });
        first
    }

    /// Deletes a VM; returns whether it existed.
    pub async fn delete(&self, name: &str, force: bool) -> Result<bool, Status> {
        dns_label("vm name", name).map_err(invalid)?;
        let _turn = self.turn().await?;
        let _vm = self.vm_lock(name).lock().await;
        if !lock(&self.vms).contains_key(name) {
            return Ok(false);
        }
        let (_, seq) = self.update(name, |r| r.status = VmStatus::Deleting)?;
        self.durable(seq).await;
        if let Some(e) = self.tear_down(name, force).await
            && !force
        {
            let (_, seq) = self.update(name, |r| r.error = e.message().to_string())?;
            self.durable(seq).await;
            return Err(Status::new(
                e.code(),
                format!(
                    "deleting vm {name:?}: {}; retry, or delete with force",
                    e.message()
                ),
            ));
        }
        self.forget(name).await?;
        Ok(true)
    }

    /// Removes VM `name`'s record and its files, once nothing else of it is left.
    async fn forget(&self, name: &str) -> Result<(), Status> {
        let seq = {
            let mut vms = lock(&self.vms);
            self.store.delete_vm(name).map_err(store_err)?;
            let seq = self.durability.record();
            let previous = vms.remove(name).map(|r| r.status);
            drop(vms);
            self.emit(name, previous, None, SystemTime::now());
            seq
        };
        lock(&self.exits).remove(name);
        let _ = std::fs::remove_dir_all(self.paths(name).dir);
        let _ = std::fs::remove_dir_all(self.paths(name).jail);
        self.remove_cgroup(name);
        self.durable(seq).await;
        Ok(())
    }

    /// Starts a stopped or failed VM (running is fine too).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmRecord, Status> {
        let _turn = self.turn().await?;
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        match rec.status {
            VmStatus::Running | VmStatus::Booting => return Ok(rec),
            VmStatus::Stopped | VmStatus::Failed => {}
            s => {
                return Err(Status::failed_precondition(format!(
                    "vm {name:?} is {}; wait until it is running, stopped or failed",
                    s.as_str()
                )));
            }
        }
        match self.bring_up(name).await {
            Ok(rec) => Ok(rec),
            Err(e) => {
                let (_, seq) = self.update(name, |r| {
                    r.status = VmStatus::Failed;
                    r.error = e.message().to_string();
                })?;
                self.durable(seq).await;
                Err(e)
            }
        }
    }

    /// Stops a booting or running VM cleanly (a stopped one is fine): the guest is asked to
    /// power off, and its hypervisor stopped when it does not in time. It keeps its address and
    /// TAP.
    pub async fn stop(&self, name: &str) -> Result<VmRecord, Status> {
        let _vm = self.vm_lock(name).lock().await;
        let rec = self.get(name)?;
        match rec.status {
            VmStatus::Stopped | VmStatus::Failed => return Ok(rec),
            VmStatus::Running | VmStatus::Booting | VmStatus::Stopping => {}
            s => {
                return Err(Status::failed_precondition(format!(
                    "vm {name:?} is {}; it cannot be stopped now",
                    s.as_str()
                )));
            }
        }
        let (rec, seq) = self.update(name, |r| r.status = VmStatus::Stopping)?;
        self.durable(seq).await;
        self.stop_hypervisor(&rec, true).await;
        self.finish_stop(name).await
    }

    /// A VM whose hypervisor was stopped is `stopped`.
    async fn finish_stop(&self, name: &str) -> Result<VmRecord, Status> {
        let (rec, seq) = self.update(name, |r| {
            r.status = VmStatus::Stopped;
            r.pid = None;
            r.pid_start = None;
        })?;
        self.durable(seq).await;
        Ok(rec)
    }

    /// Stops and starts a VM.
    pub async fn restart(self: &Arc<Self>, name: &str) -> Result<VmRecord, Status> {
        self.stop(name).await?;
        self.start(name).await
    }

    /// Brings records and reality together after a start: VMs caught mid-create are undone and
    /// `failed`, mid-delete are finished, running ones whose hypervisor still runs are re-adopted
    /// and the others are `stopped`; hypervisors nobody recorded are stopped.
    pub async fn reconcile_local(self: &Arc<Self>) {
        for rec in self.list() {
            match rec.status {
                VmStatus::Creating => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while creating it: undoing");
                    self.tear_down(&rec.name, true).await;
                    if let Ok((_, seq)) = self.update(&rec.name, |r| {
                        r.status = VmStatus::Failed;
                        r.error = "vmmd stopped while creating this VM".into();
                    }) {
                        self.durable(seq).await;
                    }
                }
                VmStatus::Deleting => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while deleting it: finishing");
                    if let Err(e) = self.delete(&rec.name, true).await {
                        tracing::warn!(vm = %rec.name, "finishing a delete: {}", e.message());
                    }
                }
                VmStatus::Running | VmStatus::Booting => self.adopt(&rec).await,
                VmStatus::Stopping => {
                    tracing::warn!(vm = %rec.name, "vmmd stopped while stopping it: finishing");
                    self.stop_hypervisor(&rec, false).await;
                    if let Err(e) = self.finish_stop(&rec.name).await {
                        tracing::warn!(vm = %rec.name, "finishing a stop: {}", e.message());
                    }
                }
                VmStatus::Stopped | VmStatus::Failed => {}
            }
        }
        for rec in self.list() {
            if !rec.status.up() {
                if let Ok(driver) = self.driver(rec.hypervisor) {
                    driver.release(&self.paths(&rec.name)).await;
                }
                self.clear_run_files(&rec);
            }
        }
        let recorded: Vec<u32> = self
            .list()
            .iter()
            .filter(|r| r.status.up())
            .filter_map(|r| r.pid)
            .collect();
        // Hypervisors name their API socket, <run-dir>/vms/<vm>/api.sock (vsock backends name
        // other sockets of that directory).
        let jails = self.settings.run_dir.join("vms").display().to_string();
        let apis = process::find_by_arg("/api.sock");
        for pid in process::find_by_arg(&jails) {
            if apis.contains(&pid) && !recorded.contains(&pid) {
                tracing::warn!(pid, "stopping a hypervisor that no VM records");
                process::signal(pid, libc::SIGKILL);
            }
        }
    }

    async fn adopt(self: &Arc<Self>, rec: &VmRecord) {
        let api = self.paths(&rec.name).api_socket;
        let alive = rec
            .pid
            .is_some_and(|pid| process::alive(pid, rec.pid_start));
        let answers = match self.driver(rec.hypervisor) {
            Ok(d) if alive => d.ping(&api).await.is_ok(),
            _ => false,
        };
        match (rec.pid, answers) {
            (Some(pid), true) => {
                tracing::info!(vm = %rec.name, pid, "re-adopted its running hypervisor");
                self.watch_exit(&rec.name, pid, None);
                if rec.status == VmStatus::Booting {
                    self.watch_boot(&rec.name, pid);
                }
            }
            _ if rec.host_boot.is_some() && rec.host_boot != self.host_boot => {
                tracing::info!(vm = %rec.name, "the host restarted while it ran: stopped");
                self.clear_run_files(rec);
                if let Ok((_, seq)) = self.update(&rec.name, |r| {
                    r.status = VmStatus::Stopped;
                    r.pid = None;
                    r.pid_start = None;
                    r.error = "the host restarted while it ran".into();
                }) {
                    self.durable(seq).await;
                }
            }
            _ => {
                let (next, why) = guest::ended(&self.paths(&rec.name), rec.status, None);
                tracing::warn!(vm = %rec.name, "its hypervisor ended while vmmd was down: {why}");
                self.clear_run_files(rec);
                if let Ok((_, seq)) = self.update(&rec.name, |r| {
                    r.status = next;
                    r.pid = None;
                    r.pid_start = None;
                    r.error = if why.is_empty() {
                        "the guest powered off while vmmd was down".into()
                    } else {
                        why.clone()
                    };
                }) {
                    self.durable(seq).await;
                }
            }
        }
    }

    /// Reconciles with the peers now, then every `every` and whenever a teardown left something
    /// behind (a peer was down); after a failure it retries sooner, backing off to 10 s. The
    /// peers may start after vmmd and may crash and restart at any time.
    pub async fn reconcile_forever(self: Arc<Self>, every: Duration) {
        let mut wait = Duration::ZERO;
        let mut backoff = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.dirty.notified() => {}
            }
            match self.reconcile_once().await {
                Ok(()) => {
                    wait = every;
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    tracing::warn!("reconciling with the peers: {}", e.message());
                    wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One round: finishes deletes that a peer's failure interrupted, then makes the peers'
    /// leases, TAPs and routes match the VM records.
    pub async fn reconcile_once(&self) -> Result<(), Status> {
        // Each VM's delete on its own: one that cannot finish (its peer is down) holds up no
        // other, nor the comparison with the peers below.
        let mut stuck = Vec::new();
        for rec in self.list() {
            if rec.status == VmStatus::Deleting
                && let Err(e) = self.delete(&rec.name, false).await
            {
                tracing::warn!(vm = %rec.name, "finishing its delete: {}", e.message());
                stuck.push((rec.name, e));
            }
        }
        self.sweep_cgroups();
        let vsock_vms = self.list().iter().any(|r| r.mode == Mode::Vsock);
        let peers = self.reconcile_peers().await;
        let routes = match self.reconcile_routes().await {
            Err(e) if vsock_vms => Err(e),
            Err(e) => {
                tracing::debug!("reconciling with proxyd: {}", e.message());
                Ok(())
            }
            Ok(()) => Ok(()),
        };
        if let Some((vm, e)) = stuck.first() {
            return Err(Status::new(
                e.code(),
                format!(
                    "{} delete(s) could not finish yet, vm {vm:?}'s first: {}",
                    stuck.len(),
                    e.message()
                ),
            ));
        }
        peers.and(routes)
    }

    /// Holds every VM's lock: no create, delete, start or stop runs meanwhile, so the records
    /// and the peers can be compared without a saga moving between the two reads.
    async fn quiesce(&self) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut all = Vec::with_capacity(self.locks.len());
        for l in &self.locks {
            all.push(l.lock().await);
        }
        all
    }

    /// Registers every vsock VM with proxyd again (proxyd may have lost nothing, but vmmd may
    /// have crashed between steps) and removes the routes of VMs that do not exist.
    pub async fn reconcile_routes(&self) -> Result<(), Status> {
        let _quiet = self.quiesce().await;
        let vms: BTreeMap<String, VmRecord> = self
            .list()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        for vm in self.peers.routes().await? {
            if !vms.get(&vm).is_some_and(|r| r.mode == Mode::Vsock) {
                tracing::warn!(%vm, "removing a proxy route no VM holds");
                self.peers.unregister_route(&vm).await?;
            }
        }
        for rec in vms.values() {
            let live = rec.status.up() || rec.status == VmStatus::Stopped;
            if rec.mode == Mode::Vsock && live {
                self.peers.register_route(self.route(rec)?).await?;
            }
        }
        Ok(())
    }

    /// Asks the peers to converge and releases what no VM holds: leases of VMs that do not
    /// exist (or no longer hold that address) and TAPs of VMs that do not exist.
    pub async fn reconcile_peers(&self) -> Result<(), Status> {
        let _quiet = self.quiesce().await;
        let vms: BTreeMap<String, VmRecord> = self
            .list()
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        for (pool, ip, vm) in self.peers.leases().await? {
            let held = vms.get(&vm).is_some_and(|r| {
                r.ip.map(|i| i.to_string()) == Some(ip.clone()) && r.network == pool
            });
            if !held && !vms.get(&vm).is_some_and(|r| r.status == VmStatus::Creating) {
                tracing::warn!(%vm, %ip, %pool, "releasing a lease no VM holds");
                self.peers.release(&pool, &ip).await?;
            }
        }
        for (tap, vm) in self.peers.taps().await? {
            if !vms
                .get(&vm)
                .is_some_and(|r| r.tap == tap || r.status == VmStatus::Creating)
            {
                tracing::warn!(%vm, %tap, "deleting a TAP no VM holds");
                self.peers.delete_tap(&vm).await?;
            }
        }
        self.peers.reconcile_net().await?;
        Ok(())
    }
}
