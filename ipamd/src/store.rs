//! The storage contract of ipamd. Swapping the engine means writing one file that implements
//! [`Store`]; everything else talks to this trait.

use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::pool::Pool;

/// A lease as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The pool it belongs to.
    pub pool: String,
    /// The leased address.
    pub ip: IpAddr,
    /// The VM that holds it.
    pub vm: String,
    /// When it was leased.
    pub leased_at: SystemTime,
}

/// One change to the stored state.
#[derive(Clone, Debug)]
pub enum Change {
    /// Create or replace a pool.
    PutPool(Pool),
    /// Remove a pool (its leases are removed by their own changes).
    DeletePool(String),
    /// Create or replace a lease.
    PutLease(Lease),
    /// Remove the lease of `ip` in `pool`.
    DeleteLease {
        /// The pool.
        pool: String,
        /// The address.
        ip: IpAddr,
    },
}

/// Everything stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// All pools.
    pub pools: Vec<Pool>,
    /// All leases.
    pub leases: Vec<Lease>,
}

/// A storage engine failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// Durable storage of pools and leases.
pub trait Store: Send + Sync + 'static {
    /// Reads everything.
    fn load(&self) -> Result<Stored, StoreError>;
    /// Applies the changes atomically: all or none. They need not be durable yet.
    fn apply(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Makes every change applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
}
