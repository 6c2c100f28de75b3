//! Validation of what users write: names, subnets and addresses. Errors name the field and say
//! how to fix it.

use std::net::IpAddr;

use ipnet::IpNet;

/// Checks that `value` is a DNS label (RFC 1123): 1–63 characters of lower-case letters, digits
/// and hyphens, starting and ending with a letter or digit. `what` names the field in the error.
pub fn dns_label(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} is required"));
    }
    if value.len() > 63 {
        return Err(format!(
            "{what} {:?} is {} characters long; a DNS label has at most 63",
            truncated(value),
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; use lower-case letters, digits and '-' only"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(format!(
            "{what} {value:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// Checks that `value` can name a network interface: a DNS label of at most 15 characters (the
/// kernel's IFNAMSIZ less the terminating NUL).
pub fn interface_name(what: &str, value: &str) -> Result<(), String> {
    dns_label(what, value)?;
    if value.len() > 15 {
        return Err(format!(
            "{what} {value:?} is {} characters long; an interface name has at most 15",
            value.len()
        ));
    }
    Ok(())
}

/// Parses an IPv4 subnet in CIDR notation whose host bits are zero.
pub fn ipv4_subnet(what: &str, text: &str) -> Result<IpNet, String> {
    if text.trim().is_empty() {
        return Err(format!(
            "{what} is required, in CIDR notation such as 192.168.127.0/24"
        ));
    }
    let subnet: IpNet = text
        .trim()
        .parse()
        .map_err(|_| format!("{what} {text:?} is not in CIDR notation such as 192.168.127.0/24"))?;
    if subnet.network() != subnet.addr() {
        return Err(format!(
            "{what} {subnet} has host bits set; did you mean {}?",
            subnet.trunc()
        ));
    }
    if let IpNet::V6(_) = subnet {
        return Err(format!(
            "{what} {subnet}: IPv6 is not supported yet; use an IPv4 subnet"
        ));
    }
    if let IpNet::V4(v4) = subnet {
        let special: [(&str, &str); 6] = [
            ("0.0.0.0/8", "the unspecified block"),
            ("127.0.0.0/8", "loopback"),
            ("169.254.0.0/16", "link-local (cloud metadata lives there)"),
            ("224.0.0.0/4", "multicast"),
            ("240.0.0.0/4", "reserved (and broadcast)"),
            (
                "100.64.0.0/10",
                "carrier-grade NAT (RFC 6598), the host's provider's",
            ),
        ];
        for (block, what_it_is) in special {
            let block: ipnet::Ipv4Net = block.parse().expect("a valid block");
            if block.contains(&v4.network()) || v4.contains(&block.network()) {
                return Err(format!(
                    "{what} {subnet} overlaps {block}, {what_it_is}: choose a private subnet \
                     such as 192.168.128.0/24"
                ));
            }
        }
    }
    if subnet.prefix_len() > 30 {
        return Err(format!(
            "{what} {subnet} is too small: it needs a network address, a gateway, at least one \
             address for a VM and a broadcast address (prefix /30 or shorter)"
        ));
    }
    Ok(subnet)
}

/// Parses an IP address.
pub fn ip(what: &str, text: &str) -> Result<IpAddr, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("{what} {text:?} is not an IP address such as 192.168.127.1"))
}

/// Checks that `ip` is a host address of `subnet`: inside it, neither its network nor its
/// broadcast address.
pub fn host_in(what: &str, ip: IpAddr, subnet: &IpNet) -> Result<IpAddr, String> {
    if !subnet.contains(&ip) {
        return Err(format!("{what} {ip} is outside the subnet {subnet}"));
    }
    if ip == subnet.network() {
        return Err(format!("{what} {ip} is the network address of {subnet}"));
    }
    if ip == subnet.broadcast() {
        return Err(format!("{what} {ip} is the broadcast address of {subnet}"));
    }
    Ok(ip)
}

fn truncated(value: &str) -> String {
    match value.char_indices().nth(20) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_labels() {
        for ok in ["a", "web", "web-1", "0", "a".repeat(63).as_str()] {
            dns_label("name", ok).unwrap();
        }
    }

    #[test]
    fn refuses_non_labels_with_a_reason() {
        let cases = [
            ("", "required"),
            ("-web", "start and end"),
            ("web-", "start and end"),
            ("Web", "'W'"),
            ("web_1", "'_'"),
            ("a.b", "'.'"),
            ("wéb", "'é'"),
            (&"a".repeat(64), "at most 63"),
        ];
        for (bad, why) in cases {
            let err = dns_label("pool name", bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.starts_with("pool name"), "{err}");
        }
    }

    #[test]
    fn interface_names() {
        interface_name("network name", "volant0").unwrap();
        interface_name("network name", "a23456789012345").unwrap();
        let err = interface_name("network name", "a234567890123456").unwrap_err();
        assert!(err.contains("at most 15"), "{err}");
    }

    #[test]
    fn subnets_and_hosts() {
        let net = ipv4_subnet("subnet", "10.0.0.0/24").unwrap();
        let cases = [
            ("", "required"),
            ("10.0.0.0", "CIDR"),
            ("10.0.0.0/33", "CIDR"),
            ("10.0.0.5/24", "did you mean 10.0.0.0/24"),
            ("fd00::/64", "IPv6"),
            ("10.0.0.0/31", "too small"),
            ("224.0.0.0/24", "multicast"),
            ("239.1.0.0/16", "multicast"),
            ("127.0.0.0/24", "loopback"),
            ("169.254.169.0/24", "link-local"),
            ("0.0.0.0/0", "0.0.0.0/8"),
            ("0.1.0.0/16", "unspecified"),
            ("240.0.0.0/24", "reserved"),
            ("100.64.0.0/24", "carrier-grade"),
            ("96.0.0.0/3", "loopback"),
        ];
        for (text, why) in cases {
            let err = ipv4_subnet("subnet", text).unwrap_err();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        host_in("gateway", "10.0.0.1".parse().unwrap(), &net).unwrap();
        for (ip, why) in [
            ("10.0.1.1", "outside"),
            ("10.0.0.0", "network"),
            ("10.0.0.255", "broadcast"),
        ] {
            let err = host_in("gateway", ip.parse().unwrap(), &net).unwrap_err();
            assert!(err.contains(why), "{ip}: {err}");
        }
        assert!(
            ip("gateway", "x")
                .unwrap_err()
                .contains("not an IP address")
        );
    }
}
