//! What netd was asked for: networks, TAPs and port forwards, validated and persisted in sled
//! before anything touches the kernel.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use volant_services::validate::{dns_label, host_in, interface_name, ip, ipv4_subnet};

use crate::naming::{guest_mac, tap_name};

/// A network: a bridge with the gateway address, forwarding, and optionally NAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Bridge name.
    pub name: String,
    /// Subnet.
    pub subnet: IpNet,
    /// The bridge's address.
    pub gateway: IpAddr,
    /// Masquerade outgoing traffic.
    pub nat: bool,
}

impl Network {
    /// Validates a request; an empty gateway means the first host address.
    pub fn validate(name: &str, subnet: &str, gateway: &str, nat: bool) -> Result<Network, String> {
        interface_name("network name", name)?;
        let subnet = ipv4_subnet("subnet", subnet)?;
        let gateway = if gateway.trim().is_empty() {
            subnet.hosts().next().expect("a /30 or larger has hosts")
        } else {
            host_in("gateway", ip("gateway", gateway)?, &subnet)?
        };
        Ok(Network {
            name: name.to_string(),
            subnet,
            gateway,
            nat,
        })
    }

    /// The subnets share an address.
    pub fn overlaps(&self, other: &IpNet) -> bool {
        self.subnet.contains(&other.network()) || other.contains(&self.subnet.network())
    }
}

/// A VM's TAP device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tap {
    /// The VM.
    pub vm: String,
    /// The network it is attached to.
    pub network: String,
    /// Device name.
    pub name: String,
    /// The guest NIC's MAC.
    pub mac: [u8; 6],
    /// The VM's leased address: the only source address its frames may carry. Records written
    /// before netd knew it have none, and their TAP passes nothing until it is created again.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// The uid whose processes may attach (the VM's hypervisor); `None`: netd's own.
    #[serde(default)]
    pub owner: Option<u32>,
}

impl Tap {
    /// Validates a request and derives the device name and MAC. Where the address lies is the
    /// caller's to check against the network.
    pub fn validate(network: &str, vm: &str, ip: &str, owner: u32) -> Result<Tap, String> {
        interface_name("network", network)?;
        dns_label("vm", vm)?;
        if ip.trim().is_empty() {
            return Err(
                "ip is required: the VM's leased address, the only one its TAP lets through".into(),
            );
        }
        let ip = match volant_services::validate::ip("ip", ip)? {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => return Err(format!("ip {v6} is not an IPv4 address")),
        };
        Ok(Tap {
            vm: vm.to_string(),
            network: network.to_string(),
            name: tap_name(vm),
            mac: guest_mac(vm),
            ip: Some(ip),
            owner: (owner != 0).then_some(owner),
        })
    }
}

/// A transport protocol of a port forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Parses `tcp` or `udp`; empty means `tcp`.
    pub fn parse(text: &str) -> Result<Protocol, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(format!("protocol {other:?} is neither tcp nor udp")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A port forward: DNAT from a host port to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Host port.
    pub host_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// The VM's address.
    pub vm_ip: IpAddr,
    /// The VM's port.
    pub vm_port: u16,
    /// The VM's name, if given.
    pub vm: String,
    /// The network whose subnet holds `vm_ip`.
    pub network: String,
}

/// Checks a port number.
pub fn port(what: &str, value: u32) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{what} {value} is out of range: use 1–65535")),
    }
}

/// Everything netd was asked for.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Networks by name.
    pub networks: BTreeMap<String, Network>,
    /// TAPs by VM.
    pub taps: BTreeMap<String, Tap>,
    /// Port forwards by protocol and host port.
    pub forwards: BTreeMap<(Protocol, u16), Forward>,
    /// `net.ipv4.ip_forward` as it was before netd first turned it on; restored when the last
    /// network goes.
    pub forwarding_before: Option<bool>,
}

/// One change to the persisted state.
#[derive(Clone, Copy)]
pub enum Change<'a> {
    /// Create or replace a network.
    PutNetwork(&'a Network),
    /// Remove a network.
    DeleteNetwork(&'a str),
    /// Create or replace a TAP.
    PutTap(&'a Tap),
    /// Remove the TAP of a VM.
    DeleteTap(&'a str),
    /// Create or replace a port forward.
    PutForward(&'a Forward),
    /// Remove a port forward.
    DeleteForward(Protocol, u16),
    /// Record (or clear) the forwarding setting found before netd.
    ForwardingBefore(Option<bool>),
}

/// The sled store of the desired state.
pub struct Store {
    db: sled::Db,
}

fn err(e: impl fmt::Display) -> String {
    format!("netd store: {e}")
}

fn forward_key(protocol: Protocol, port: u16) -> String {
    format!("fwd/{protocol}/{port}")
}

/// Encodes a stored value; these plain types always serialize.
fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain data serializes")
}

const FORWARDING_KEY: &str = "sysctl/ip_forward_before";

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, String> {
        let db = volant_services::store::open_sled(&dir.join("net.sled"), 8 << 20)?;
        Ok(Store { db })
    }

    fn scan<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>, String> {
        self.db
            .scan_prefix(prefix)
            .map(|item| {
                let (_, v) = item.map_err(err)?;
                serde_json::from_slice(&v).map_err(err)
            })
            .collect()
    }

    /// Reads everything.
    pub fn load(&self) -> Result<Desired, String> {
        let mut d = Desired::default();
        for n in self.scan::<Network>("net/")? {
            d.networks.insert(n.name.clone(), n);
        }
        for t in self.scan::<Tap>("tap/")? {
            d.taps.insert(t.vm.clone(), t);
        }
        for f in self.scan::<Forward>("fwd/")? {
            d.forwards.insert((f.protocol, f.host_port), f);
        }
        if let Some(v) = self.db.get(FORWARDING_KEY).map_err(err)? {
            d.forwarding_before = serde_json::from_slice(&v).map_err(err)?;
        }
        Ok(d)
    }

    /// Applies one change; durable after [`Store::flush`].
    pub fn apply(&self, change: Change<'_>) -> Result<(), String> {
        let put = |key: String, value: Vec<u8>| self.db.insert(key, value).map(drop);
        match change {
            Change::PutNetwork(n) => put(format!("net/{}", n.name), json(n)),
            Change::DeleteNetwork(name) => self.db.remove(format!("net/{name}")).map(drop),
            Change::PutTap(t) => put(format!("tap/{}", t.vm), json(t)),
            Change::DeleteTap(vm) => self.db.remove(format!("tap/{vm}")).map(drop),
            Change::PutForward(f) => put(forward_key(f.protocol, f.host_port), json(f)),
            Change::DeleteForward(p, port) => self.db.remove(forward_key(p, port)).map(drop),
            Change::ForwardingBefore(Some(v)) => put(FORWARDING_KEY.into(), json(&v)),
            Change::ForwardingBefore(None) => self.db.remove(FORWARDING_KEY).map(drop),
        }
        .map_err(err)
    }

    /// Makes every applied change durable.
    pub fn flush(&self) -> Result<(), String> {
        self.db.flush().map(drop).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_validate_with_reasons() {
        let n = Network::validate("volant0", "192.168.127.0/24", "", true).unwrap();
        assert_eq!(n.gateway.to_string(), "192.168.127.1");
        let cases = [
            ("", "10.0.0.0/24", "", "network name is required"),
            ("Volant0", "10.0.0.0/24", "", "'V'"),
            ("a-very-long-bridge", "10.0.0.0/24", "", "at most 15"),
            ("br0", "10.0.0.0", "", "CIDR"),
            ("br0", "10.0.0.1/24", "", "host bits"),
            ("br0", "10.0.0.0/24", "10.0.1.1", "outside the subnet"),
            ("br0", "10.0.0.0/24", "10.0.0.255", "broadcast"),
            ("br0", "10.0.0.0/24", "ten", "not an IP address"),
        ];
        for (name, subnet, gw, why) in cases {
            let e = Network::validate(name, subnet, gw, true).unwrap_err();
            assert!(e.contains(why), "{name} {subnet} {gw}: {e}");
        }
    }

    #[test]
    fn ports_and_protocols() {
        assert_eq!(port("host_port", 8080).unwrap(), 8080);
        for bad in [0, 65536, u32::MAX] {
            assert!(port("host_port", bad).unwrap_err().contains("1–65535"));
        }
        assert_eq!(Protocol::parse("UDP").unwrap(), Protocol::Udp);
        assert_eq!(Protocol::parse("").unwrap(), Protocol::Tcp);
        assert!(Protocol::parse("sctp").unwrap_err().contains("sctp"));
    }

    #[test]
    fn a_tap_recorded_before_addresses_has_none() {
        let old = r#"{"vm":"web","network":"volant0","name":"vmtap-web","mac":[2,0,0,0,0,1]}"#;
        let tap: Tap = serde_json::from_str(old).unwrap();
        assert_eq!(tap.ip, None);
    }

    #[test]
    fn the_store_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let net = Network::validate("volant0", "192.168.127.0/24", "", true).unwrap();
        let tap = Tap::validate("volant0", "web", "192.168.127.100", 1_900_000_000).unwrap();
        let fwd = Forward {
            host_port: 8080,
            protocol: Protocol::Tcp,
            vm_ip: "192.168.127.100".parse().unwrap(),
            vm_port: 80,
            vm: "web".into(),
            network: "volant0".into(),
        };
        {
            let s = Store::open(dir.path()).unwrap();
            s.apply(Change::PutNetwork(&net)).unwrap();
            s.apply(Change::PutTap(&tap)).unwrap();
            s.apply(Change::PutForward(&fwd)).unwrap();
            s.apply(Change::ForwardingBefore(Some(false))).unwrap();
            s.flush().unwrap();
        }
        let d = Store::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(d.networks["volant0"], net);
        assert_eq!(d.taps["web"], tap);
        assert_eq!(d.forwards[&(Protocol::Tcp, 8080)], fwd);
        assert_eq!(d.forwarding_before, Some(false));
    }
}
