//! The registered VMs: their routes and egress policies, durable in sled so that a restarted
//! proxyd re-opens every egress listener before it answers, plus each VM's live state (rate
//! buckets, tunnel permits, counters, the egress listener task).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use prost::Message as _;
use tokio::sync::Semaphore;
use tonic::Status;
use volant_services::api::proxy::v1 as pb;
use volant_services::validate::dns_label;

use crate::egress::Egress;
use crate::limit::Bucket;
use crate::rules::Allowlist;
use crate::stats::Stats;

/// The guest port on which a guest reaches the host's egress proxy (CID 2).
pub const EGRESS_PORT: u32 = 3128;

/// Limits that apply when a VM's policy names none.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Requests per second.
    pub requests_per_second: u32,
    /// Request burst.
    pub burst: u32,
    /// Bytes per second.
    pub bytes_per_second: u64,
    /// Concurrent tunnels.
    pub max_tunnels: u32,
}

/// One registered VM.
pub struct Vm {
    /// Its route, as registered (with `egress_socket` set).
    pub route: pb::Route,
    /// Its allowlist.
    pub allow: Allowlist,
    /// Requests (and CONNECTs).
    pub requests: Bucket,
    /// Bytes both ways.
    pub bytes: Bucket,
    /// Open tunnels.
    pub tunnels: Arc<Semaphore>,
    /// Its counters.
    pub stats: Arc<Stats>,
    listener: tokio::task::AbortHandle,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Every registered VM.
pub struct Routes {
    tree: sled::Tree,
    db: sled::Db,
    defaults: Defaults,
    egress: Arc<Egress>,
    vms: RwLock<BTreeMap<String, Arc<Vm>>>,
}

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m)
}

/// Checks a route as vmmd sends it; returns it normalised with its egress socket.
pub fn validate(mut r: pb::Route) -> Result<(pb::Route, Allowlist), Status> {
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
    r.egress_socket = format!("{}_{EGRESS_PORT}", r.socket);
    Ok((r, allow))
}

impl Routes {
    /// Opens the store under `state_dir` and re-opens the egress listener of every VM in it.
    pub fn open(
        state_dir: &Path,
        defaults: Defaults,
        egress: Arc<Egress>,
    ) -> anyhow::Result<Routes> {
        // A few routes: a small cache keeps the daemon small.
        let db = sled::Config::new()
            .path(state_dir.join("routes.sled"))
            .cache_capacity(4 << 20)
            .open()?;
        let tree = db.open_tree("routes")?;
        let routes = Routes {
            tree,
            db,
            defaults,
            egress,
            vms: RwLock::new(BTreeMap::new()),
        };
        for item in routes.tree.iter() {
            let (_, v) = item?;
            let stored = pb::Route::decode(v.as_ref())?;
            let name = stored.vm.clone();
            match validate(stored).and_then(|(r, allow)| routes.activate(r, allow)) {
                Ok(()) => tracing::info!(vm = %name, "route restored"),
                Err(e) => tracing::error!(vm = %name, "route not restored: {}", e.message()),
            }
        }
        Ok(routes)
    }

    fn activate(&self, route: pb::Route, allow: Allowlist) -> Result<(), Status> {
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
        if let Some(old) = self.get(&route.vm) {
            old.listener.abort();
            let _ = std::fs::remove_file(&old.route.egress_socket);
        }
        let listener = volant_services::daemon::bind_unix(&PathBuf::from(&route.egress_socket))
            .map_err(|e| Status::internal(format!("{e:#}")))?;
        let stats = self
            .get(&route.vm)
            .map(|old| old.stats.clone())
            .unwrap_or_default();
        let vm = Arc::new_cyclic(|me: &std::sync::Weak<Vm>| {
            let task = tokio::spawn(self.egress.clone().serve(listener, me.clone()));
            Vm {
                allow,
                requests: Bucket::new(f64::from(rps), f64::from(burst)),
                bytes: Bucket::new(bps as f64, bps as f64),
                tunnels: Arc::new(Semaphore::new(d.max_tunnels as usize)),
                stats,
                listener: task.abort_handle(),
                route,
            }
        });
        let name = vm.route.vm.clone();
        self.vms
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, vm);
        Ok(())
    }

    /// A registered VM.
    pub fn get(&self, vm: &str) -> Option<Arc<Vm>> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(vm)
            .cloned()
    }

    /// Every registered VM.
    pub fn all(&self) -> Vec<Arc<Vm>> {
        self.vms
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Registers (or replaces) a route; durable before it returns. Returns the route and
    /// whether anything changed.
    pub async fn register(&self, route: pb::Route) -> Result<(pb::Route, bool), Status> {
        let (route, allow) = validate(route)?;
        if self.get(&route.vm).is_some_and(|old| old.route == route) {
            return Ok((route, false));
        }
        let taken = self.all().into_iter().find(|v| {
            v.route.vm != route.vm && (v.route.cid == route.cid || v.route.socket == route.socket)
        });
        if let Some(other) = taken {
            return Err(Status::already_exists(format!(
                "cid {} / socket {} belong to vm {:?}; unregister it first",
                route.cid, route.socket, other.route.vm
            )));
        }
        self.tree
            .insert(route.vm.as_bytes(), route.encode_to_vec())
            .map_err(|e| Status::internal(format!("storing the route: {e}")))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| Status::internal(format!("flushing the route: {e}")))?;
        self.activate(route.clone(), allow)?;
        tracing::info!(vm = %route.vm, cid = route.cid, socket = %route.socket, "route registered");
        Ok((route, true))
    }

    /// Removes a route and its egress listener; returns whether it existed.
    pub async fn unregister(&self, vm: &str) -> Result<bool, Status> {
        dns_label("vm", vm).map_err(invalid)?;
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
        if let Some(old) = &old {
            let _ = std::fs::remove_file(&old.route.egress_socket);
            tracing::info!(vm, "route unregistered");
        }
        Ok(old.is_some())
    }
}
