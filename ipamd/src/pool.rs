//! Address pools: validation of what a user asks for, and address arithmetic.
//!
//! Addresses are `IpAddr` and arithmetic is done on `u128`, so nothing assumes IPv4 even though
//! only IPv4 pools are accepted today.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use volant_services::validate::{dns_label, host_in, ip, ipv4_subnet};

/// A validated pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// A DNS label.
    pub name: String,
    /// The subnet, host bits zero.
    pub subnet: IpNet,
    /// Inside the subnet, outside the range.
    pub gateway: IpAddr,
    /// First leasable address.
    pub range_start: IpAddr,
    /// Last leasable address (inclusive).
    pub range_end: IpAddr,
}

/// A pool as a user writes it: text, with optional gateway and range.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolSpec<'a> {
    /// Pool name.
    pub name: &'a str,
    /// CIDR.
    pub subnet: &'a str,
    /// Empty: the first address of the subnet.
    pub gateway: &'a str,
    /// Empty together with `range_end`: every usable address on the far side of the gateway.
    pub range_start: &'a str,
    /// See `range_start`.
    pub range_end: &'a str,
}

/// The address as a number.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

/// The number as an address of the same family as `like`.
fn from_u128(n: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// The address after `ip`, if there is one.
pub fn next(ip: IpAddr) -> Option<IpAddr> {
    let max = match ip {
        IpAddr::V4(_) => u32::MAX as u128,
        IpAddr::V6(_) => u128::MAX,
    };
    let n = to_u128(ip);
    (n < max).then(|| from_u128(n + 1, ip))
}

impl Pool {
    /// Checks a user's pool and fills in the defaults. The error says what is wrong and how to
    /// fix it.
    pub fn validate(spec: PoolSpec<'_>) -> Result<Pool, String> {
        dns_label("pool name", spec.name)?;
        let subnet = ipv4_subnet("subnet", spec.subnet)?;
        let network = subnet.network();
        let broadcast = subnet.broadcast();
        let first_host = next(network).expect("a /30 or larger has hosts");
        let last_host = from_u128(to_u128(broadcast) - 1, broadcast);

        let gateway = if spec.gateway.trim().is_empty() {
            first_host
        } else {
            host_in("gateway", ip("gateway", spec.gateway)?, &subnet)?
        };
        // The guide's convention, as for the default network: in a /24 whose gateway lies
        // below it, .100–.254.
        let guide = |last: u8| match network {
            IpAddr::V4(n) => IpAddr::from([n.octets()[0], n.octets()[1], n.octets()[2], last]),
            IpAddr::V6(_) => network,
        };
        let (range_start, range_end) = match (spec.range_start.trim(), spec.range_end.trim()) {
            ("", "") if subnet.prefix_len() == 24 && gateway < guide(100) => {
                (guide(100), guide(254))
            }
            ("", "") if gateway == first_host => {
                (next(gateway).expect("below broadcast"), last_host)
            }
            ("", "") if gateway == last_host => {
                (first_host, from_u128(to_u128(gateway) - 1, gateway))
            }
            ("", "") => {
                return Err(format!(
                    "gateway {gateway} is neither the first nor the last address of {subnet}: \
                     give the range explicitly"
                ));
            }
            ("", _) | (_, "") => {
                return Err("give both range_start and range_end, or neither".into());
            }
            (start, end) => (
                host_in("range_start", ip("range_start", start)?, &subnet)?,
                host_in("range_end", ip("range_end", end)?, &subnet)?,
            ),
        };
        if range_start > range_end {
            return Err(format!(
                "range_start {range_start} comes after range_end {range_end}"
            ));
        }
        if (range_start..=range_end).contains(&gateway) {
            return Err(format!(
                "gateway {gateway} lies inside the range {range_start}–{range_end}; move the \
                 gateway or the range"
            ));
        }
        Ok(Pool {
            name: spec.name.to_string(),
            subnet,
            gateway,
            range_start,
            range_end,
        })
    }

    /// How many addresses the range holds.
    pub fn capacity(&self) -> u128 {
        to_u128(self.range_end) - to_u128(self.range_start) + 1
    }

    /// Whether `ip` is a leasable address of this pool.
    pub fn in_range(&self, ip: IpAddr) -> bool {
        (self.range_start..=self.range_end).contains(&ip)
            && ip.is_ipv4() == self.range_start.is_ipv4()
    }

    /// Whether the two pools' subnets share any address.
    pub fn overlaps(&self, other: &Pool) -> bool {
        self.subnet.contains(&other.subnet.network())
            || other.subnet.contains(&self.subnet.network())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(subnet: &'a str, gateway: &'a str, start: &'a str, end: &'a str) -> PoolSpec<'a> {
        PoolSpec {
            name: "volant0",
            subnet,
            gateway,
            range_start: start,
            range_end: end,
        }
    }

    #[test]
    fn the_default_pool() {
        let p = Pool::validate(spec(
            "192.168.127.0/24",
            "192.168.127.1",
            "192.168.127.100",
            "192.168.127.254",
        ))
        .unwrap();
        assert_eq!(p.capacity(), 155);
        assert!(p.in_range("192.168.127.100".parse().unwrap()));
        assert!(!p.in_range("192.168.127.99".parse().unwrap()));
    }

    #[test]
    fn defaults_for_gateway_and_range() {
        let p = Pool::validate(spec("10.1.0.0/16", "", "", "")).unwrap();
        assert_eq!(p.gateway.to_string(), "10.1.0.1");
        assert_eq!(p.range_start.to_string(), "10.1.0.2");
        assert_eq!(p.range_end.to_string(), "10.1.255.254");
        let p = Pool::validate(spec("10.2.0.0/24", "10.2.0.254", "", "")).unwrap();
        assert_eq!(p.range_start.to_string(), "10.2.0.1");
        assert_eq!(p.range_end.to_string(), "10.2.0.253");
        // A /24 with its gateway below .100: the guide's .100–.254.
        for gateway in ["", "10.3.0.1", "10.3.0.99"] {
            let p = Pool::validate(spec("10.3.0.0/24", gateway, "", "")).unwrap();
            assert_eq!(
                (p.range_start.to_string(), p.range_end.to_string()),
                ("10.3.0.100".into(), "10.3.0.254".into()),
                "{gateway}"
            );
        }
    }

    #[test]
    fn bad_pools_say_why() {
        let cases = [
            (spec("", "", "", ""), "subnet is required"),
            (spec("192.168.127.0", "", "", ""), "CIDR"),
            (spec("192.168.300.0/24", "", "", ""), "CIDR"),
            (spec("192.168.127.0/33", "", "", ""), "CIDR"),
            (
                spec("192.168.127.5/24", "", "", ""),
                "did you mean 192.168.127.0/24",
            ),
            (spec("fd00::/64", "", "", ""), "IPv6"),
            (spec("10.0.0.0/31", "", "", ""), "too small"),
            (
                spec("10.0.0.0/24", "10.0.1.1", "", ""),
                "gateway 10.0.1.1 is outside",
            ),
            (spec("10.0.0.0/24", "10.0.0.0", "", ""), "network address"),
            (
                spec("10.0.0.0/24", "10.0.0.255", "", ""),
                "broadcast address",
            ),
            (spec("10.0.0.0/24", "bogus", "", ""), "not an IP address"),
            (
                spec("10.0.0.0/24", "10.0.0.1", "10.0.0.50", "10.0.0.10"),
                "comes after",
            ),
            (
                spec("10.0.0.0/24", "10.0.0.1", "10.0.0.10", "10.0.1.10"),
                "outside the subnet",
            ),
            (
                spec("10.0.0.0/24", "10.0.0.1", "10.0.0.0", "10.0.0.10"),
                "network address",
            ),
            (
                spec("10.0.0.0/24", "10.0.0.1", "10.0.0.10", "10.0.0.255"),
                "broadcast address",
            ),
            (
                spec("10.0.0.0/24", "10.0.0.50", "10.0.0.10", "10.0.0.100"),
                "inside the range",
            ),
            (spec("10.0.0.0/24", "10.0.0.1", "10.0.0.10", ""), "both"),
            (spec("10.0.0.0/24", "10.0.0.150", "", ""), "give the range"),
            (
                spec("10.0.0.0/24", "10.0.0.1", "x", "10.0.0.9"),
                "range_start \"x\"",
            ),
        ];
        for (s, why) in cases {
            let err = Pool::validate(s).unwrap_err();
            assert!(err.contains(why), "{s:?}: {err}");
        }
        let err = Pool::validate(PoolSpec {
            name: "Bad_Name",
            subnet: "10.0.0.0/24",
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("pool name"), "{err}");
    }

    #[test]
    fn overlap() {
        let a = Pool::validate(spec("10.0.0.0/16", "", "", "")).unwrap();
        let b = Pool::validate(spec("10.0.5.0/24", "", "", "")).unwrap();
        let c = Pool::validate(spec("10.1.0.0/24", "", "", "")).unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }

    #[test]
    fn arithmetic_is_numeric_and_family_aware() {
        let ip: IpAddr = "192.168.127.99".parse().unwrap();
        assert_eq!(next(ip).unwrap().to_string(), "192.168.127.100");
        assert_eq!(
            next("10.0.0.255".parse().unwrap()).unwrap().to_string(),
            "10.0.1.0"
        );
        assert_eq!(next("255.255.255.255".parse().unwrap()), None);
        assert_eq!(
            next("::ffff".parse().unwrap()).unwrap().to_string(),
            "::1:0"
        );
        assert_eq!(next(IpAddr::V6(Ipv6Addr::from(u128::MAX))), None);
        let a: IpAddr = "192.168.127.99".parse().unwrap();
        let b: IpAddr = "192.168.127.100".parse().unwrap();
        assert!(a < b, "IpAddr orders numerically, not as text");
    }
}
