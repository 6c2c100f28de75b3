//! eth0 and the default route, by netlink, from the command line.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

fn name_of(msg: &LinkMessage) -> String {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A netlink connection. Needs a Tokio runtime.
pub struct Net {
    handle: Handle,
}

impl Net {
    /// Connects.
    pub fn connect() -> Result<Net, String> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| format!("netlink: {e}"))?;
        tokio::spawn(conn);
        Ok(Net { handle })
    }

    /// The network interfaces, by name.
    pub async fn interfaces(&self) -> Result<Vec<(u32, String)>, String> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| format!("listing links: {e}"))?;
        Ok(links.iter().map(|l| (l.header.index, name_of(l))).collect())
    }

    async fn index(&self, name: &str) -> Result<Option<u32>, String> {
        Ok(self
            .interfaces()
            .await?
            .into_iter()
            .find(|(_, n)| n == name)
            .map(|(i, _)| i))
    }

    async fn up(&self, index: u32) -> Result<(), String> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| format!("setting link {index} up: {e}"))
    }

    /// Sets loopback up.
    pub async fn loopback(&self) -> Result<(), String> {
        let lo = self.index("lo").await?.ok_or("no loopback interface")?;
        self.up(lo).await
    }

    /// Waits for eth0 (its driver may still be probing), then gives it `ip`/`prefix` and, when
    /// given, a default route via `gw`.
    pub async fn configure_eth0(
        &self,
        ip: Ipv4Addr,
        prefix: u8,
        gw: Option<Ipv4Addr>,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let eth0 = loop {
            if let Some(i) = self.index("eth0").await? {
                break i;
            }
            if Instant::now() > deadline {
                return Err("eth0 did not appear within 10 s (is virtio_net loaded?)".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.handle
            .address()
            .add(eth0, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| format!("adding {ip}/{prefix} to eth0: {e}"))?;
        self.up(eth0).await?;
        if let Some(gw) = gw {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build();
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(|e| format!("adding the default route via {gw}: {e}"))?;
        }
        Ok(())
    }
}
