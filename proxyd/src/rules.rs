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
        [192, 88, 99, _] => "the deprecated 6to4 relay anycast (192.88.99.0/24)",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..240).contains(&a) => "multicast",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4) or broadcast",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 address stands for, in every form that is routed to it: IPv4-mapped,
/// IPv4-translated, IPv4-compatible, NAT64 (well-known prefix) and 6to4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
    if ip.is_unspecified() || ip.is_loopback() {
        return None;
    }
    match s {
        // ::ffff:a.b.c.d (mapped), ::ffff:0:a.b.c.d (translated, RFC 2765), ::a.b.c.d
        // (compatible, deprecated).
        [0, 0, 0, 0, 0, 0xffff, ..] | [0, 0, 0, 0, 0xffff, 0, ..] | [0, 0, 0, 0, 0, 0, ..] => {
            Some(low)
        }
        // NAT64's well-known prefix (RFC 6052).
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        // 6to4: 2002:AABB:CCDD::/48.
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))),
        _ => None,
    }
}

fn forbidden_v6(ip: Ipv6Addr, extra: &[IpNet]) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return forbidden(v4.into(), extra).map(|_| "an IPv6 form of a forbidden IPv4 address");
    }
    let s = ip.segments();
    let why = match s[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // Anything else under ::/64 is an odd spelling of the forms above.
        0 if s[1..4] == [0, 0, 0] => "reserved (::/64)",
        // Its operator chooses where the IPv4 address sits: never public.
        0x64 if s[1] == 0xff9b => "NAT64 (64:ff9b:1::/48 and odd spellings)",
        0x0100 if s[1..3] == [0, 0] && (s[3] == 0 || s[3] == 1) => {
            "discard-only or dummy (100::/64, 100:0:0:1::/64)"
        }
        0x2001 if s[1] < 0x0200 => "IETF protocol assignments (2001::/23, Teredo included)",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        0x3fff if s[1] < 0x1000 => "documentation (3fff::/20)",
        0x5f00 => "segment routing (5f00::/16)",
        a if a & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        a if a & 0xffc0 == 0xfe80 => "link-local",
        a if a & 0xffc0 == 0xfec0 => "site-local (deprecated)",
        a if a & 0xff00 == 0xff00 => "multicast",
        // ISATAP (RFC 5214): an interface identifier ::0:5efe:a.b.c.d or ::200:5efe:a.b.c.d
        // under any prefix is tunnelled to that IPv4 address.
        _ if (s[4] == 0 || s[4] == 0x0200) && s[5] == 0x5efe => {
            let v4 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
            return forbidden(v4.into(), extra).map(|_| "ISATAP to a forbidden IPv4 address");
        }
        _ => return None,
    };
    Some(why)
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
            "100:0:0:1::5",
            "::ffff:198.51.100.1",
            // IPv4-translated (RFC 2765).
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:c0a8:7f01",
            "::ffff:0:0",
            // Odd spellings under ::/64, local-use NAT64, ISATAP with a private IPv4 address.
            "::1:0:0:1",
            "::fffe:7f00:1",
            "64:ff9b:1:7f00:1::",
            "64:ff9b:1::808:808",
            "2606:4700::5efe:7f00:1",
            "2606:4700::200:5efe:a9fe:a9fe",
            "fe80::5efe:808:808",
            "2001:2::1",
            "2001:db8::1",
            "3fff::1",
            "5f00::1",
            "192.88.99.1",
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
            "::ffff:0:808:808",
            "2606:4700::5efe:808:808",
            "2a00:1450::1",
        ] {
            let ip: IpAddr = ok.parse().unwrap();
            assert_eq!(forbidden(ip, &volant), None, "{ok} refused");
        }
    }
}
