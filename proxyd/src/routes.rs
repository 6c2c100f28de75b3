//! The registered VMs: their routes and egress policies, durable in sled so that a restarted
//! proxyd re-opens every egress listener before it answers. A VM's registration lives in a
//! [`Vm`] for as long as it is registered, whatever its policy becomes: a new policy replaces
//! the [`Policy`] every connection of the VM watches (a kept connection checks its next request
//! against it, a tunnel is closed when its host is no longer allowed), and unregistering closes
//! them all at once. A VM's counters outlive its registration.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{Semaphore, watch};
use tonic::Status;
use volant_services::api::proxy::v1 as pb;
use volant_services::validate::dns_label;

use crate::egress::Egress;
use crate::limit::Bucket;
use crate::rules::Allowlist;
use crate::stats::Stats;

/// The guest port on which a guest reaches the host's egress proxy (CID 2).
pub const EGRESS_PORT: u32 = 3128;
/// The ports a policy that names none may reach.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// Unregistered VMs whose counters are kept.
const RETIRED: usize = 1024;

/// Limits that apply when a VM's policy names none, and the caps every VM has.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Requests per second.
    pub requests_per_second: u32,
    /// Request burst.
    pub burst: u32,
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// Concurrent upstream connections: tunnels and forwarded requests alike.
    pub max_upstreams: u32,
    /// Concurrent connections to the VM's egress socket.
    pub max_connections: u32,
}

/// A VM's registration as it stands: its route and the egress policy compiled from it.
pub struct Policy {
    /// Its route, as registered (with `egress_socket` set).
    pub route: pb::Route,
    /// Its allowlist.
    pub allow: Allowlist,
    /// The ports it may reach, sorted.
    pub ports: Vec<u16>,
    /// Requests (and CONNECTs).
    pub requests: Arc<Bucket>,
    /// Bytes both ways.
    pub bytes: Arc<Bucket>,
    rates: (u32, u32, u64),
}

impl Policy {
    /// Whether the VM may reach the outside at all.
    pub fn outbound(&self) -> bool {
        self.route.egress.as_ref().is_some_and(|e| e.allow_outbound)
    }
}

/// One registered VM.
pub struct Vm {
    /// Its name.
    pub name: String,
    /// Its counters.
    pub stats: Arc<Stats>,
    /// Upstream connections open: tunnels and forwarded requests.
    pub upstreams: Arc<Semaphore>,
    /// Connections to its egress socket.
    pub connections: Arc<Semaphore>,
    /// The attributes its egress bytes are counted under, made once.
    io: crate::metrics::IoLabels,
    policy: watch::Sender<Option<Arc<Policy>>>,
    listener: Mutex<Option<(String, tokio::task::AbortHandle)>>,
}

impl Vm {
    /// Its policy now; `None` once it is unregistered.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policy.borrow().clone()
    }

    /// Hears of every change of its policy (`None`: unregistered).
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Policy>>> {
        self.policy.subscribe()
    }

    /// `n` bytes went the way `outbound` says: counted, and drawn from the byte budget of the
    /// policy now in force. Returns the pause owed.
    pub fn carried(&self, outbound: bool, n: usize) -> Duration {
        let c = if outbound {
            &self.stats.egress_bytes_out
        } else {
            &self.stats.egress_bytes_in
        };
        c.fetch_add(n as u64, Relaxed);
        self.io.carried(outbound, n as u64);
        self.policy
            .borrow()
            .as_ref()
            .map_or(Duration::ZERO, |p| p.bytes.take(n as f64))
    }

    fn stop_listening(&self) {
        if let Some((socket, task)) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some((_, task)) = self.listener.get_mut().unwrap_or_else(|p| p.into_inner()) {
            task.abort();
        }
    }
}

/// Every VM's counters, and the names of those unregistered, oldest first.
#[derive(Default)]
struct Counted(BTreeMap<String, Arc<Stats>>, VecDeque<String>);

/// Every registered VM, and the counters of those no longer registered.
pub struct Routes {
    tree: sled::Tree,
    db: sled::Db,
    defaults: Defaults,
    egress: Arc<Egress>,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
    stats: Mutex<Counted>,
    /// Registrations and unregistrations, one at a time.
    writing: tokio::sync::Mutex<()>,
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m)
}

/// Checks a route as vmmd sends it; returns it normalised with its egress socket, its
/// allowlist and its ports.
pub fn validate(mut r: pb::Route) -> Result<(pb::Route, Allowlist, Vec<u16>), Status> {
    dns_label("vm", &r.vm).map_err(invalid)?;
    if r.cid < 3 || r.cid == u32::MAX {
        return Err(invalid(format!(
            "cid {}: guest context ids start at 3 (0–2 are the hypervisor and the host)",
            r.cid
        )));
    }
    let socket = Path::new(&r.socket);
    if !socket.is_absolute() || r.socket.contains("..") || r.socket.len() > 100 {
        return Err(invalid(format!(
            "socket {:?}: give the absolute path (under 100 bytes) of the VM's vsock socket",
            r.socket
        )));
    }
    // 0 is no port and u32::MAX is VMADDR_PORT_ANY.
    if r.ingress_port == 0 || r.ingress_port == u32::MAX {
        return Err(invalid(format!(
            "ingress_port {} is not a vsock port",
            r.ingress_port
        )));
    }
    let egress = r.egress.get_or_insert_with(Default::default);
    let allow = Allowlist::new(&egress.allowed_domains)
        .map_err(|e| invalid(format!("egress.allowed_domains: {e}")))?;
    let mut ports = Vec::new();
    for p in &egress.allowed_ports {
        match u16::try_from(*p) {
            Ok(p) if p > 0 => ports.push(p),
            _ => {
                return Err(invalid(format!(
                    "egress.allowed_ports: {p} is not a port (1–65535)"
                )));
            }
        }
    }
    if ports.is_empty() {
        ports.extend(DEFAULT_PORTS);
    }
    ports.sort_unstable();
    ports.dedup();
    r.egress_socket = format!("{}_{EGRESS_PORT}", r.socket);
    Ok((r, allow, ports))
}

impl Routes {
    /// Opens the store under `state_dir` and re-opens the egress listener of every VM in it.
    pub fn open(
        state_dir: &Path,
        defaults: Defaults,
        egress: Arc<Egress>,
    ) -> anyhow::Result<Routes> {
        // A few routes: a small cache keeps the daemon small.
        let db = volant_services::store::open_sled(&state_dir.join("routes.sled"), 4 << 20)
            .map_err(anyhow::Error::msg)?;
        let tree = db.open_tree("routes")?;
        let routes = Routes {
            tree,
            db,
            defaults,
            egress,
            vms: RwLock::new(BTreeMap::new()),
            stats: Mutex::new(Default::default()),
            writing: tokio::sync::Mutex::new(()),
        };
        for item in routes.tree.iter() {
            let (_, v) = item?;
            let stored = pb::Route::decode(v.as_ref())?;
            let name = stored.vm.clone();
            match validate(stored).and_then(|(r, allow, ports)| routes.activate(r, allow, ports)) {
                Ok(()) => tracing::info!(vm = %name, "route restored"),
                Err(e) => tracing::error!(vm = %name, "route not restored: {}", e.message()),
            }
        }
        Ok(routes)
    }

    /// Puts a validated route in force: the VM's listener (re)bound when its socket changed,
    /// its policy replaced (byte and request budgets kept when their rates did not change).
    fn activate(&self, route: pb::Route, allow: Allowlist, ports: Vec<u16>) -> Result<(), Status> {
        let p = route.egress.clone().unwrap_or_default();
        let d = &self.defaults;
        let rps = if p.requests_per_second == 0 {
            d.requests_per_second
        } else {
            p.requests_per_second
        };
        let burst = if p.burst == 0 {
            d.burst.max(rps)
        } else {
            p.burst
        };
        let bps = if p.bytes_per_second == 0 {
            d.bytes_per_second
        } else {
            p.bytes_per_second
        };
        let vm = self.get(&route.vm).unwrap_or_else(|| {
            Arc::new(Vm {
                name: route.vm.clone(),
                stats: self.stats_of(&route.vm),
                upstreams: Arc::new(Semaphore::new(d.max_upstreams as usize)),
                connections: Arc::new(Semaphore::new(d.max_connections as usize)),
                io: crate::metrics::IoLabels::of(&route.vm),
                policy: watch::Sender::new(None),
                listener: Mutex::new(None),
            })
        });
        let bound = vm
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(socket, _)| *socket == route.egress_socket);
        if !bound {
            // The new socket first: a VM whose new one cannot be bound keeps its old one.
            let listener = bind_egress(&PathBuf::from(&route.egress_socket))?;
            vm.stop_listening();
            let task = tokio::spawn(self.egress.clone().serve(listener, Arc::downgrade(&vm)));
            *vm.listener.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((route.egress_socket.clone(), task.abort_handle()));
        }
        let rates = (rps, burst, bps);
        let (requests, bytes) = match vm.policy() {
            Some(old) if old.rates == rates => (old.requests.clone(), old.bytes.clone()),
            _ => (
                Arc::new(Bucket::new(f64::from(rps), f64::from(burst))),
                Arc::new(Bucket::new(bps as f64, bps as f64)),
            ),
        };
        vm.policy.send_replace(Some(Arc::new(Policy {
            route,
            allow,
            ports,
            requests,
            bytes,
            rates,
        })));
        vm.stats.registered.store(true, Relaxed);
        self.vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.name.clone(), vm);
        Ok(())
    }

    /// The counters of `vm`, kept or new.
    fn stats_of(&self, vm: &str) -> Arc<Stats> {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.0.entry(vm.to_string()).or_default().clone()
    }

    /// A registered VM.
    pub fn get(&self, vm: &str) -> Option<Arc<Vm>> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm)
            .cloned()
    }

    /// A registered VM and its policy (its route inside).
    pub fn route(&self, vm: &str) -> Option<(Arc<Vm>, Arc<Policy>)> {
        let vm = self.get(vm)?;
        let policy = vm.policy()?;
        Some((vm, policy))
    }

    /// Every registered route.
    pub fn all(&self) -> Vec<pb::Route> {
        let vms: Vec<Arc<Vm>> = self
            .vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        vms.iter()
            .filter_map(|v| Some(v.policy()?.route.clone()))
            .collect()
    }

    /// The counters of `vm` (registered or not), or of every VM proxyd has counted for.
    pub fn stats(&self, vm: Option<&str>) -> Vec<pb::VmStats> {
        let s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.0.iter()
            .filter(|(name, _)| vm.is_none_or(|v| v == *name))
            .map(|(name, st)| st.to_pb(name))
            .collect()
    }

    /// Registers (or replaces) a route; durable before it returns. Returns the route and
    /// whether anything changed.
    pub async fn register(&self, route: pb::Route) -> Result<(pb::Route, bool), Status> {
        let (route, allow, ports) = validate(route)?;
        let _one = self.writing.lock().await;
        if self
            .get(&route.vm)
            .and_then(|v| v.policy())
            .is_some_and(|old| old.route == route)
        {
            return Ok((route, false));
        }
        let taken = self
            .all()
            .into_iter()
            .find(|r| r.vm != route.vm && (r.cid == route.cid || r.socket == route.socket));
        if let Some(other) = taken {
            return Err(Status::already_exists(format!(
                "cid {} / socket {} belong to vm {:?}; unregister it first",
                route.cid, route.socket, other.vm
            )));
        }
        self.tree
            .insert(route.vm.as_bytes(), route.encode_to_vec())
            .map_err(|e| Status::internal(format!("storing the route: {e}")))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| Status::internal(format!("flushing the route: {e}")))?;
        self.activate(route.clone(), allow, ports)?;
        tracing::info!(vm = %route.vm, cid = route.cid, socket = %route.socket, "route registered");
        Ok((route, true))
    }

    /// Removes a route: its egress listener closes, and so does every connection and tunnel of
    /// the VM. Returns whether it existed.
    pub async fn unregister(&self, vm: &str) -> Result<bool, Status> {
        dns_label("vm", vm).map_err(invalid)?;
        let _one = self.writing.lock().await;
        self.tree
            .remove(vm.as_bytes())
            .map_err(|e| Status::internal(format!("removing the route: {e}")))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| Status::internal(format!("flushing: {e}")))?;
        let old = self
            .vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vm);
        let Some(old) = old else { return Ok(false) };
        old.policy.send_replace(None);
        old.stop_listening();
        old.stats.registered.store(false, Relaxed);
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.1.retain(|n| n != vm);
        s.1.push_back(vm.to_string());
        while s.1.len() > RETIRED {
            let Some(gone) = s.1.pop_front() else { break };
            if s.0
                .get(&gone)
                .is_some_and(|st| !st.registered.load(Relaxed))
            {
                s.0.remove(&gone);
            }
        }
        tracing::info!(vm, "route unregistered");
        Ok(true)
    }
}

/// Binds a VM's egress listener in the VM's directory. The VM's vsock backend, which connects to it, may run under
/// a uid of its own: in a directory that only the VM's uid and root may enter (vmmd makes one
/// per VM), the socket is opened to every user that can reach it; anywhere else it stays
/// proxyd's alone.
fn bind_egress(path: &std::path::Path) -> Result<tokio::net::UnixListener, Status> {
    use std::os::unix::fs::PermissionsExt;
    // The directory is the VM's, made by vmmd before it registers the VM: proxyd never makes
    // it, so a route restored for a VM that is gone leaves nothing in the run directory.
    if !path.parent().is_some_and(|d| d.is_dir()) {
        return Err(Status::failed_precondition(format!(
            "{}: the VM's directory does not exist (vmmd makes it before registering a VM)",
            path.display()
        )));
    }
    let listener =
        volant_services::daemon::bind_unix(path).map_err(|e| Status::internal(format!("{e:#}")))?;
    let guarded = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .is_some_and(|m| m.permissions().mode() & 0o007 == 0);
    if guarded {
        volant_services::daemon::chmod_socket(path, 0o666)
            .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route restored for a VM that is gone (vmmd removed its directory) makes nothing in the
    /// run directory: the directory is vmmd's to make.
    #[test]
    fn an_egress_listener_never_makes_the_vms_directory() {
        let run = tempfile::tempdir().unwrap();
        let gone = run.path().join("vms/gone/vsock.sock_1025");
        let err = bind_egress(&gone).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(!run.path().join("vms").exists());
    }
}
