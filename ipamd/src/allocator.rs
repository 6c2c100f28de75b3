//! Pools and leases: the rules, the in-memory index, and write-through to the store.
//!
//! Every mutation is decided under one lock, applied to the store atomically, mirrored in memory,
//! and acknowledged only once it is durable. Reads also wait for durability, so no caller ever
//! sees a lease that a crash could take back.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use volant_services::config::Bridge;
use volant_services::durability::Durability;
use volant_services::validate::dns_label;

use crate::pool::{Pool, PoolSpec, next};
use crate::store::{Change, Lease, Store, StoreError};

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; nothing changed.
    #[error("{0}")]
    Invalid(String),
    /// No such pool or lease.
    #[error("{0}")]
    NotFound(String),
    /// The name or address is taken.
    #[error("{0}")]
    Conflict(String),
    /// No free address left.
    #[error("{0}")]
    Exhausted(String),
    /// The request is valid but the current state forbids it.
    #[error("{0}")]
    Precondition(String),
    /// The store failed; nothing changed.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
}

type Result<T> = std::result::Result<T, Error>;

/// Which lease of a pool: by address or by VM.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// The lease of this address.
    Ip(&'a str),
    /// The lease of this VM.
    Vm(&'a str),
}

/// A pool with its occupancy.
#[derive(Clone, Debug)]
pub struct PoolView {
    /// The pool.
    pub pool: Pool,
    /// How many addresses are leased.
    pub leased: usize,
}

struct PoolState {
    pool: Pool,
    /// Leases by address; `IpAddr` orders numerically, so the first gap is the first free address.
    leases: BTreeMap<IpAddr, Lease>,
    by_vm: HashMap<String, IpAddr>,
}

impl PoolState {
    fn new(pool: Pool) -> PoolState {
        PoolState {
            pool,
            leases: BTreeMap::new(),
            by_vm: HashMap::new(),
        }
    }

    fn view(&self) -> PoolView {
        PoolView {
            pool: self.pool.clone(),
            leased: self.leases.len(),
        }
    }

    /// The lowest address of the range that no lease holds.
    fn first_free(&self) -> Option<IpAddr> {
        let mut candidate = self.pool.range_start;
        for &ip in self
            .leases
            .range(self.pool.range_start..=self.pool.range_end)
            .map(|(ip, _)| ip)
        {
            if ip != candidate {
                break;
            }
            candidate = next(candidate)?;
        }
        self.pool.in_range(candidate).then_some(candidate)
    }

    fn insert(&mut self, lease: Lease) {
        self.by_vm.insert(lease.vm.clone(), lease.ip);
        self.leases.insert(lease.ip, lease);
    }

    fn remove(&mut self, ip: IpAddr) -> Option<Lease> {
        let lease = self.leases.remove(&ip)?;
        self.by_vm.remove(&lease.vm);
        Some(lease)
    }

    fn find(&self, target: Target<'_>) -> Result<Option<&Lease>> {
        Ok(match target {
            Target::Ip(ip) => self.leases.get(&parse_ip(ip)?),
            Target::Vm(vm) => {
                dns_label("vm", vm).map_err(Error::Invalid)?;
                self.by_vm.get(vm).and_then(|ip| self.leases.get(ip))
            }
        })
    }
}

fn parse_ip(text: &str) -> Result<IpAddr> {
    text.trim().parse().map_err(|_| {
        Error::Invalid(format!(
            "{text:?} is not an IP address such as 192.168.127.100"
        ))
    })
}

#[derive(Default)]
struct State {
    pools: BTreeMap<String, PoolState>,
    /// The pool defined by the config file, which only force removes (until the next start).
    config_pool: Option<String>,
}

impl State {
    fn pool(&self, name: &str) -> Result<&PoolState> {
        dns_label("pool", name).map_err(Error::Invalid)?;
        self.pools.get(name).ok_or_else(|| not_found(name))
    }

    fn pool_mut(&mut self, name: &str) -> Result<&mut PoolState> {
        dns_label("pool", name).map_err(Error::Invalid)?;
        self.pools.get_mut(name).ok_or_else(|| not_found(name))
    }

    fn overlapping(&self, pool: &Pool) -> Option<&Pool> {
        self.pools
            .values()
            .map(|p| &p.pool)
            .find(|p| p.name != pool.name && p.overlaps(pool))
    }
}

fn not_found(pool: &str) -> Error {
    Error::NotFound(format!(
        "pool {pool:?} does not exist; ListPools shows the pools"
    ))
}

/// The owner of pools and leases.
pub struct Allocator {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    durability: Durability,
}

impl Allocator {
    /// Loads the stored state, repairing what cannot be valid (leases of missing pools, a VM
    /// with two leases in one pool). Its calls need the multi-threaded Tokio runtime.
    pub fn open(store: Arc<dyn Store>) -> Result<Allocator> {
        let stored = store.load()?;
        let mut state = State::default();
        for pool in stored.pools {
            state.pools.insert(pool.name.clone(), PoolState::new(pool));
        }
        let mut repairs = Vec::new();
        for lease in stored.leases {
            let Some(pool) = state.pools.get_mut(&lease.pool) else {
                tracing::warn!(pool = %lease.pool, ip = %lease.ip, "dropping lease of a missing pool");
                repairs.push(Change::DeleteLease {
                    pool: lease.pool,
                    ip: lease.ip,
                });
                continue;
            };
            if let Some(held) = pool.by_vm.get(&lease.vm) {
                tracing::warn!(vm = %lease.vm, ip = %lease.ip, held = %held, "dropping second lease of a VM");
                repairs.push(Change::DeleteLease {
                    pool: lease.pool,
                    ip: lease.ip,
                });
                continue;
            }
            pool.insert(lease);
        }
        if !repairs.is_empty() {
            store.apply(&repairs)?;
            store.flush()?;
        }
        let flushed = store.clone();
        let durability = Durability::new(Box::new(move || flushed.flush().map_err(|e| e.0)));
        Ok(Allocator {
            state: Mutex::new(state),
            store,
            durability,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock cannot leave memory ahead of the store: the store is written
        // before memory. Carry on with the state as it is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `changes` to the store; the caller mirrors them in memory afterwards, still under
    /// the lock, and waits for the returned sequence number before replying.
    fn write(&self, changes: &[Change]) -> Result<u64> {
        self.store.apply(changes)?;
        Ok(self.durability.record())
    }

    async fn durable<T>(&self, seq: u64, value: T) -> T {
        self.durability.wait(seq).await;
        value
    }

    async fn read<T>(&self, f: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        let (seq, value) = {
            let state = self.lock();
            (self.durability.latest(), f(&state)?)
        };
        Ok(self.durable(seq, value).await)
    }

    /// Makes the pool of the config's `networking.bridge` block exist as written. A stored pool
    /// of that name is updated when its leases all fit the new definition; otherwise starting
    /// fails with the conflicting leases named.
    pub async fn ensure_config_pool(&self, bridge: &Bridge) -> anyhow::Result<()> {
        let (gateway, start, end) = (
            bridge.gateway.to_string(),
            bridge.ip_range.start.to_string(),
            bridge.ip_range.end.to_string(),
        );
        let pool = Pool::validate(PoolSpec {
            name: &bridge.name,
            subnet: &bridge.subnet.to_string(),
            gateway: &gateway,
            range_start: &start,
            range_end: &end,
        })
        .map_err(|e| anyhow::anyhow!("config networking.bridge: {e}"))?;
        let seq = {
            let mut state = self.lock();
            if let Some(other) = state.overlapping(&pool) {
                anyhow::bail!(
                    "config networking.bridge: subnet {} overlaps pool {:?} ({}); delete that \
                     pool or choose another subnet",
                    pool.subnet,
                    other.name,
                    other.subnet
                );
            }
            let seq = match state.pools.get_mut(&pool.name) {
                Some(existing) if existing.pool == pool => None,
                Some(existing) => {
                    let misfits: Vec<String> = existing
                        .leases
                        .values()
                        .filter(|l| !pool.in_range(l.ip))
                        .map(|l| format!("{} ({})", l.ip, l.vm))
                        .collect();
                    if !misfits.is_empty() {
                        anyhow::bail!(
                            "config networking.bridge: pool {:?} would change to range {}–{}, \
                             but these leases lie outside it: {}; delete those VMs or restore \
                             the previous settings",
                            pool.name,
                            pool.range_start,
                            pool.range_end,
                            misfits.join(", ")
                        );
                    }
                    tracing::warn!(pool = %pool.name, "updating pool from the config file");
                    let seq = self.write(&[Change::PutPool(pool.clone())])?;
                    existing.pool = pool.clone();
                    Some(seq)
                }
                None => {
                    tracing::info!(pool = %pool.name, subnet = %pool.subnet, "creating pool from the config file");
                    let seq = self.write(&[Change::PutPool(pool.clone())])?;
                    state
                        .pools
                        .insert(pool.name.clone(), PoolState::new(pool.clone()));
                    Some(seq)
                }
            };
            state.config_pool = Some(pool.name);
            seq
        };
        if let Some(seq) = seq {
            self.durability.wait(seq).await;
        }
        Ok(())
    }

    /// Creates a pool; an identical existing pool is success with `false`.
    pub async fn create_pool(&self, spec: PoolSpec<'_>) -> Result<(PoolView, bool)> {
        let pool = Pool::validate(spec).map_err(Error::Invalid)?;
        let (seq, view, created) = {
            let mut state = self.lock();
            if let Some(existing) = state.pools.get(&pool.name) {
                if existing.pool != pool {
                    return Err(Error::Conflict(format!(
                        "pool {:?} already exists with subnet {}, gateway {}, range {}–{}",
                        pool.name,
                        existing.pool.subnet,
                        existing.pool.gateway,
                        existing.pool.range_start,
                        existing.pool.range_end
                    )));
                }
                (self.durability.latest(), existing.view(), false)
            } else {
                if let Some(other) = state.overlapping(&pool) {
                    return Err(Error::Invalid(format!(
                        "subnet {} overlaps pool {:?} ({}); choose a subnet that does not",
                        pool.subnet, other.name, other.subnet
                    )));
                }
                let seq = self.write(&[Change::PutPool(pool.clone())])?;
                let ps = PoolState::new(pool.clone());
                let view = ps.view();
                state.pools.insert(pool.name, ps);
                (seq, view, true)
            }
        };
        Ok(self.durable(seq, (view, created)).await)
    }

    /// One pool.
    pub async fn get_pool(&self, name: &str) -> Result<PoolView> {
        self.read(|s| Ok(s.pool(name)?.view())).await
    }

    /// Every pool, by name.
    pub async fn list_pools(&self) -> Result<Vec<PoolView>> {
        self.read(|s| Ok(s.pools.values().map(PoolState::view).collect()))
            .await
    }

    /// Every pool as memory holds it now, without waiting for the store: for metrics.
    pub fn occupancy(&self) -> Vec<PoolView> {
        self.lock().pools.values().map(PoolState::view).collect()
    }

    /// Deletes a pool; with leases only when `force`, releasing them. Returns whether it existed
    /// and what was released.
    pub async fn delete_pool(&self, name: &str, force: bool) -> Result<(bool, Vec<(Lease, Pool)>)> {
        dns_label("pool", name).map_err(Error::Invalid)?;
        let (seq, result) = {
            let mut state = self.lock();
            match state.pools.get(name) {
                None => (self.durability.latest(), (false, vec![])),
                Some(ps) => {
                    if state.config_pool.as_deref() == Some(name) && !force {
                        return Err(Error::Precondition(format!(
                            "pool {name:?} is defined by the config file (networking.bridge): \
                             change it there, or delete it with force (the config brings it \
                             back at the next start)"
                        )));
                    }
                    if !ps.leases.is_empty() && !force {
                        return Err(Error::Precondition(format!(
                            "pool {name:?} has {} lease(s); delete their VMs first or delete with force",
                            ps.leases.len()
                        )));
                    }
                    let mut changes: Vec<Change> = ps
                        .leases
                        .keys()
                        .map(|&ip| Change::DeleteLease {
                            pool: name.to_string(),
                            ip,
                        })
                        .collect();
                    changes.push(Change::DeletePool(name.to_string()));
                    let seq = self.write(&changes)?;
                    let ps = state.pools.remove(name).expect("checked above");
                    let pool = ps.pool;
                    let released = ps.leases.into_values().map(|l| (l, pool.clone())).collect();
                    (seq, (true, released))
                }
            }
        };
        Ok(self.durable(seq, result).await)
    }

    /// Leases an address of `pool` to `vm`: its existing lease if it has one, else `requested`
    /// if given, else the first free address in numeric order. Returns whether it is new.
    pub async fn allocate(
        &self,
        pool: &str,
        vm: &str,
        requested: Option<&str>,
    ) -> Result<(Lease, Pool, bool)> {
        dns_label("vm", vm).map_err(Error::Invalid)?;
        let requested = requested.map(parse_ip).transpose()?;
        let (seq, result) = {
            let mut state = self.lock();
            let ps = state.pool_mut(pool)?;
            if let Some(held) = ps.by_vm.get(vm).copied() {
                if requested.is_some_and(|r| r != held) {
                    return Err(Error::Precondition(format!(
                        "vm {vm:?} already holds {held} in pool {pool:?}; release it before \
                         asking for another address"
                    )));
                }
                (
                    self.durability.latest(),
                    (ps.leases[&held].clone(), ps.pool.clone(), false),
                )
            } else {
                let ip = match requested {
                    Some(ip) => {
                        if !ps.pool.in_range(ip) {
                            return Err(Error::Invalid(format!(
                                "{ip} is outside the range {}–{} of pool {pool:?}",
                                ps.pool.range_start, ps.pool.range_end
                            )));
                        }
                        if let Some(other) = ps.leases.get(&ip) {
                            return Err(Error::Conflict(format!(
                                "{ip} is already leased to vm {:?}",
                                other.vm
                            )));
                        }
                        ip
                    }
                    None => ps.first_free().ok_or_else(|| {
                        Error::Exhausted(format!(
                            "pool {pool:?} has no free address: all {} addresses of {}–{} are leased",
                            ps.pool.capacity(),
                            ps.pool.range_start,
                            ps.pool.range_end
                        ))
                    })?,
                };
                let lease = Lease {
                    pool: pool.to_string(),
                    ip,
                    vm: vm.to_string(),
                    leased_at: SystemTime::now(),
                };
                let seq = self.write(&[Change::PutLease(lease.clone())])?;
                ps.insert(lease.clone());
                (seq, (lease, ps.pool.clone(), true))
            }
        };
        Ok(self.durable(seq, result).await)
    }

    /// Releases one lease of `pool`; releasing what is not leased succeeds with `None`.
    pub async fn release(&self, pool: &str, target: Target<'_>) -> Result<Option<(Lease, Pool)>> {
        let (seq, released) = {
            let mut state = self.lock();
            let ps = state.pool_mut(pool)?;
            match ps.find(target)?.map(|l| l.ip) {
                None => (self.durability.latest(), None),
                Some(ip) => {
                    let seq = self.write(&[Change::DeleteLease {
                        pool: pool.to_string(),
                        ip,
                    }])?;
                    (seq, ps.remove(ip).map(|l| (l, ps.pool.clone())))
                }
            }
        };
        Ok(self.durable(seq, released).await)
    }

    /// Releases every lease `vm` holds, in every pool.
    pub async fn release_vm(&self, vm: &str) -> Result<Vec<(Lease, Pool)>> {
        dns_label("vm", vm).map_err(Error::Invalid)?;
        let (seq, released) = {
            let mut state = self.lock();
            let held: Vec<(String, IpAddr)> = state
                .pools
                .values()
                .filter_map(|ps| ps.by_vm.get(vm).map(|ip| (ps.pool.name.clone(), *ip)))
                .collect();
            if held.is_empty() {
                (self.durability.latest(), vec![])
            } else {
                let changes: Vec<Change> = held
                    .iter()
                    .map(|(pool, ip)| Change::DeleteLease {
                        pool: pool.clone(),
                        ip: *ip,
                    })
                    .collect();
                let seq = self.write(&changes)?;
                let released = held
                    .into_iter()
                    .filter_map(|(pool, ip)| {
                        let ps = state.pools.get_mut(&pool)?;
                        Some((ps.remove(ip)?, ps.pool.clone()))
                    })
                    .collect();
                (seq, released)
            }
        };
        Ok(self.durable(seq, released).await)
    }

    /// One lease, with its pool.
    pub async fn get_lease(&self, pool: &str, target: Target<'_>) -> Result<(Lease, Pool)> {
        self.read(|s| {
            let ps = s.pool(pool)?;
            let lease = ps.find(target)?.ok_or_else(|| {
                Error::NotFound(match target {
                    Target::Ip(ip) => format!("{ip} is not leased in pool {pool:?}"),
                    Target::Vm(vm) => format!("vm {vm:?} holds no lease in pool {pool:?}"),
                })
            })?;
            Ok((lease.clone(), ps.pool.clone()))
        })
        .await
    }

    /// Leases with their pools, by pool name then address; optionally of one pool or one VM.
    pub async fn list_leases(
        &self,
        pool: Option<&str>,
        vm: Option<&str>,
    ) -> Result<Vec<(Lease, Pool)>> {
        if let Some(vm) = vm {
            dns_label("vm", vm).map_err(Error::Invalid)?;
        }
        self.read(|s| {
            let pools: Vec<&PoolState> = match pool {
                Some(name) => vec![s.pool(name)?],
                None => s.pools.values().collect(),
            };
            Ok(pools
                .into_iter()
                .flat_map(|ps| {
                    ps.leases
                        .values()
                        .filter(|l| vm.is_none_or(|vm| l.vm == vm))
                        .map(|l| (l.clone(), ps.pool.clone()))
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sled_store::SledStore;

    fn open(dir: &std::path::Path) -> Allocator {
        Allocator::open(Arc::new(SledStore::open(dir).unwrap())).unwrap()
    }

    async fn with_default(dir: &std::path::Path) -> Allocator {
        let a = open(dir);
        a.ensure_config_pool(&Bridge::default()).await.unwrap();
        a
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn first_free_in_numeric_order_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        for i in 100..=254 {
            let (lease, _, created) = a
                .allocate("volant0", &format!("vm{i}"), None)
                .await
                .unwrap();
            assert!(created);
            assert_eq!(lease.ip.to_string(), format!("192.168.127.{i}"));
        }
        let (again, _, created) = a.allocate("volant0", "vm120", None).await.unwrap();
        assert!(!created);
        assert_eq!(again.ip.to_string(), "192.168.127.120");
        assert!(matches!(
            a.allocate("volant0", "one-more", None).await,
            Err(Error::Exhausted(_))
        ));
        a.release("volant0", Target::Ip("192.168.127.150"))
            .await
            .unwrap();
        a.release("volant0", Target::Vm("vm101")).await.unwrap();
        let (lease, _, _) = a.allocate("volant0", "x", None).await.unwrap();
        assert_eq!(lease.ip.to_string(), "192.168.127.101");
        let (lease, _, _) = a.allocate("volant0", "y", None).await.unwrap();
        assert_eq!(lease.ip.to_string(), "192.168.127.150");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn requested_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        let (l, _, _) = a
            .allocate("volant0", "fixed", Some("192.168.127.200"))
            .await
            .unwrap();
        assert_eq!(l.ip.to_string(), "192.168.127.200");
        // Asking again with the same address (or none) is idempotent.
        a.allocate("volant0", "fixed", Some("192.168.127.200"))
            .await
            .unwrap();
        a.allocate("volant0", "fixed", None).await.unwrap();
        let cases = [
            (
                "other",
                Some("192.168.127.200"),
                "already leased to vm \"fixed\"",
            ),
            ("other", Some("192.168.127.50"), "outside the range"),
            ("other", Some("10.0.0.1"), "outside the range"),
            ("other", Some("::1"), "outside the range"),
            ("other", Some("banana"), "not an IP address"),
            (
                "fixed",
                Some("192.168.127.201"),
                "already holds 192.168.127.200",
            ),
        ];
        for (vm, req, why) in cases {
            let err = a.allocate("volant0", vm, req).await.unwrap_err();
            assert!(err.to_string().contains(why), "{req:?}: {err}");
        }
        assert_eq!(a.list_leases(None, None).await.unwrap().len(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn release_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        a.allocate("volant0", "web", None).await.unwrap();
        assert!(
            a.release("volant0", Target::Vm("web"))
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            a.release("volant0", Target::Vm("web"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            a.release("volant0", Target::Ip("192.168.127.100"))
                .await
                .unwrap()
                .is_none()
        );
        assert!(a.release_vm("web").await.unwrap().is_empty());
        assert!(matches!(
            a.release("nope", Target::Vm("web")).await,
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn release_vm_spans_pools() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        a.create_pool(PoolSpec {
            name: "volant1",
            subnet: "192.168.128.0/24",
            ..Default::default()
        })
        .await
        .unwrap();
        a.allocate("volant0", "web", None).await.unwrap();
        a.allocate("volant1", "web", None).await.unwrap();
        a.allocate("volant1", "db", None).await.unwrap();
        let released = a.release_vm("web").await.unwrap();
        assert_eq!(released.len(), 2);
        let left = a.list_leases(None, None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].0.vm, "db");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pools_lifecycle_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        let spec = PoolSpec {
            name: "volant1",
            subnet: "10.9.0.0/24",
            gateway: "10.9.0.1",
            range_start: "10.9.0.10",
            range_end: "10.9.0.20",
        };
        assert!(a.create_pool(spec).await.unwrap().1);
        assert!(
            !a.create_pool(spec).await.unwrap().1,
            "identical create is idempotent"
        );
        let differs = PoolSpec {
            range_end: "10.9.0.30",
            ..spec
        };
        assert!(matches!(
            a.create_pool(differs).await,
            Err(Error::Conflict(_))
        ));
        let overlap = PoolSpec {
            name: "other",
            subnet: "10.9.0.0/16",
            ..Default::default()
        };
        let err = a.create_pool(overlap).await.unwrap_err();
        assert!(
            err.to_string().contains("overlaps pool \"volant1\""),
            "{err}"
        );

        a.allocate("volant1", "web", None).await.unwrap();
        assert!(matches!(
            a.delete_pool("volant1", false).await,
            Err(Error::Precondition(_))
        ));
        let (deleted, released) = a.delete_pool("volant1", true).await.unwrap();
        assert!(deleted);
        assert_eq!(released.len(), 1);
        assert!(
            !a.delete_pool("volant1", false).await.unwrap().0,
            "idempotent"
        );
        // The config's pool goes only with force (the config brings it back at the next start).
        assert!(matches!(
            a.delete_pool("volant0", false).await,
            Err(Error::Precondition(_))
        ));
        assert_eq!(a.list_pools().await.unwrap().len(), 1);
        assert!(a.delete_pool("volant0", true).await.unwrap().0);
        assert!(a.list_pools().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn state_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let a = with_default(dir.path()).await;
            a.allocate("volant0", "a", None).await.unwrap();
            a.allocate("volant0", "b", None).await.unwrap();
            a.release("volant0", Target::Vm("a")).await.unwrap();
        }
        let a = with_default(dir.path()).await;
        let leases = a.list_leases(None, None).await.unwrap();
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].0.vm, "b");
        assert_eq!(leases[0].0.ip.to_string(), "192.168.127.101");
        let (l, _, _) = a.allocate("volant0", "c", None).await.unwrap();
        assert_eq!(l.ip.to_string(), "192.168.127.100");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn config_pool_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = with_default(dir.path()).await;
        a.allocate("volant0", "web", Some("192.168.127.120"))
            .await
            .unwrap();
        let mut narrower = Bridge::default();
        narrower.ip_range.start = "192.168.127.110".parse().unwrap();
        a.ensure_config_pool(&narrower).await.unwrap();
        assert_eq!(a.get_pool("volant0").await.unwrap().pool.capacity(), 145);
        narrower.ip_range.start = "192.168.127.130".parse().unwrap();
        let err = a.ensure_config_pool(&narrower).await.unwrap_err();
        assert!(err.to_string().contains("192.168.127.120 (web)"), "{err}");
    }
}
