//! ipamd's instruments: each pool's size and the leases in use in it.

use std::sync::Arc;

use volant_services::metrics::{KeyValue, meter};

use crate::allocator::Allocator;

/// Reports `volant.ipam.pool.size` (addresses a pool can lease) and `volant.ipam.leases` (leased
/// now), per pool (`volant.pool`), read from `allocator` at each collection.
pub fn watch(allocator: Arc<Allocator>) {
    let m = meter();
    let a = allocator.clone();
    m.u64_observable_gauge("volant.ipam.pool.size")
        .with_unit("{address}")
        .with_description("Addresses each pool can lease (its range).")
        .with_callback(move |o| {
            for v in a.occupancy() {
                let size = u64::try_from(v.pool.capacity()).unwrap_or(u64::MAX);
                o.observe(size, &[KeyValue::new("volant.pool", v.pool.name)]);
            }
        })
        .build();
    m.u64_observable_gauge("volant.ipam.leases")
        .with_unit("{lease}")
        .with_description("Addresses leased now, per pool.")
        .with_callback(move |o| {
            for v in allocator.occupancy() {
                o.observe(
                    v.leased as u64,
                    &[KeyValue::new("volant.pool", v.pool.name)],
                );
            }
        })
        .build();
}
