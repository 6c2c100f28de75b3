//! Networks: vmmd owns their lifecycle. A network is ipamd's pool and netd's bridge of one name,
//! made pool first (so that proxyd, which learns networks here, denies the subnet before the
//! bridge exists) and removed bridge first; a bridge that cannot be made takes its new pool back.

use super::*;
use crate::peers::{ipam, net};

impl Vmm {
    /// Creates a network (or confirms an identical one): it as made, and whether it is new.
    pub async fn create_network(
        &self,
        bridge: net::Network,
        range: (String, String),
    ) -> Result<(pb::Network, bool)> {
        dns_label("network name", &bridge.name).map_err(Error::invalid)?;
        let _one = self.network_changes.lock().await;
        let pool = ipam::Pool {
            name: bridge.name.clone(),
            subnet: bridge.subnet.clone(),
            gateway: bridge.gateway.clone(),
            range_start: range.0,
            range_end: range.1,
            ..Default::default()
        };
        let (pool, new_pool) = self.peers.create_pool(pool).await?;
        let bridge = net::Network {
            gateway: pool.gateway.clone(),
            status: None,
            ..bridge
        };
        let name = bridge.name.clone();
        match self.peers.ensure_network(bridge, false).await {
            Ok((bridge, new_bridge)) => Ok((
                pb::Network {
                    bridge: Some(bridge),
                    pool: Some(pool),
                },
                new_pool || new_bridge,
            )),
            Err(e) => {
                if new_pool && let Err(undo) = self.peers.delete_pool(&name, true).await {
                    tracing::warn!(network = %name, "taking back the pool of a failed network: {undo}");
                }
                Err(e)
            }
        }
    }

    /// Changes `nat` of network `name`.
    pub async fn update_network(&self, name: &str, nat: bool) -> Result<pb::Network> {
        dns_label("network name", name).map_err(Error::invalid)?;
        let _one = self.network_changes.lock().await;
        let mut bridge = self
            .peers
            .networks()
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::not_found(format!("network {name:?} does not exist")))?;
        bridge.nat = nat;
        bridge.status = None;
        self.peers.ensure_network(bridge, true).await?;
        self.network(name).await
    }

    /// Deletes network `name`: its bridge, then its pool. Refused while VMs are on it, unless
    /// `force`.
    pub async fn delete_network(&self, name: &str, force: bool) -> Result<()> {
        dns_label("network name", name).map_err(Error::invalid)?;
        let _one = self.network_changes.lock().await;
        let users: Vec<String> = self
            .list()
            .into_iter()
            .filter(|v| v.mode == Mode::Bridge && v.network == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() && !force {
            return Err(Error::precondition(format!(
                "network {name:?} has vm(s) {}; delete them first, or delete it with force",
                users.join(", ")
            )));
        }
        self.peers.delete_network(name, force).await?;
        self.peers.delete_pool(name, force).await
    }

    /// Every network, by name: a pool without its bridge (being made) or a bridge without its
    /// pool (made by hand) included.
    pub async fn networks(&self) -> Result<Vec<pb::Network>> {
        let (bridges, mut pools) = (self.peers.networks().await?, self.peers.pools().await?);
        let mut all: Vec<pb::Network> = bridges
            .into_iter()
            .map(|b| {
                let pool = pools
                    .iter()
                    .position(|p| p.name == b.name)
                    .map(|i| pools.remove(i));
                pb::Network {
                    bridge: Some(b),
                    pool,
                }
            })
            .collect();
        all.extend(pools.into_iter().map(|p| pb::Network {
            bridge: None,
            pool: Some(p),
        }));
        all.sort_by(|a, b| network_name(a).cmp(network_name(b)));
        Ok(all)
    }

    /// Network `name`.
    pub async fn network(&self, name: &str) -> Result<pb::Network> {
        self.networks()
            .await?
            .into_iter()
            .find(|n| network_name(n) == name)
            .ok_or_else(|| Error::not_found(format!("network {name:?} does not exist")))
    }
}

impl Vmm {
    /// Network `name` when it has no pool yet but the host has a bridge of that name with an
    /// address (made by hand, as the networking guide does): adopted as a network, its pool from
    /// the bridge's address (.100–.254 of a /24), forwarding and NAT as for any network. Returns
    /// what was done, for the caller's answer.
    pub(super) async fn adopt_bridge(&self, name: &str) -> Result<Option<String>> {
        if self.peers.pools().await?.iter().any(|p| p.name == name) {
            return Ok(None);
        }
        let (ip, prefix) = match self.peers.inspect_bridge(name).await {
            Ok(found) => found,
            Err(e) if e.kind() == Kind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let subnet = ipnet::IpNet::new(ip, prefix)
            .map_err(|e| Error::internal(format!("the bridge {name}'s address: {e}")))?
            .trunc();
        let bridge = net::Network {
            name: name.to_string(),
            subnet: subnet.to_string(),
            gateway: ip.to_string(),
            nat: true,
            status: None,
        };
        let (made, _) = self.create_network(bridge, Default::default()).await?;
        let range = made
            .pool
            .map(|p| format!("{}–{}", p.range_start, p.range_end))
            .unwrap_or_default();
        let note = format!(
            "adopted the bridge {name} ({ip}/{prefix}) as network {name}: addresses {range} \
             are leased, with forwarding and NAT as for any network"
        );
        tracing::info!(network = %name, "{note}");
        Ok(Some(note))
    }
}

/// A network's name, from whichever half it has.
pub fn network_name(n: &pb::Network) -> &str {
    n.bridge
        .as_ref()
        .map(|b| b.name.as_str())
        .or(n.pool.as_ref().map(|p| p.name.as_str()))
        .unwrap_or_default()
}
