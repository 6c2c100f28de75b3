//! The VMs the proxy route has asked vmmd about, kept so that a proxied request does not cost a
//! `GetVm`. vmmd's event stream keeps them true: every event about a VM (any change of status,
//! its deletion) forgets what was kept of it, and while the stream is not open nothing is kept
//! at all, so a VM deleted and its name, address or CID given to another is never served from a
//! stale record. An answer that an event overtook is not kept.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio_stream::StreamExt as _;
use volant_services::Channel;
use volant_services::api::vmm::v1 as vmm;
use volant_services::api::vmm::v1::vmm_client::VmmClient;

use crate::peers::{READ, open_stream, req};

/// The VMs kept, and whether they can be.
#[derive(Default)]
pub struct Known(Mutex<State>);

#[derive(Default)]
struct State {
    /// The event stream is open: what is kept is kept true.
    live: bool,
    /// Counts events and reconnections; an answer asked for before a change is not kept.
    epoch: u64,
    vms: HashMap<String, vmm::Vm>,
}

impl Known {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM `name`, kept or asked of vmmd.
    pub async fn get(
        &self,
        vmm: &VmmClient<Channel>,
        name: &str,
    ) -> Result<vmm::Vm, tonic::Status> {
        self.get_or(name, || async {
            let asked = vmm::GetVmRequest {
                name: name.to_string(),
            };
            vmm.clone()
                .get_vm(req(asked, READ))
                .await?
                .into_inner()
                .vm
                .ok_or_else(|| tonic::Status::internal("vmmd answered without a VM"))
        })
        .await
    }

    /// The VM `name`, kept or answered by `ask`; the answer is kept when nothing changed
    /// while it was asked for.
    async fn get_or<F: Future<Output = Result<vmm::Vm, tonic::Status>>>(
        &self,
        name: &str,
        ask: impl FnOnce() -> F,
    ) -> Result<vmm::Vm, tonic::Status> {
        let epoch = {
            let s = self.state();
            if let Some(vm) = s.vms.get(name) {
                return Ok(vm.clone());
            }
            s.epoch
        };
        let vm = ask().await?;
        let mut s = self.state();
        if s.live && s.epoch == epoch {
            s.vms.insert(name.to_string(), vm.clone());
        }
        Ok(vm)
    }

    /// Forgets `name`, which the gateway has just changed (its event may not be here yet).
    pub fn forget(&self, name: &str) {
        let live = self.state().live;
        self.changed(Some(name), live);
    }

    /// A change: `name` (or, without a name, everything) is forgotten, and answers under way
    /// are not kept.
    fn changed(&self, name: Option<&str>, live: bool) {
        let mut s = self.state();
        s.epoch += 1;
        s.live = live;
        match name {
            Some(n) => {
                s.vms.remove(n);
            }
            None => s.vms.clear(),
        }
    }

    /// Follows vmmd's events for as long as the gateway runs, opening the stream again when it
    /// ends.
    pub async fn follow(&self, vmm: VmmClient<Channel>) {
        loop {
            let mut client = vmm.clone();
            let opened = open_stream(client.watch_events(vmm::WatchEventsRequest::default()));
            match opened.await {
                Ok(mut events) => {
                    // Events from here on reach us; what came before is forgotten.
                    self.changed(None, true);
                    while let Some(Ok(event)) = events.next().await {
                        self.changed(Some(&event.name), true);
                    }
                    self.changed(None, false);
                    tracing::info!("vmmd's event stream ended; VMs are asked for until it is back");
                }
                Err(e) => {
                    self.changed(None, false);
                    tracing::debug!("vmmd's event stream: {}", e.message());
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn vm(ip: &str) -> vmm::Vm {
        vmm::Vm {
            name: "a".into(),
            ip_address: ip.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn kept_only_while_the_events_can_tell_it_is_still_true() {
        let known = Known::default();
        let asked = AtomicUsize::new(0);
        let get = |ip: &'static str| {
            let asked = &asked;
            let known = &known;
            async move {
                let got = known
                    .get_or("a", || async {
                        asked.fetch_add(1, Ordering::SeqCst);
                        Ok(vm(ip))
                    })
                    .await;
                got.unwrap().ip_address
            }
        };
        // No event stream yet: every request asks.
        get("10.0.0.1").await;
        get("10.0.0.1").await;
        assert_eq!(asked.load(Ordering::SeqCst), 2);
        // The stream is open: kept.
        known.changed(None, true);
        get("10.0.0.1").await;
        assert_eq!(get("10.0.0.2").await, "10.0.0.1");
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        // An event about it (deleted, its address given to another): asked again.
        known.changed(Some("a"), true);
        assert_eq!(get("10.0.0.2").await, "10.0.0.2");
        // An event about another VM forgets nothing of it.
        known.changed(Some("b"), true);
        assert_eq!(get("10.0.0.3").await, "10.0.0.2");
        // An answer that an event overtook is not kept.
        known.forget("a");
        let stale = known
            .get_or("a", || async {
                known.changed(Some("a"), true);
                Ok(vm("10.0.0.4"))
            })
            .await
            .unwrap();
        assert_eq!(stale.ip_address, "10.0.0.4");
        assert_eq!(get("10.0.0.5").await, "10.0.0.5");
        // The stream ends: nothing is kept until it is back.
        known.changed(None, false);
        assert_eq!(get("10.0.0.6").await, "10.0.0.6");
        assert_eq!(get("10.0.0.7").await, "10.0.0.7");
    }
}
