//! netd's operations: validate, persist the intent, change the kernel, and acknowledge once the
//! intent is durable. Changes to networks and port forwards hold a gate exclusively, so the
//! kernel and the store move together; TAPs of different VMs, the churn of VM creation, hold it
//! shared and are made concurrently, one VM at a time. A crash at any point is repaired by
//! [`Netd::reconcile`], which runs on every start.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard, RwLock};
use volant_services::config::Bridge;
use volant_services::durability::Durability;
use volant_services::validate::{dns_label, interface_name};

use crate::desired::{Change, Desired, Forward, Network, Protocol, Store, Tap, port};
use crate::kernel::{Kernel, Status, guests_of};

mod forwards;
mod taps;

pub use forwards::{ForwardRequest, ForwardTarget};

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// No such network or TAP.
    #[error("{0}")]
    NotFound(String),
    /// The name or port is taken.
    #[error("{0}")]
    Conflict(String),
    /// Valid, but the current state forbids it.
    #[error("{0}")]
    Precondition(String),
    /// The kernel or the store failed; what was done is undone or left to reconciliation.
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, Error>;

/// How many locks the VMs' TAP operations are spread over.
const VM_LOCKS: usize = 64;

/// The owner of the host's network.
pub struct Netd {
    desired: Mutex<Desired>,
    /// Shared by TAP operations, exclusive for everything else.
    gate: RwLock<()>,
    /// Serialise the operations on one VM's TAP (striped by name).
    vm_locks: Vec<Mutex<()>>,
    store: Arc<Store>,
    durability: Durability,
    kernel: Kernel,
    /// The network defined by the config file, deleted only with force.
    config_network: Option<String>,
    /// How many TAP creations asked for the anti-spoofing set to be written.
    guard_wanted: AtomicU64,
    /// Held while writing them; how many of those asks the rules in place answer.
    guard_applied: Mutex<u64>,
    /// A sweep of deleted TAPs' entries is due.
    sweep_scheduled: AtomicBool,
}

fn failed(e: String) -> Error {
    Error::Failed(e)
}

impl Netd {
    /// Loads the desired state. Needs the multi-threaded Tokio runtime.
    pub fn open(store: Store, kernel: Kernel) -> Result<Netd> {
        let store = Arc::new(store);
        let desired = store.load().map_err(failed)?;
        let flushed = store.clone();
        Ok(Netd {
            desired: Mutex::new(desired),
            gate: RwLock::new(()),
            vm_locks: (0..VM_LOCKS).map(|_| Mutex::new(())).collect(),
            durability: Durability::new(Box::new(move || flushed.flush())),
            store,
            kernel,
            config_network: None,
            guard_wanted: AtomicU64::new(0),
            guard_applied: Mutex::new(0),
            sweep_scheduled: AtomicBool::new(false),
        })
    }

    fn write(&self, changes: &[Change<'_>]) -> Result<u64> {
        for change in changes {
            self.store.apply(*change).map_err(failed)?;
        }
        Ok(self.durability.record())
    }

    /// Converges forwarding and persists the recorded original setting if it changed.
    fn sync_forwarding(&self, d: &mut Desired, done: &mut Vec<String>) -> Result<()> {
        if self.kernel.sync_forwarding(d, done).map_err(failed)? {
            self.write(&[Change::ForwardingBefore(d.forwarding_before)])?;
        }
        Ok(())
    }

    /// Makes the network of the config's `networking.bridge` block exist as the config says
    /// (with NAT), then reconciles everything. Called once on start; from then on that network
    /// changes only through the config.
    pub async fn start(&mut self, bridge: &Bridge) -> anyhow::Result<Vec<String>> {
        let net = Network::validate(
            &bridge.name,
            &bridge.subnet.to_string(),
            &bridge.gateway.to_string(),
            true,
        )
        .map_err(|e| anyhow::anyhow!("config networking.bridge: {e}"))?;
        let name = net.name.clone();
        self.ensure_network(net, true)
            .await
            .map_err(|e| anyhow::anyhow!("config networking.bridge: {e}"))?;
        self.config_network = Some(name);
        Ok(self.reconcile().await?)
    }

    /// Re-creates what is missing and removes what netd owns but nobody asked for.
    pub async fn reconcile(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let seq = {
            let _gate = self.gate.write().await;
            let mut d = self.desired.lock().await;
            let seq = self.durability.latest();
            self.sync_forwarding(&mut d, &mut done)?;
            self.kernel.reconcile(&d, &mut done).await.map_err(failed)?;
            seq.max(self.durability.latest())
        };
        self.durability.wait(seq).await;
        for action in &done {
            tracing::info!("reconcile: {action}");
        }
        Ok(done)
    }

    async fn lock(&self) -> MutexGuard<'_, Desired> {
        self.desired.lock().await
    }

    fn vm_lock(&self, vm: &str) -> &Mutex<()> {
        let h = vm
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b.into()));
        &self.vm_locks[h % VM_LOCKS]
    }

    /// Creates or confirms a network. Returns it and whether it is new.
    pub async fn ensure_network(&self, net: Network, update: bool) -> Result<(Network, bool)> {
        let mut done = Vec::new();
        let gate = self.gate.write().await;
        let mut d = self.lock().await;
        let created = match d.networks.get(&net.name) {
            Some(old) if old.subnet != net.subnet || old.gateway != net.gateway => {
                return Err(Error::Conflict(format!(
                    "network {:?} already exists with subnet {} and gateway {}; delete it first \
                     to change them",
                    net.name, old.subnet, old.gateway
                )));
            }
            Some(old) if old.nat != net.nat && !update => {
                return Err(Error::Conflict(format!(
                    "network {:?} already exists with nat {}; update it to change that",
                    net.name, old.nat
                )));
            }
            Some(old) if old.nat != net.nat && self.config_network.as_ref() == Some(&net.name) => {
                return Err(Error::Precondition(format!(
                    "network {:?} is defined by the config file (networking.bridge); change it \
                     there",
                    net.name
                )));
            }
            Some(_) => false,
            None => {
                self.check_new_network(&d, &net).await?;
                true
            }
        };
        let seq = self.write(&[Change::PutNetwork(&net)])?;
        d.networks.insert(net.name.clone(), net.clone());
        let applied = async {
            self.sync_forwarding(&mut d, &mut done)?;
            self.kernel
                .apply_network(&net, &mut done)
                .await
                .map_err(failed)?;
            self.kernel
                .sync_guard(guests_of(&d), false, true, &mut done)
                .await
                .map_err(failed)?;
            self.kernel.sync_rules(&d, &mut done).await.map_err(failed)
        }
        .await;
        if let Err(e) = applied {
            if created {
                self.undo_network(&mut d, &net.name).await;
            }
            return Err(e);
        }
        let seq = seq.max(self.durability.latest());
        drop((d, gate));
        self.log(&done);
        self.durability.wait(seq).await;
        Ok((net, created))
    }

    /// Refuses a new network whose name or subnet collides with what exists.
    async fn check_new_network(&self, d: &Desired, net: &Network) -> Result<()> {
        if let Some(other) = d.networks.values().find(|o| o.overlaps(&net.subnet)) {
            return Err(Error::Invalid(format!(
                "subnet {} overlaps network {:?} ({}); choose another subnet",
                net.subnet, other.name, other.subnet
            )));
        }
        let routes = self.kernel.routes().await.map_err(failed)?;
        if let Some((dst, dev)) = routes
            .iter()
            .find(|(dst, dev)| dst.prefix_len() > 0 && *dev != net.name && net.overlaps(dst))
        {
            return Err(Error::Invalid(format!(
                "subnet {} overlaps the host's route {dst} dev {dev}; choose another subnet",
                net.subnet
            )));
        }
        if let Some(link) = self.kernel.link(&net.name).await.map_err(failed)?
            && link.kind != "bridge"
        {
            return Err(Error::Conflict(format!(
                "an interface named {} exists and is not a bridge; choose another name",
                net.name
            )));
        }
        Ok(())
    }

    /// Best-effort removal of a network that failed to come up.
    async fn undo_network(&self, d: &mut Desired, name: &str) {
        let mut done = Vec::new();
        d.networks.remove(name);
        let undone = async {
            self.write(&[Change::DeleteNetwork(name)])?;
            self.kernel
                .remove_network(name, &mut done)
                .await
                .map_err(failed)?;
            self.kernel.sync_rules(d, &mut done).await.map_err(failed)?;
            self.kernel
                .sync_guard(guests_of(d), false, true, &mut done)
                .await
                .map_err(failed)?;
            self.sync_forwarding(d, &mut done)
        }
        .await;
        if let Err(e) = undone {
            tracing::warn!("undoing network {name}: {e}; reconciliation will finish it");
        }
    }

    /// A bridge of the host that netd does not manage: its first IPv4 address and prefix.
    pub async fn inspect_bridge(&self, name: &str) -> Result<(IpAddr, u8)> {
        interface_name("bridge name", name).map_err(Error::Invalid)?;
        if self.lock().await.networks.contains_key(name) {
            return Err(Error::Conflict(format!("{name} is netd's network already")));
        }
        let link = self
            .kernel
            .link(name)
            .await
            .map_err(failed)?
            .filter(|l| l.kind == "bridge")
            .ok_or_else(|| Error::NotFound(format!("the host has no bridge named {name}")))?;
        self.kernel
            .addresses(link.index)
            .await
            .map_err(failed)?
            .into_iter()
            .find(|(ip, _)| ip.is_ipv4())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "the bridge {name} has no IPv4 address; give it one (ip addr add \
                     ADDRESS/24 dev {name}) to make it a network"
                ))
            })
    }

    /// The network with its live status.
    pub async fn get_network(&self, name: &str) -> Result<(Network, Status)> {
        interface_name("network name", name).map_err(Error::Invalid)?;
        let d = self.lock().await;
        let net = d
            .networks
            .get(name)
            .cloned()
            .ok_or_else(|| unknown_network(name))?;
        let status = self.kernel.status(&net, &d).await.map_err(failed)?;
        Ok((net, status))
    }

    /// Every network with its live status.
    pub async fn list_networks(&self) -> Result<Vec<(Network, Status)>> {
        let d = self.lock().await;
        let mut out = Vec::new();
        for net in d.networks.values() {
            out.push((
                net.clone(),
                self.kernel.status(net, &d).await.map_err(failed)?,
            ));
        }
        Ok(out)
    }

    /// Deletes a network and exactly what netd added for it. Returns whether it existed.
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<bool> {
        interface_name("network name", name).map_err(Error::Invalid)?;
        let mut done = Vec::new();
        let gate = self.gate.write().await;
        let mut d = self.lock().await;
        if !d.networks.contains_key(name) {
            return Ok(false);
        }
        let taps: Vec<Tap> = d
            .taps
            .values()
            .filter(|t| t.network == name)
            .cloned()
            .collect();
        let forwards: Vec<Forward> = d
            .forwards
            .values()
            .filter(|f| f.network == name)
            .cloned()
            .collect();
        if !force {
            if self.config_network.as_deref() == Some(name) {
                return Err(Error::Precondition(format!(
                    "network {name:?} is defined by the config file (networking.bridge); \
                     delete it with force, and it returns when netd restarts"
                )));
            }
            if !taps.is_empty() || !forwards.is_empty() {
                return Err(Error::Precondition(format!(
                    "network {name:?} has {} TAP(s) and {} port forward(s); delete their VMs \
                     first or delete with force",
                    taps.len(),
                    forwards.len()
                )));
            }
        }
        let mut changes: Vec<Change<'_>> = taps.iter().map(|t| Change::DeleteTap(&t.vm)).collect();
        changes.extend(
            forwards
                .iter()
                .map(|f| Change::DeleteForward(f.protocol, f.host_port)),
        );
        changes.push(Change::DeleteNetwork(name));
        let seq = self.write(&changes)?;
        for t in &taps {
            d.taps.remove(&t.vm);
        }
        for f in &forwards {
            d.forwards.remove(&(f.protocol, f.host_port));
        }
        d.networks.remove(name);
        let result = async {
            for t in &taps {
                self.kernel.remove_tap(&t.name, &mut done).await?;
            }
            self.kernel
                .sync_guard(guests_of(&d), false, true, &mut done)
                .await?;
            self.kernel.sync_rules(&d, &mut done).await?;
            self.kernel.remove_network(name, &mut done).await
        }
        .await
        .map_err(failed);
        self.sync_forwarding(&mut d, &mut done)?;
        let seq = seq.max(self.durability.latest());
        drop((d, gate));
        self.log(&done);
        self.durability.wait(seq).await;
        result.map(|()| true)
    }

    /// Takes out of the kernel everything netd made (TAPs, its bridges, its rules, the
    /// anti-spoofing table) and restores forwarding as it was, keeping the records: the next
    /// start makes it all again. For after serving has stopped.
    pub async fn withdraw(&self) -> Result<()> {
        let _gate = self.gate.write().await;
        let d = self.lock().await;
        let mut done = Vec::new();
        let result = async {
            for t in d.taps.values() {
                self.kernel.remove_tap(&t.name, &mut done).await?;
            }
            self.kernel.reap_now().await?;
            self.kernel.sync_guard(None, true, true, &mut done).await?;
            self.kernel
                .sync_rules(&Desired::default(), &mut done)
                .await?;
            for name in d.networks.keys() {
                self.kernel.remove_network(name, &mut done).await?;
            }
            let mut none = Desired {
                forwarding_before: d.forwarding_before,
                ..Desired::default()
            };
            self.kernel
                .sync_forwarding(&mut none, &mut done)
                .map(|_| ())
        }
        .await
        .map_err(failed);
        self.log(&done);
        result
    }

    fn log(&self, done: &[String]) {
        for action in done {
            tracing::info!("{action}");
        }
    }
}

fn unknown_network(name: &str) -> Error {
    Error::NotFound(format!(
        "network {name:?} does not exist; ListNetworks shows the networks"
    ))
}
