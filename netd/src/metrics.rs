//! netd's instruments: how long syncing its rules takes, and the TAPs of each network.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use volant_services::metrics::{Histogram, KeyValue, REQUEST_SECONDS, meter};

use crate::control::Netd;

static RULE_SYNC: LazyLock<Histogram<f64>> = LazyLock::new(|| {
    meter()
        .f64_histogram("volant.netd.rule_sync.duration")
        .with_unit("s")
        .with_description("How long one sync of netd's rules took (read, plan, one atomic write), by table (iptables, ebtables) and outcome.")
        .with_boundaries(REQUEST_SECONDS.to_vec())
        .build()
});

/// Records one sync of `table` that took `took`.
pub fn rule_sync(table: &'static str, took: Duration, ok: bool) {
    RULE_SYNC.record(
        took.as_secs_f64(),
        &[
            KeyValue::new("volant.table", table),
            KeyValue::new("volant.outcome", if ok { "ok" } else { "failed" }),
        ],
    );
}

/// Reports `volant.netd.taps`, the TAPs of each network (`volant.network`), read from `netd`
/// at each collection (the last count while a change holds the state).
pub fn watch_taps(netd: Arc<Netd>) {
    let last = Mutex::new(Vec::new());
    meter()
        .u64_observable_gauge("volant.netd.taps")
        .with_unit("{tap}")
        .with_description("TAPs per network.")
        .with_callback(move |o| {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(now) = netd.tap_counts() {
                *last = now;
            }
            for (network, taps) in last.iter() {
                o.observe(*taps, &[KeyValue::new("volant.network", network.clone())]);
            }
        })
        .build();
}
