//! The subnets egress never reaches besides the built-in list: the configured ones, the
//! configured bridge's, and every Volant network whenever it was made. Networks are learnt from
//! vmmd, their owner, which lists a network from the moment its pool exists (before its bridge),
//! and re-read every second; a change reaches tunnels already open.

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::watch;
use volant_services::Channel;
use volant_services::api::vmm::v1 as vmm;
use volant_services::api::vmm::v1::vmm_client::VmmClient;

/// How often the networks are read.
const EVERY: Duration = Duration::from_secs(1);

/// The denied subnets now.
pub struct Denied {
    fixed: Vec<IpNet>,
    now: watch::Sender<Arc<Vec<IpNet>>>,
}

impl Denied {
    /// Denies `fixed` until networks are learnt.
    pub fn new(fixed: Vec<IpNet>) -> Denied {
        let now = watch::Sender::new(Arc::new(fixed.clone()));
        Denied { fixed, now }
    }

    /// The subnets denied now.
    pub fn now(&self) -> Arc<Vec<IpNet>> {
        self.now.borrow().clone()
    }

    /// Hears of every change.
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<IpNet>>> {
        self.now.subscribe()
    }

    /// Sets the networks learnt; returns whether the list changed.
    pub fn learnt(&self, networks: impl IntoIterator<Item = IpNet>) -> bool {
        let mut all = self.fixed.clone();
        all.extend(networks);
        all.sort();
        all.dedup();
        self.now.send_if_modified(|now| {
            let changed = **now != all;
            if changed {
                *now = Arc::new(all);
            }
            changed
        })
    }

    /// Keeps the list in step with vmmd's networks, for as long as proxyd runs. While vmmd
    /// cannot be reached the last list learnt stays.
    pub async fn follow(self: Arc<Self>, channel: Channel) {
        let mut vmm = VmmClient::new(channel);
        let mut reached = None;
        loop {
            let mut req = tonic::Request::new(vmm::ListNetworksRequest::default());
            req.set_timeout(Duration::from_secs(2));
            match vmm.list_networks(req).await {
                Ok(res) => {
                    let mut nets = Vec::new();
                    for n in res.into_inner().networks {
                        let subnets = n
                            .pool
                            .map(|p| (p.name, p.subnet))
                            .into_iter()
                            .chain(n.bridge.map(|b| (b.name, b.subnet)));
                        for (name, subnet) in subnets {
                            match subnet.parse::<IpNet>() {
                                Ok(n) => nets.push(n.trunc()),
                                Err(_) => {
                                    tracing::warn!(network = %name, %subnet, "egress: a network's subnet does not parse")
                                }
                            }
                        }
                    }
                    if reached != Some(true) {
                        tracing::info!("egress: Volant networks are learnt from vmmd");
                    }
                    reached = Some(true);
                    if self.learnt(nets) {
                        tracing::info!(denied = ?self.now(), "egress: denied subnets");
                    }
                }
                Err(e) => {
                    if reached != Some(false) {
                        tracing::warn!(
                            "egress: cannot list Volant networks from vmmd ({}); the last ones \
                             learnt and the configured ones stay denied",
                            e.message()
                        );
                    }
                    reached = Some(false);
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learnt_networks_join_the_fixed_ones() {
        let fixed: IpNet = "192.168.127.0/24".parse().unwrap();
        let d = Denied::new(vec![fixed]);
        let mut w = d.watch();
        let other: IpNet = "198.51.100.0/24".parse().unwrap();
        assert!(d.learnt([other, fixed]));
        assert!(w.has_changed().unwrap());
        assert_eq!(*w.borrow_and_update().clone(), vec![fixed, other]);
        assert!(!d.learnt([other]), "the same list again is no change");
        assert!(d.learnt([]));
        assert_eq!(*d.now(), vec![fixed]);
    }
}
