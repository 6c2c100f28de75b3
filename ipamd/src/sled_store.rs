//! [`Store`] on sled: one tree, keys `pool/<name>` and `lease/<pool>/<address bytes>`, JSON
//! values, atomic batches.

use std::path::Path;

use crate::pool::Pool;
use crate::store::{Change, Lease, Store, StoreError, Stored};

const POOL: &[u8] = b"pool/";
const LEASE: &[u8] = b"lease/";

/// The sled store of ipamd.
pub struct SledStore {
    db: sled::Db,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn encode(value: &impl serde::Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(err)
}

fn pool_key(name: &str) -> Vec<u8> {
    [POOL, name.as_bytes()].concat()
}

fn lease_key(pool: &str, ip: std::net::IpAddr) -> Vec<u8> {
    let addr = match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    [LEASE, pool.as_bytes(), b"/", &addr].concat()
}

impl SledStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let db = volant_services::store::open_sled(&dir.join("ipam.sled"), 16 << 20)
            .map_err(StoreError)?;
        Ok(SledStore { db })
    }
}

impl Store for SledStore {
    fn load(&self) -> Result<Stored, StoreError> {
        let mut stored = Stored::default();
        for item in self.db.scan_prefix(POOL) {
            let (_, v) = item.map_err(err)?;
            stored
                .pools
                .push(serde_json::from_slice::<Pool>(&v).map_err(err)?);
        }
        for item in self.db.scan_prefix(LEASE) {
            let (_, v) = item.map_err(err)?;
            stored
                .leases
                .push(serde_json::from_slice::<Lease>(&v).map_err(err)?);
        }
        Ok(stored)
    }

    fn apply(&self, changes: &[Change]) -> Result<(), StoreError> {
        // A single insert or remove is atomic by itself and costs half as much as a batch.
        if let [change] = changes {
            return match change {
                Change::PutPool(p) => self.db.insert(pool_key(&p.name), encode(p)?).map(drop),
                Change::DeletePool(name) => self.db.remove(pool_key(name)).map(drop),
                Change::PutLease(l) => self
                    .db
                    .insert(lease_key(&l.pool, l.ip), encode(l)?)
                    .map(drop),
                Change::DeleteLease { pool, ip } => self.db.remove(lease_key(pool, *ip)).map(drop),
            }
            .map_err(err);
        }
        let mut batch = sled::Batch::default();
        for change in changes {
            match change {
                Change::PutPool(p) => batch.insert(pool_key(&p.name), encode(p)?),
                Change::DeletePool(name) => batch.remove(pool_key(name)),
                Change::PutLease(l) => batch.insert(lease_key(&l.pool, l.ip), encode(l)?),
                Change::DeleteLease { pool, ip } => batch.remove(lease_key(pool, *ip)),
            }
        }
        self.db.apply_batch(batch).map_err(err)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(err)
    }
}
