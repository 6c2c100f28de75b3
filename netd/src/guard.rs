//! Anti-spoofing on every TAP: a guest sends from its own MAC and leased IPv4 address, or
//! nothing it sends reaches the bridge.
//!
//! The rules live in an nftables table of netd's own, `bridge volant`, whose one base chain
//! sees every frame entering a bridge port before it is forwarded to another port or delivered
//! to the host. Frames of interfaces not named as netd names TAPs are not its business; of a
//! TAP it accepts:
//!
//! - IPv4 whose (TAP, source MAC, source address) is in the set `guests`;
//! - Ethernet/IPv4 ARP whose (TAP, source MAC, sender address) and (TAP, sender MAC, sender
//!   address) are both in it;
//!
//! and drops everything else: another MAC or address, IPv6, other protocols, VLAN tags, and
//! every frame of a TAP whose record holds no address. A drop in any base chain is final, so
//! no rule of anyone else's can let such a frame through. A guest is one element of the set,
//! so adding or removing one is one element change, and the lookup costs the same for one TAP
//! as for thousands. Every change is one `nft -f` transaction; removing the table removes
//! everything netd added.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::naming::format_mac;

/// netd's table, in the `bridge` family.
pub const TABLE: &str = "volant";
const SET: &str = "guests";
const SET_TYPE: &str = "type ifname . ether_addr . ipv4_addr";
const CHAIN: &str = "guard";

/// The base chain as `nft list table` prints it (nftables 1.0): the frames of interfaces
/// named `vmtap*` (both TAP prefixes of netd start so) pass only as the module says.
const CHAIN_LINES: [&str; 5] = [
    "type filter hook prerouting priority dstnat; policy accept;",
    "iifname != \"vmtap*\" accept",
    "iifname . ether saddr . ip saddr @guests accept",
    "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ip \
     @guests iifname . arp saddr ether . arp saddr ip @guests accept",
    "drop",
];

/// A TAP as the guard sees it.
pub struct Guest<'a> {
    /// Its device name.
    pub tap: &'a str,
    /// The guest NIC's MAC.
    pub mac: [u8; 6],
    /// The guest's leased address; none passes nothing.
    pub ip: Option<Ipv4Addr>,
}

/// The elements of the set `guests`, as `nft` prints them.
pub fn elements(guests: &[Guest<'_>]) -> BTreeSet<String> {
    guests
        .iter()
        .filter_map(|g| {
            let ip = g.ip?;
            Some(format!("\"{}\" . {} . {ip}", g.tap, format_mac(&g.mac)))
        })
        .collect()
}

/// What netd's table holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Actual {
    /// The table exists.
    pub table: bool,
    /// It holds exactly the set and the chain netd makes, as netd makes them.
    pub shaped: bool,
    /// The set's elements.
    pub elements: BTreeSet<String>,
}

/// Where a line of the listing is.
enum In {
    Table,
    Set,
    Elements,
    Chain,
    Other,
}

impl Actual {
    /// Reads the output of `nft list table bridge volant` (empty when there is no table).
    pub fn parse(listing: &str) -> Actual {
        let mut at = In::Table;
        let (mut set_lines, mut chain_lines, mut others) = (Vec::new(), Vec::new(), 0);
        let mut actual = Actual::default();
        for line in listing.lines().map(str::trim) {
            let mut elements = |text: &str| {
                let (text, last) = match text.strip_suffix('}') {
                    Some(rest) => (rest, true),
                    None => (text, false),
                };
                actual.elements.extend(
                    text.split(',')
                        .map(str::trim)
                        .filter(|e| !e.is_empty())
                        .map(str::to_string),
                );
                if last { In::Set } else { In::Elements }
            };
            at = match at {
                _ if line.starts_with("table bridge ") => {
                    actual.table = true;
                    In::Table
                }
                In::Table if line == format!("set {SET} {{") => In::Set,
                In::Table if line == format!("chain {CHAIN} {{") => In::Chain,
                In::Table if line.ends_with('{') => {
                    others += 1;
                    In::Other
                }
                In::Set | In::Chain | In::Other if line == "}" => In::Table,
                In::Set if line.starts_with("elements = {") => {
                    elements(&line["elements = {".len()..])
                }
                In::Elements => elements(line),
                In::Set => {
                    set_lines.push(line.to_string());
                    In::Set
                }
                In::Chain if !line.is_empty() => {
                    chain_lines.push(line.to_string());
                    In::Chain
                }
                other => other,
            };
        }
        actual.shaped =
            actual.table && others == 0 && set_lines == [SET_TYPE] && chain_lines == CHAIN_LINES;
        actual
    }

    /// The `nft -f` input that turns this into `desired` (the set's elements, or no table at
    /// all), and the elements it leaves; `None` when nothing is to change. A table of the right
    /// shape is changed element by element; any other is replaced whole, in the same
    /// transaction. Without `sweep`, only elements of TAPs that `desired` names otherwise are
    /// removed: removing one makes the kernel wait for an RCU grace period (~15 ms here, every
    /// other table change waiting too), while the entry of a deleted TAP names a device that
    /// is gone, so those are left to a sweep that removes them all at once.
    pub fn script(
        &self,
        desired: Option<&BTreeSet<String>>,
        sweep: bool,
    ) -> Option<(String, BTreeSet<String>)> {
        let Some(want) = desired else {
            return self
                .table
                .then(|| (format!("delete table bridge {TABLE}\n"), BTreeSet::new()));
        };
        let list = |set: &[&String]| {
            set.iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.shaped {
            let named: BTreeSet<&str> = want.iter().map(|e| tap_of(e)).collect();
            let gone: Vec<&String> = self
                .elements
                .difference(want)
                .filter(|e| sweep || named.contains(tap_of(e)))
                .collect();
            let new: Vec<&String> = want.difference(&self.elements).collect();
            let mut script = String::new();
            if !gone.is_empty() {
                script += &format!(
                    "delete element bridge {TABLE} {SET} {{ {} }}\n",
                    list(&gone)
                );
            }
            if !new.is_empty() {
                script += &format!("add element bridge {TABLE} {SET} {{ {} }}\n", list(&new));
            }
            let mut after = self.elements.clone();
            for e in gone {
                after.remove(e);
            }
            after.extend(new.into_iter().cloned());
            return (!script.is_empty()).then_some((script, after));
        }
        let elements = if want.is_empty() {
            String::new()
        } else {
            format!(
                " elements = {{ {} }};",
                list(&want.iter().collect::<Vec<_>>())
            )
        };
        let chain: String = CHAIN_LINES.iter().map(|l| format!("    {l}\n")).collect();
        // Declaring the table first makes the delete valid whether or not it exists.
        Some((
            format!(
                "table bridge {TABLE} {{}}\ndelete table bridge {TABLE}\n\
                 table bridge {TABLE} {{\n  set {SET} {{ {SET_TYPE};{elements} }}\n  \
                 chain {CHAIN} {{\n{chain}  }}\n}}\n"
            ),
            want.clone(),
        ))
    }
}

/// The TAP an element names.
fn tap_of(element: &str) -> &str {
    element.split(" . ").next().unwrap_or(element)
}

/// Runs `nft` with `args`, feeding it `input`; its standard output.
fn nft(args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e} (Debian's nftables package has it)"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("nft: {e}"))
}

/// Reads netd's table. Blocking: forks `nft`.
pub fn read() -> Result<Actual, String> {
    let tables = nft(&["list", "tables", "bridge"], None)?;
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table bridge {TABLE}"))
    {
        return Ok(Actual::default());
    }
    Ok(Actual::parse(&nft(
        &["list", "table", "bridge", TABLE],
        None,
    )?))
}

/// Makes the set hold exactly `desired` (less the entries of deleted TAPs, unless `sweep`) in
/// a table of netd's shape or, with `None`, removes the table; `known` is what the table held
/// after the last call (read anew when `None`, and forgotten when a change fails). Returns
/// what it changed. Blocking: forks `nft` to read when nothing is known and to write when
/// something is to change.
pub fn sync(
    known: &mut Option<Actual>,
    desired: Option<&BTreeSet<String>>,
    sweep: bool,
) -> Result<Vec<String>, String> {
    let actual = match known.take() {
        Some(actual) => actual,
        None => read()?,
    };
    let Some((script, elements)) = actual.script(desired, sweep) else {
        *known = Some(actual);
        return Ok(vec![]);
    };
    nft(&["-f", "-"], Some(&script))?;
    *known = Some(match desired {
        Some(_) => Actual {
            table: true,
            shaped: true,
            elements,
        },
        None => Actual::default(),
    });
    Ok(script
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('}'))
        .map(|l| format!("nft {}", l.trim_end_matches(" {").trim_end_matches(" {}")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTED: &str = "table bridge volant {
	set guests {
		type ifname . ether_addr . ipv4_addr
		elements = { \"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.2,
			     \"vmtap_012345678\" . 4e:4c:00:00:00:02 . 10.0.0.3 }
	}

	chain guard {
		type filter hook prerouting priority dstnat; policy accept;
		iifname != \"vmtap*\" accept
		iifname . ether saddr . ip saddr @guests accept
		arp htype 1 arp ptype ip arp hlen 6 arp plen 4 iifname . ether saddr . arp saddr ip @guests iifname . arp saddr ether . arp saddr ip @guests accept
		drop
	}
}
";

    fn guests() -> BTreeSet<String> {
        elements(&[
            Guest {
                tap: "vmtap-a",
                mac: [2, 0, 0, 0, 0, 1],
                ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            },
            Guest {
                tap: "vmtap_012345678",
                mac: [0x4e, 0x4c, 0, 0, 0, 2],
                ip: Some(Ipv4Addr::new(10, 0, 0, 3)),
            },
            Guest {
                tap: "vmtap-old",
                mac: [2, 0, 0, 0, 0, 3],
                ip: None,
            },
        ])
    }

    #[test]
    fn the_wildcard_names_every_tap() {
        use crate::naming::{HASHED_TAP_PREFIX, TAP_PREFIX};
        assert!(TAP_PREFIX.starts_with("vmtap") && HASHED_TAP_PREFIX.starts_with("vmtap"));
        assert!(CHAIN_LINES[1].contains("\"vmtap*\""));
    }

    #[test]
    fn a_listing_is_read_back_as_written() {
        let actual = Actual::parse(LISTED);
        assert_eq!(
            actual,
            Actual {
                table: true,
                shaped: true,
                elements: guests(),
            }
        );
        assert_eq!(actual.script(Some(&guests()), true), None, "nothing to do");
        assert_eq!(Actual::parse(""), Actual::default());
        // Anything else in the table, or a rule changed, and it is no longer netd's shape.
        let extra = LISTED.replace("\tchain guard", "\tchain mine {\n\t}\n\tchain guard");
        assert!(!Actual::parse(&extra).shaped);
        let loosened = LISTED.replace("\t\tdrop\n", "");
        assert!(!Actual::parse(&loosened).shaped);
    }

    #[test]
    fn guests_come_and_go_one_element_at_a_time() {
        let actual = Actual::parse(LISTED);
        let mut want = guests();
        want.remove("\"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.2");
        want.insert("\"vmtap-b\" . 02:00:00:00:00:04 . 10.0.0.4".into());
        let (script, after) = actual.script(Some(&want), true).unwrap();
        assert_eq!(
            script,
            "delete element bridge volant guests { \"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.2 }\n\
             add element bridge volant guests { \"vmtap-b\" . 02:00:00:00:00:04 . 10.0.0.4 }\n"
        );
        assert_eq!(after, want);
        // Without a sweep, the deleted TAP's entry waits; a TAP named again with another
        // address loses its old entry at once.
        let (script, after) = actual.script(Some(&want), false).unwrap();
        assert!(!script.contains("delete"), "{script}");
        assert_eq!(after.len(), 3);
        let mut moved = guests();
        moved.remove("\"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.2");
        moved.insert("\"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.9".into());
        let (script, after) = actual.script(Some(&moved), false).unwrap();
        assert!(script.starts_with("delete element bridge volant guests { \"vmtap-a\""));
        assert_eq!(after, moved);
        assert_eq!(
            actual.script(None, false).unwrap().0,
            "delete table bridge volant\n"
        );
        assert_eq!(Actual::default().script(None, false), None);
    }

    #[test]
    fn a_missing_or_misshapen_table_is_replaced_whole() {
        let (script, _) = Actual::default().script(Some(&guests()), false).unwrap();
        assert!(script.starts_with("table bridge volant {}\ndelete table bridge volant\n"));
        for line in CHAIN_LINES {
            assert!(script.contains(line), "{line}");
        }
        assert!(script.contains("elements = { \"vmtap-a\" . 02:00:00:00:00:01 . 10.0.0.2, "));
    }
}
