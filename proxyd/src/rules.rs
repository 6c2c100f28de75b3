//! The egress rule engine: host normalisation, the allowlist, and the classification of
//! addresses a VM must never reach. Pure functions, no I/O.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// A host as a request names it, normalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower case, ASCII (IDN in punycode), no trailing dot.
    Name(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Normalises a host: brackets of IPv6 literals dropped, one trailing dot ignored, lower case,
/// internationalised names in punycode; anything that is not a valid name or literal is refused.
pub fn normalise(raw: &str) -> Result<Host, String> {
    let h = raw.strip_suffix('.').unwrap_or(raw);
    if let Some(inner) = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(ip.into()))
            .map_err(|_| format!("{raw:?} is not an IPv6 literal"));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    if h.is_empty() || h.len() > 253 {
        return Err(format!("{raw:?} is not a host name"));
    }
    let ascii =
        idna::domain_to_ascii_strict(h).map_err(|_| format!("{raw:?} is not a host name"))?;
    let valid = ascii.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    // A name whose last label is all digits would be read as an address by some resolvers.
    let numeric_tld = ascii
        .rsplit('.')
        .next()
        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()));
    if !valid || numeric_tld || ascii.len() > 253 {
        return Err(format!("{raw:?} is not a host name"));
    }
    Ok(Host::Name(ascii))
}

/// A VM's allowlist: exact names, `*.suffix` patterns (subdomains, not the apex) and IP
/// literals. A decision costs one hash lookup per label of the host.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    exact: HashSet<String>,
    suffixes: HashSet<String>,
    ips: HashSet<IpAddr>,
}

impl Allowlist {
    /// Builds the list; an entry that is neither a name, a pattern nor a literal is an error
    /// naming it.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Allowlist, String> {
        let mut list = Allowlist::default();
        for e in entries {
            let e = e.as_ref().trim();
            if let Some(suffix) = e.strip_prefix("*.") {
                match normalise(suffix)? {
                    Host::Name(n) => list.suffixes.insert(n),
                    Host::Ip(_) => return Err(format!("{e:?}: a wildcard needs a domain")),
                };
            } else {
                match normalise(e)? {
                    Host::Name(n) => list.exact.insert(n),
                    Host::Ip(ip) => list.ips.insert(ip),
                };
            }
        }
        Ok(list)
    }

    /// Whether `host` is on the list.
    pub fn allows(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => self.ips.contains(ip),
            Host::Name(n) => {
                self.exact.contains(n)
                    || n.match_indices('.')
                        .any(|(i, _)| self.suffixes.contains(&n[i + 1..]))
            }
        }
    }

    /// Whether `ip` was listed as a literal (which lets it past the address classification).
    pub fn lists_ip(&self, ip: &IpAddr) -> bool {
        self.ips.contains(ip)
    }
}

/// Why an address may not be reached, or `None` when it may.
pub fn forbidden(ip: IpAddr, extra: &[IpNet]) -> Option<&'static str> {
    if extra.iter().any(|n| n.contains(&ip)) {
        return Some("a Volant or configured denied subnet");
    }
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6, extra),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(match o {
        [0, ..] => "unspecified (0.0.0.0/8)",
        [127, ..] => "loopback",
        [10, ..] | [192, 168, ..] => "private (RFC 1918)",
        [172, b, ..] if (16..32).contains(&b) => "private (RFC 1918)",
        [100, b, ..] if (64..128).contains(&b) => "carrier-grade NAT (RFC 6598)",
        [169, 254, ..] => "link-local (cloud metadata lives here)",
        [192, 0, 0, _] => "IETF protocol assignments (192.0.0.0/24)",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..240).contains(&a) => "multicast",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4) or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr, extra: &[IpNet]) -> Option<&'static str> {
    let s = ip.segments();
    // Forms that carry an IPv4 address are judged by it.
    let embedded = if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if s[..6] == [0; 6] && !ip.is_unspecified() && !ip.is_loopback() {
        // IPv4-compatible (deprecated) ::a.b.c.d.
        Some(Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32))
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..6] == [0x64, 0xff9b, 1, 0, 0, 0] {
        // NAT64 (RFC 6052, RFC 8215).
        Some(Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32))
    } else if s[0] == 0x2002 {
        // 6to4.
        Some(Ipv4Addr::from(
            ((u128::from(ip) >> 80) & 0xffff_ffff) as u32,
        ))
    } else {
        None
    };
    if let Some(v4) = embedded {
        return forbidden(v4.into(), extra).map(|_| "an IPv6 form of a forbidden IPv4 address");
    }
    Some(match s[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        0x2001 if s[1] == 0 => "Teredo (hides an IPv4 address)",
        a if a & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        a if a & 0xffc0 == 0xfe80 => "link-local",
        a if a & 0xffc0 == 0xfec0 => "site-local (deprecated)",
        a if a & 0xff00 == 0xff00 => "multicast",
        0x0100 if s[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(s.into())
    }

    #[test]
    fn normalisation() {
        assert_eq!(
            normalise("API.Example.COM.").unwrap(),
            name("api.example.com")
        );
        assert_eq!(
            normalise("bücher.example").unwrap(),
            name("xn--bcher-kva.example")
        );
        assert_eq!(
            normalise("xn--bcher-kva.example").unwrap(),
            name("xn--bcher-kva.example")
        );
        assert_eq!(
            normalise("10.0.0.1").unwrap(),
            Host::Ip("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            normalise("[::1]").unwrap(),
            Host::Ip("::1".parse().unwrap())
        );
        for bad in [
            "",
            ".",
            "a..b",
            "-a.com",
            "a-.com",
            "a b.com",
            "a_b.com",
            "1.2.3",
            "0x7f.1",
            "[1.2.3.4]",
            "a.com:80",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(normalise(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn allowlist_matching() {
        let l = Allowlist::new(&[
            "api.example.com",
            "*.googleapis.com",
            "203.0.113.7",
            "Bücher.example",
        ])
        .unwrap();
        for ok in [
            "api.example.com",
            "API.example.com.",
            "storage.googleapis.com",
            "a.b.googleapis.com",
            "203.0.113.7",
            "xn--bcher-kva.example",
        ] {
            assert!(l.allows(&normalise(ok).unwrap()), "{ok} refused");
        }
        for no in [
            "example.com",
            "x.api.example.com",
            "googleapis.com",
            "evilgoogleapis.com",
            "googleapis.com.evil.net",
            "203.0.113.8",
            "api.example.com.evil.net",
        ] {
            assert!(!l.allows(&normalise(no).unwrap()), "{no} allowed");
        }
        assert!(Allowlist::new(&["*.10.0.0.1"]).is_err());
        assert!(Allowlist::new(&["not a name"]).is_err());
        assert!(!Allowlist::default().allows(&name("anything.com")));
    }

    #[test]
    fn forbidden_addresses() {
        let volant: Vec<IpNet> = vec![
            "192.168.127.0/24".parse().unwrap(),
            "198.51.100.0/24".parse().unwrap(),
        ];
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.51.100.9",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "::ffff:198.51.100.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(forbidden(ip, &volant).is_some(), "{bad} allowed");
        }
        for ok in [
            "1.1.1.1",
            "8.8.8.8",
            "203.0.113.10",
            "172.32.0.1",
            "100.128.0.1",
            "169.253.0.1",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = ok.parse().unwrap();
            assert_eq!(forbidden(ip, &volant), None, "{ok} refused");
        }
    }
}
