//! proxyd's instruments: ingress requests and their latency by status, egress decisions by
//! reason, egress bytes per VM and direction, and the tunnels open.

use std::sync::LazyLock;
use std::time::Duration;

use volant_services::metrics::{
    Counter, Histogram, KeyValue, REQUEST_SECONDS, UpDownCounter, meter,
};

use crate::stats::Verdict;

struct Instruments {
    ingress: Histogram<f64>,
    decisions: Counter<u64>,
    bytes: Counter<u64>,
    tunnels: UpDownCounter<i64>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let m = meter();
    Instruments {
        ingress: m
            .f64_histogram("volant.proxy.ingress.duration")
            .with_unit("s")
            .with_description("Ingress requests to workloads and how long their answers took, by method and status (proxyd's own refusals included).")
            .with_boundaries(REQUEST_SECONDS.to_vec())
            .build(),
        decisions: m
            .u64_counter("volant.proxy.egress.decisions")
            .with_description("Egress decisions, by decision (allow, deny, limit) and reason.")
            .build(),
        bytes: m
            .u64_counter("volant.proxy.egress.io")
            .with_unit("By")
            .with_description("Egress bytes carried, per VM and direction (transmit: from the guest outwards).")
            .build(),
        tunnels: m
            .i64_up_down_counter("volant.proxy.egress.tunnels")
            .with_unit("{tunnel}")
            .with_description("Egress tunnels (CONNECT) open now.")
            .build(),
    }
});

/// Makes the instruments, so that the open tunnels read 0 before the first one.
pub fn init() {
    INSTRUMENTS.tunnels.add(0, &[]);
}

/// Records one ingress request answered with `status` after `took`.
pub fn ingress(method: &'static str, status: u16, took: Duration) {
    INSTRUMENTS.ingress.record(
        took.as_secs_f64(),
        &[
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ],
    );
}

/// The name a verdict is recorded under.
pub fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Limit => "limit",
    }
}

/// Records one egress decision.
pub fn decided(v: Verdict, reason: &'static str) {
    INSTRUMENTS.decisions.add(
        1,
        &[
            KeyValue::new("volant.decision", verdict(v)),
            KeyValue::new("volant.reason", reason),
        ],
    );
}

/// The attributes of one VM's egress bytes, each way, made once: counting happens per chunk
/// carried.
pub struct IoLabels([[KeyValue; 2]; 2]);

impl IoLabels {
    /// VM `vm`'s.
    pub fn of(vm: &str) -> IoLabels {
        let vm: std::sync::Arc<str> = vm.into();
        let way = |direction: &'static str| {
            [
                KeyValue::new("volant.vm", vm.clone()),
                KeyValue::new("network.io.direction", direction),
            ]
        };
        IoLabels([way("transmit"), way("receive")])
    }

    /// Records `n` bytes carried outwards or back.
    pub fn carried(&self, outbound: bool, n: u64) {
        INSTRUMENTS.bytes.add(n, &self.0[usize::from(!outbound)]);
    }
}

/// Counts a tunnel open for as long as it lives.
pub struct Tunnel(());

impl Tunnel {
    /// A tunnel opens.
    pub fn open() -> Tunnel {
        INSTRUMENTS.tunnels.add(1, &[]);
        Tunnel(())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        INSTRUMENTS.tunnels.add(-1, &[]);
    }
}
