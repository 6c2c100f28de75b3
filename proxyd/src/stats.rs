//! Counters of every decision, per VM, for `GetStats`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use volant_services::api::proxy::v1 as pb;

/// One VM's counters since proxyd started, kept after it is unregistered.
#[derive(Default)]
pub struct Stats {
    /// Whether the VM has a route now.
    pub registered: AtomicBool,
    /// Ingress requests received.
    pub ingress_requests: AtomicU64,
    /// Ingress requests proxyd answered with an error itself.
    pub ingress_errors: AtomicU64,
    /// Egress requests and tunnels let through.
    pub egress_allowed: AtomicU64,
    /// Egress requests and tunnels refused.
    pub egress_denied: AtomicU64,
    /// Egress requests refused by the rate limit.
    pub egress_rate_limited: AtomicU64,
    /// Bytes from the guest outwards.
    pub egress_bytes_out: AtomicU64,
    /// Bytes from the outside to the guest.
    pub egress_bytes_in: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
}

/// An egress decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let through.
    Allow,
    /// Refused by a rule.
    Deny,
    /// Refused by a rate limit or a cap.
    Limit,
}

impl Stats {
    /// Counts one egress decision and its reason.
    pub fn decided(&self, verdict: Verdict, reason: &'static str) {
        crate::metrics::decided(verdict, reason);
        match verdict {
            Verdict::Allow => &self.egress_allowed,
            Verdict::Deny => &self.egress_denied,
            Verdict::Limit => &self.egress_rate_limited,
        }
        .fetch_add(1, Relaxed);
        *self
            .reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason.to_string())
            .or_default() += 1;
    }

    /// The counters as the API shows them.
    pub fn to_pb(&self, vm: &str) -> pb::VmStats {
        pb::VmStats {
            vm: vm.to_string(),
            ingress_requests: self.ingress_requests.load(Relaxed),
            ingress_errors: self.ingress_errors.load(Relaxed),
            egress_allowed: self.egress_allowed.load(Relaxed),
            egress_denied: self.egress_denied.load(Relaxed),
            egress_rate_limited: self.egress_rate_limited.load(Relaxed),
            egress_bytes_out: self.egress_bytes_out.load(Relaxed),
            egress_bytes_in: self.egress_bytes_in.load(Relaxed),
            reasons: self
                .reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            registered: self.registered.load(Relaxed),
        }
    }
}
