//! netd's iptables rules, in its own chains, through the iptables crate.
//!
//! Three chains hold every rule netd adds; each is jumped to from the built-in chains exactly
//! once, so operators' rules are never touched and removal removes exactly what netd added:
//!
//! - `filter VOLANT-FORWARD` (from `FORWARD`): traffic between two networks dropped; port
//!   forwards accepted; traffic from a bridge accepted, and replies to it.
//! - `nat VOLANT-POSTROUTING` (from `POSTROUTING`): MASQUERADE of a subnet leaving by another
//!   interface.
//! - `nat VOLANT-PREROUTING` (from `PREROUTING`, and from `OUTPUT` for locally originated
//!   traffic, both only for packets addressed to the host itself): DNAT of port forwards.
//!
//! Rules are written in the canonical form `iptables -S` prints, so that comparing what is with
//! what should be is a plain string comparison.

use std::net::IpAddr;

use ipnet::IpNet;

/// A network as the rules see it.
pub struct NetRules<'a> {
    /// The bridge.
    pub bridge: &'a str,
    /// Its subnet.
    pub subnet: IpNet,
    /// Whether to masquerade.
    pub nat: bool,
}

/// A port forward as the rules see it.
pub struct ForwardRules<'a> {
    /// `tcp` or `udp`.
    pub protocol: &'a str,
    /// The host port.
    pub host_port: u16,
    /// The VM's address and port.
    pub vm_ip: IpAddr,
    /// The VM's port.
    pub vm_port: u16,
    /// The bridge behind which the VM sits.
    pub bridge: &'a str,
}

/// One of netd's chains.
pub struct Chain {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// The chain's name.
    pub name: &'static str,
    /// The built-in chains that jump to it, with the jump rule.
    jumps: &'static [(&'static str, &'static str)],
}

/// The forward chain.
pub const FORWARD: Chain = Chain {
    table: "filter",
    name: "VOLANT-FORWARD",
    jumps: &[("FORWARD", "-j VOLANT-FORWARD")],
};
/// The masquerade chain.
pub const POSTROUTING: Chain = Chain {
    table: "nat",
    name: "VOLANT-POSTROUTING",
    jumps: &[("POSTROUTING", "-j VOLANT-POSTROUTING")],
};
/// The DNAT chain.
pub const PREROUTING: Chain = Chain {
    table: "nat",
    name: "VOLANT-PREROUTING",
    jumps: &[
        (
            "PREROUTING",
            "-m addrtype --dst-type LOCAL -j VOLANT-PREROUTING",
        ),
        (
            "OUTPUT",
            "! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING",
        ),
    ],
};
/// Every chain netd owns.
pub const CHAINS: [&Chain; 3] = [&FORWARD, &POSTROUTING, &PREROUTING];

/// The rules each chain should hold, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// `VOLANT-FORWARD`.
    pub forward: Vec<String>,
    /// `VOLANT-POSTROUTING`.
    pub postrouting: Vec<String>,
    /// `VOLANT-PREROUTING`.
    pub prerouting: Vec<String>,
}

impl Rules {
    /// The rules of `chain`.
    pub fn of(&self, chain: &Chain) -> &[String] {
        match chain.name {
            "VOLANT-FORWARD" => &self.forward,
            "VOLANT-POSTROUTING" => &self.postrouting,
            _ => &self.prerouting,
        }
    }
}

/// The masquerade rule of a network.
pub fn masquerade(net: &NetRules<'_>) -> String {
    format!("-s {} ! -o {} -j MASQUERADE", net.subnet, net.bridge)
}

/// The accept rules of a network: out of the bridge, and replies into it.
pub fn accepts(bridge: &str) -> [String; 2] {
    [
        format!("-i {bridge} -j ACCEPT"),
        format!("-o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
    ]
}

/// The DNAT rule of a port forward.
pub fn dnat(f: &ForwardRules<'_>) -> String {
    format!(
        "-p {p} -m {p} --dport {} -j DNAT --to-destination {}:{}",
        f.host_port,
        f.vm_ip,
        f.vm_port,
        p = f.protocol
    )
}

/// The forward accept rule of a port forward.
pub fn forward_accept(f: &ForwardRules<'_>) -> String {
    format!(
        "-d {}/32 -o {} -p {p} -m {p} --dport {} -j ACCEPT",
        f.vm_ip,
        f.bridge,
        f.vm_port,
        p = f.protocol
    )
}

/// What the chains should hold for these networks and forwards. Isolation comes first, so that
/// no accept rule can let traffic cross from one network to another.
pub fn desired(nets: &[NetRules<'_>], forwards: &[ForwardRules<'_>]) -> Rules {
    let mut rules = Rules::default();
    for a in nets {
        for b in nets.iter().filter(|b| b.bridge != a.bridge) {
            rules
                .forward
                .push(format!("-i {} -o {} -j DROP", a.bridge, b.bridge));
        }
    }
    rules.forward.extend(forwards.iter().map(forward_accept));
    for net in nets {
        rules.forward.extend(accepts(net.bridge));
        if net.nat {
            rules.postrouting.push(masquerade(net));
        }
    }
    rules.prerouting.extend(forwards.iter().map(dnat));
    // Two forwards to one guest port share their accept rule: each rule once.
    for chain in [
        &mut rules.forward,
        &mut rules.postrouting,
        &mut rules.prerouting,
    ] {
        let mut seen = std::collections::HashSet::new();
        chain.retain(|r| seen.insert(r.clone()));
    }
    rules
}

/// The edits that turn `actual` into `desired` (a list of unique rules), each applied in order
/// to the chain as the previous ones left it. Rules already in place stay untouched, so traffic
/// they carry never sees a gap.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// `-D CHAIN rule`: deletes the first rule equal to it.
    Delete(String),
    /// `-I CHAIN position rule`, 1-based.
    Insert(usize, String),
}

/// Computes the edits from `actual` to `desired` (a rule desired twice counts once).
pub fn edits(actual: &[String], desired: &[String]) -> Vec<Edit> {
    let mut unique = std::collections::HashSet::new();
    let desired: Vec<&String> = desired.iter().filter(|r| unique.insert(*r)).collect();
    let mut edits = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    for rule in actual {
        if desired.contains(&rule) && !cur.contains(rule) {
            cur.push(rule.clone());
        } else {
            edits.push(Edit::Delete(rule.clone()));
        }
    }
    for (i, rule) in desired.into_iter().enumerate() {
        if cur.get(i) == Some(rule) {
            continue;
        }
        if let Some(j) = cur.iter().position(|r| r == rule) {
            edits.push(Edit::Delete(rule.clone()));
            cur.remove(j);
        }
        edits.push(Edit::Insert(i + 1, rule.clone()));
        cur.insert(i, rule.clone());
    }
    edits
}

/// The rules a chain holds now, as `iptables -S` prints them after `-A CHAIN `.
pub type Listing = Vec<String>;

/// iptables, driven through the iptables crate. Each call forks the `iptables` binary, so netd
/// touches rules only when networks or port forwards change, never for a TAP.
pub struct Firewall {
    ipt: iptables::IPTables,
}

fn text(e: Box<dyn std::error::Error>) -> String {
    e.to_string()
}

impl Firewall {
    /// Finds the `iptables` binary.
    pub fn new() -> Result<Firewall, String> {
        Ok(Firewall {
            ipt: iptables::new(false).map_err(|e| format!("iptables: {e}"))?,
        })
    }

    /// Whether `chain` exists.
    pub fn exists(&self, chain: &Chain) -> Result<bool, String> {
        self.ipt.chain_exists(chain.table, chain.name).map_err(text)
    }

    /// The rules of `chain` (empty when it does not exist).
    pub fn list(&self, chain: &Chain) -> Result<Listing, String> {
        if !self.exists(chain)? {
            return Ok(vec![]);
        }
        self.rules_of(chain.table, chain.name)
    }

    fn rules_of(&self, table: &str, chain: &str) -> Result<Listing, String> {
        let prefix = format!("-A {chain} ");
        Ok(self
            .ipt
            .list(table, chain)
            .map_err(text)?
            .into_iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// How often each jump into `chain` appears in its built-in chain.
    pub fn jumps(&self, chain: &Chain) -> Result<Vec<usize>, String> {
        chain
            .jumps
            .iter()
            .map(|(builtin, jump)| {
                let rules = self.rules_of(chain.table, builtin)?;
                Ok(rules.iter().filter(|r| r == jump).count())
            })
            .collect()
    }

    /// Makes `chain` exist with exactly `desired`, jumped to once from each built-in chain.
    /// Returns what it changed.
    pub fn sync(&self, chain: &Chain, desired: &[String]) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let (table, name) = (chain.table, chain.name);
        if !self.exists(chain)? {
            self.ipt.new_chain(table, name).map_err(text)?;
            done.push(format!("iptables -t {table} -N {name}"));
        }
        let actual = self.rules_of(table, name)?;
        for edit in edits(&actual, desired) {
            match edit {
                Edit::Delete(rule) => {
                    self.ipt.delete(table, name, &rule).map_err(text)?;
                    done.push(format!("iptables -t {table} -D {name} {rule}"));
                }
                Edit::Insert(pos, rule) => {
                    self.ipt
                        .insert(table, name, &rule, pos as i32)
                        .map_err(text)?;
                    done.push(format!("iptables -t {table} -I {name} {pos} {rule}"));
                }
            }
        }
        for ((builtin, jump), count) in chain.jumps.iter().zip(self.jumps(chain)?) {
            if count == 0 {
                self.ipt.insert(table, builtin, jump, 1).map_err(text)?;
                done.push(format!("iptables -t {table} -I {builtin} 1 {jump}"));
            }
            for _ in 1..count {
                self.ipt.delete(table, builtin, jump).map_err(text)?;
                done.push(format!("iptables -t {table} -D {builtin} {jump}"));
            }
        }
        Ok(done)
    }

    /// Removes the jumps into `chain` and the chain itself, if present. Returns what it changed.
    pub fn remove(&self, chain: &Chain) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let (table, name) = (chain.table, chain.name);
        for ((builtin, jump), count) in chain.jumps.iter().zip(self.jumps(chain)?) {
            for _ in 0..count {
                self.ipt.delete(table, builtin, jump).map_err(text)?;
                done.push(format!("iptables -t {table} -D {builtin} {jump}"));
            }
        }
        if self.exists(chain)? {
            self.ipt.flush_chain(table, name).map_err(text)?;
            self.ipt.delete_chain(table, name).map_err(text)?;
            done.push(format!("iptables -t {table} -X {name}"));
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn apply(actual: &[String], edits: &[Edit]) -> Vec<String> {
        let mut cur = actual.to_vec();
        for e in edits {
            match e {
                Edit::Delete(r) => {
                    let i = cur
                        .iter()
                        .position(|x| x == r)
                        .expect("deleting a present rule");
                    cur.remove(i);
                }
                Edit::Insert(p, r) => cur.insert(p - 1, r.clone()),
            }
        }
        cur
    }

    #[test]
    fn the_rules_of_two_networks_and_a_forward() {
        let nets = [
            NetRules {
                bridge: "volant0",
                subnet: "192.168.127.0/24".parse().unwrap(),
                nat: true,
            },
            NetRules {
                bridge: "volant1",
                subnet: "192.168.128.0/24".parse().unwrap(),
                nat: false,
            },
        ];
        let fwd = [ForwardRules {
            protocol: "tcp",
            host_port: 8080,
            vm_ip: "192.168.127.100".parse().unwrap(),
            vm_port: 80,
            bridge: "volant0",
        }];
        let r = desired(&nets, &fwd);
        assert_eq!(
            r.forward,
            s(&[
                "-i volant0 -o volant1 -j DROP",
                "-i volant1 -o volant0 -j DROP",
                "-d 192.168.127.100/32 -o volant0 -p tcp -m tcp --dport 80 -j ACCEPT",
                "-i volant0 -j ACCEPT",
                "-o volant0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-i volant1 -j ACCEPT",
                "-o volant1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            ])
        );
        assert_eq!(
            r.postrouting,
            s(&["-s 192.168.127.0/24 ! -o volant0 -j MASQUERADE"])
        );
        assert_eq!(
            r.prerouting,
            s(&["-p tcp -m tcp --dport 8080 -j DNAT --to-destination 192.168.127.100:80"])
        );
    }

    #[test]
    fn edits_converge_and_leave_matching_rules_alone() {
        let want = s(&["a", "b", "c", "d"]);
        let cases: [Vec<String>; 7] = [
            s(&[]),
            s(&["a", "b", "c", "d"]),
            s(&["a", "c", "d"]),
            s(&["x", "a", "b", "y", "c", "d", "z"]),
            s(&["d", "c", "b", "a"]),
            s(&["a", "a", "b", "b", "c", "d", "d"]),
            s(&["b", "c", "d"]),
        ];
        for actual in cases {
            let e = edits(&actual, &want);
            assert_eq!(apply(&actual, &e), want, "from {actual:?} via {e:?}");
        }
        assert!(edits(&want, &want).is_empty(), "nothing to do when equal");
        assert_eq!(
            edits(&s(&["a", "c", "d"]), &want),
            vec![Edit::Insert(2, "b".into())]
        );
        assert_eq!(
            edits(&s(&["a", "b", "c", "d"]), &s(&["a", "c", "d"])),
            vec![Edit::Delete("b".into())]
        );
    }

    #[test]
    fn two_forwards_to_one_guest_port_share_their_accept_rule() {
        let nets = [NetRules {
            bridge: "volant0",
            subnet: "192.168.127.0/24".parse().unwrap(),
            nat: true,
        }];
        let to = |host_port| ForwardRules {
            protocol: "tcp",
            host_port,
            vm_ip: "192.168.127.100".parse().unwrap(),
            vm_port: 80,
            bridge: "volant0",
        };
        let r = desired(&nets, &[to(20001), to(20002)]);
        assert_eq!(r.prerouting.len(), 2);
        let accepts = r
            .forward
            .iter()
            .filter(|l| l.contains("--dport 80"))
            .count();
        assert_eq!(accepts, 1, "{:?}", r.forward);
        // A desired list with a rule twice (what panicked netd's rule task) converges too.
        let want = s(&["a", "b", "b", "c"]);
        for actual in [s(&[]), s(&["b"]), s(&["c", "b", "a"])] {
            let e = edits(&actual, &want);
            assert_eq!(apply(&actual, &e), s(&["a", "b", "c"]), "from {actual:?}");
        }
    }
}
