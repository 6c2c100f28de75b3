//! Links, addresses, routes and the bridge forwarding database, through rtnetlink.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage, State,
};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, RouteMessageBuilder};

/// A network interface as netd sees it.
#[derive(Clone, Debug, Default)]
pub struct Link {
    /// Kernel index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// `bridge`, `tun`, `veth`, …; empty when the kernel reports no kind.
    pub kind: String,
    /// Administratively up.
    pub up: bool,
    /// Operational state, lower case (`up`, `down`, `lowerlayerdown`, …).
    pub state: String,
    /// Hardware address.
    pub mac: Vec<u8>,
    /// Index of the bridge it is enslaved to.
    pub master: Option<u32>,
    /// Its alias (netd marks its bridges with one).
    pub alias: String,
    /// Its link group.
    pub group: u32,
}

/// An entry of a bridge's forwarding database.
#[derive(Clone, Debug)]
pub struct Fdb {
    /// The MAC address.
    pub mac: Vec<u8>,
    /// The port's interface index.
    pub port: u32,
    /// Not learned: the bridge's or a port's own address.
    pub permanent: bool,
}

/// A netlink failure, as text.
pub type Error = String;

fn nl(context: &str) -> impl Fn(rtnetlink::Error) -> Error + '_ {
    move |e| format!("{context}: {e}")
}

fn link_of(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Default::default()
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Controller(m) => link.master = Some(m),
            LinkAttribute::IfAlias(a) => link.alias = a,
            LinkAttribute::Group(g) => link.group = g,
            LinkAttribute::OperState(s) => {
                link.state = match s {
                    State::Up => "up".into(),
                    State::Down => "down".into(),
                    State::LowerLayerDown => "lowerlayerdown".into(),
                    State::Dormant => "dormant".into(),
                    State::NotPresent => "notpresent".into(),
                    State::Testing => "testing".into(),
                    _ => "unknown".into(),
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let NlLinkInfo::Kind(kind) = info {
                        link.kind = match kind {
                            InfoKind::Bridge => "bridge".into(),
                            InfoKind::Tun => "tun".into(),
                            InfoKind::Veth => "veth".into(),
                            other => format!("{other:?}").to_lowercase(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// The rtnetlink side of netd.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Opens a netlink connection in the current network namespace. Needs a Tokio runtime.
    pub fn connect() -> std::io::Result<Links> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// Every link.
    pub async fn list(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing links"))?;
        Ok(msgs.into_iter().map(link_of).collect())
    }

    /// The link called `name`, if any.
    pub async fn get(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(msg) => Ok(msg.map(link_of)),
            // ENODEV: no such device.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(format!("reading link {name}: {e}")),
        }
    }

    /// Creates a bridge, up, with a fixed MAC address.
    pub async fn add_bridge(&self, name: &str, mac: &[u8]) -> Result<(), Error> {
        let msg = LinkBridge::new(name).address(mac.to_vec()).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(&format!("creating bridge {name}")))
    }

    /// Sets the alias of an existing link.
    pub async fn set_alias(&self, index: u32, alias: &str) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).alias(alias).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("setting a link alias"))
    }

    /// Sets a link up.
    pub async fn set_up(&self, index: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).up();
        self.handle
            .link()
            .set(msg.build())
            .execute()
            .await
            .map_err(nl("setting a link up"))
    }

    /// Deletes a link; a link that is already gone is success.
    pub async fn delete(&self, index: u32) -> Result<(), Error> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(format!("deleting link {index}: {e}")),
        }
    }

    /// Moves a link to `group`.
    pub async fn set_group(&self, index: u32, group: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index).link_group(group).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("moving a link to its group"))
    }

    /// Sets a link up, enslaved to `bridge`, in the default group, in one message.
    pub async fn attach(&self, index: u32, bridge: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(index)
            .up()
            .controller(bridge)
            .link_group(0)
            .build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl("attaching a link to its bridge"))
    }

    /// Deletes every link of `group` in one kernel operation, which pays the cost of
    /// unregistering devices (an RCU grace period) once for all of them.
    pub async fn delete_group(&self, group: u32) -> Result<(), Error> {
        let msg = LinkUnspec::new_with_index(0).link_group(group).build();
        match self.handle.link().del_with_message(msg).execute().await {
            // ENODEV: the group is empty.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            other => other.map_err(nl("deleting retired links")),
        }
    }

    /// The addresses of a link, with their prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, Error> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => {
                        Some((*ip, m.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds an address to a link.
    pub async fn add_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<(), Error> {
        self.handle
            .address()
            .add(index, ip, prefix)
            .execute()
            .await
            .map_err(nl(&format!("adding address {ip}/{prefix}")))
    }

    /// Removes an address from a link.
    pub async fn delete_address(&self, index: u32, ip: IpAddr) -> Result<(), Error> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(ip)
            .execute()
            .try_collect()
            .await
            .map_err(nl("finding an address"))?;
        for msg in msgs {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl(&format!("removing address {ip}")))?;
        }
        Ok(())
    }

    /// The IPv4 routes of the main table: destination and outgoing interface.
    pub async fn routes(&self) -> Result<Vec<(IpNet, Option<u32>)>, Error> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.table == 254)
            .filter_map(|m| {
                let prefix = m.header.destination_prefix_length;
                let mut dst = None;
                let mut oif = None;
                for attr in &m.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let dst = dst.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                IpNet::new(IpAddr::V4(dst), prefix).ok().map(|n| (n, oif))
            })
            .collect())
    }

    /// The forwarding database entries of the bridge `bridge` (`bridge fdb show br <bridge>`).
    pub async fn fdb(&self, bridge: u32) -> Result<Vec<Fdb>, Error> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("reading the forwarding database"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let mut mac = None;
                let mut master = None;
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::LinkLayerAddress(a) => mac = Some(a.clone()),
                        NeighbourAttribute::Controller(c) => master = Some(*c),
                        _ => {}
                    }
                }
                let on_bridge = m.header.ifindex == bridge || master == Some(bridge);
                let mac = mac?;
                // Multicast entries (33:33:…, 01:00:5e:…) are not stations.
                (on_bridge && mac.first().is_some_and(|b| b & 1 == 0)).then(|| Fdb {
                    mac,
                    port: m.header.ifindex,
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }
}
