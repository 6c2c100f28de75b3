//! vmmd's instruments: VMs by state, the duration and failures of each operation, the undoing
//! of failed creates, and the repairs reconciliation makes.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use volant_services::metrics::{Counter, Histogram, KeyValue, OPERATION_SECONDS, meter};

use crate::error::Kind;
use crate::records::Status;
use crate::vmm::Vmm;

struct Instruments {
    operations: Histogram<f64>,
    failures: Counter<u64>,
    compensations: Counter<u64>,
    repairs: Counter<u64>,
}

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let m = meter();
    Instruments {
        operations: m
            .f64_histogram("volant.vm.operation.duration")
            .with_unit("s")
            .with_description("How long VM operations took (create includes the boot), by operation and outcome.")
            .with_boundaries(OPERATION_SECONDS.to_vec())
            .build(),
        failures: m
            .u64_counter("volant.vm.operation.failures")
            .with_description("VM operations that failed, by operation and reason (error.type).")
            .build(),
        compensations: m
            .u64_counter("volant.vm.create.compensations")
            .with_description("Creates undone step by step after a failure, by reason and by what was kept (undone: nothing; failed: a failed VM).")
            .build(),
        repairs: m
            .u64_counter("volant.reconcile.repairs")
            .with_description("Repairs reconciliation made to a peer or to a VM, by repair and outcome.")
            .build(),
    }
});

/// The reason a failure is counted under: the kind of error, as a stable lower-case name.
pub fn reason(kind: Kind) -> &'static str {
    match kind {
        Kind::Invalid => "invalid",
        Kind::NotFound => "not_found",
        Kind::Exists => "exists",
        Kind::Precondition => "precondition",
        Kind::Exhausted => "exhausted",
        Kind::Unavailable => "unavailable",
        Kind::Internal => "internal",
    }
}

/// Records one operation (`create`, `delete`, `start`, `stop`, `restart`) that took `took` and
/// failed with `error`, if it did.
pub fn operation(op: &'static str, took: Duration, error: Option<Kind>) {
    let i = &*INSTRUMENTS;
    let mut attrs = vec![KeyValue::new("volant.operation", op)];
    if let Some(kind) = error {
        attrs.push(KeyValue::new("error.type", reason(kind)));
        i.failures.add(1, &attrs);
    }
    i.operations.record(took.as_secs_f64(), &attrs);
}

/// Records a create undone after failing with `kind`; `kept` names what remains (`undone`: no
/// record; `failed`: a failed VM; `restart`: undone when vmmd started again).
pub fn compensated(kind: Option<Kind>, kept: &'static str) {
    let mut attrs = vec![KeyValue::new("volant.kept", kept)];
    if let Some(kind) = kind {
        attrs.push(KeyValue::new("error.type", reason(kind)));
    }
    INSTRUMENTS.compensations.add(1, &attrs);
}

/// Records one repair of reconciliation and whether it worked.
pub fn repaired(repair: &'static str, ok: bool) {
    INSTRUMENTS.repairs.add(
        1,
        &[
            KeyValue::new("volant.repair", repair),
            KeyValue::new("volant.outcome", if ok { "ok" } else { "failed" }),
        ],
    );
}

/// Reports `volant.vms`, the VMs by state, read from `vmm` at each collection.
pub fn watch_vms(vmm: Arc<Vmm>) {
    meter()
        .u64_observable_gauge("volant.vms")
        .with_unit("{vm}")
        .with_description("VMs by state (volant.vm.state).")
        .with_callback(move |o| {
            let statuses = vmm.statuses();
            // Every state, the empty ones as 0.
            for state in Status::ALL {
                let n = statuses.iter().filter(|s| **s == state).count() as u64;
                o.observe(n, &[KeyValue::new("volant.vm.state", state.as_str())]);
            }
        })
        .build();
}
