//! Names and addresses netd derives from VM and network names.
//!
//! - TAP name: `vmtap-<vm>` when that fits in 15 bytes (the kernel's limit), else `vmtap_` and
//!   the first 9 hex digits of FNV-1a-64 of the VM name: a VM name (a DNS label) has no `_`, so
//!   no VM's plain name can be another's hashed one. Both prefixes mark TAPs as netd's own.
//! - MAC: the first six bytes of FNV-1a-64 of `vm:<vm name>` (guest NIC) or `bridge:<network>`
//!   (bridge), with the multicast bit cleared and the locally-administered bit set: stable across
//!   restarts and hosts, never a vendor's or a group address.

/// The prefix of a TAP named after its VM.
pub const TAP_PREFIX: &str = "vmtap-";
/// The prefix of a TAP named after the hash of a long VM name.
pub const HASHED_TAP_PREFIX: &str = "vmtap_";

/// Whether `link` is named as netd names its TAPs.
pub fn is_tap_name(link: &str) -> bool {
    link.starts_with(TAP_PREFIX) || link.starts_with(HASHED_TAP_PREFIX)
}

/// The longest interface name the kernel takes (IFNAMSIZ less the NUL).
const IFNAME_MAX: usize = 15;

/// FNV-1a, 64 bits: tiny, stable across versions and platforms.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The TAP device name of `vm`.
pub fn tap_name(vm: &str) -> String {
    let plain = format!("{TAP_PREFIX}{vm}");
    if plain.len() <= IFNAME_MAX {
        return plain;
    }
    let hash = format!("{:016x}", fnv1a64(vm.as_bytes()));
    format!(
        "{HASHED_TAP_PREFIX}{}",
        &hash[..IFNAME_MAX - HASHED_TAP_PREFIX.len()]
    )
}

fn mac_of(seed: &str) -> [u8; 6] {
    let h = fnv1a64(seed.as_bytes()).to_be_bytes();
    let mut mac = [h[0], h[1], h[2], h[3], h[4], h[5]];
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// The MAC address of `vm`'s network interface.
pub fn guest_mac(vm: &str) -> [u8; 6] {
    mac_of(&format!("vm:{vm}"))
}

/// The MAC address of the bridge of `network`, fixed so that it never changes as ports come and
/// go (a bridge otherwise takes the lowest MAC of its ports).
pub fn bridge_mac(network: &str) -> [u8; 6] {
    mac_of(&format!("bridge:{network}"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_and_long_ones_hashed_to_15_bytes() {
        assert_eq!(tap_name("web"), "vmtap-web");
        assert_eq!(tap_name("123456789"), "vmtap-123456789");
        let long = tap_name("a-very-long-vm-name-indeed");
        assert_eq!(long.len(), 15);
        assert!(long.starts_with(HASHED_TAP_PREFIX));
        // The hash digits are a valid VM name; that VM's TAP is another device.
        let digits = &long[HASHED_TAP_PREFIX.len()..];
        assert_ne!(tap_name(digits), long);
        assert!(is_tap_name(&long) && is_tap_name(&tap_name(digits)));
        assert_eq!(long, tap_name("a-very-long-vm-name-indeed"), "stable");
        assert_ne!(long, tap_name("a-very-long-vm-name-indeeD"));
        assert_eq!(tap_name(&"x".repeat(63)).len(), 15);
    }

    #[test]
    fn macs_are_stable_unicast_and_locally_administered() {
        for name in ["web", "db", "a-very-long-vm-name-indeed", ""] {
            let mac = guest_mac(name);
            assert_eq!(mac[0] & 0x01, 0, "unicast");
            assert_eq!(mac[0] & 0x02, 0x02, "locally administered");
            assert_eq!(mac, guest_mac(name));
        }
        assert_ne!(guest_mac("web"), guest_mac("db"));
        assert_ne!(guest_mac("volant0"), bridge_mac("volant0"));
        // Pinned (computed independently): changing the scheme would change every VM's MAC and
        // every long TAP name.
        assert_eq!(format_mac(&guest_mac("web")), "f6:f6:d6:85:06:bf");
        assert_eq!(tap_name("a-very-long-vm-name-indeed"), "vmtap_df63e3327");
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
