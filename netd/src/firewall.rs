//! netd's iptables rules, in its own chains, read with `iptables-save` and changed with one
//! `iptables-restore --noflush` transaction per sync.
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

use std::collections::BTreeMap;
use std::io::Write;
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

/// netd's chains as `iptables-save` prints them (numeric, no name lookups): each chain's
/// rules, after `-A CHAIN `.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    chains: BTreeMap<(String, String), Vec<String>>,
}

impl Tables {
    /// Reads the output of `iptables-save`.
    pub fn parse(text: &str) -> Tables {
        let mut t = Tables::default();
        let mut table = "";
        for line in text.lines() {
            if let Some(name) = line.strip_prefix('*') {
                table = name;
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split(' ').next().unwrap_or_default();
                t.chains.entry((table.into(), chain.into())).or_default();
            } else if let Some(rest) = line.strip_prefix("-A ") {
                let (chain, rule) = rest.split_once(' ').unwrap_or((rest, ""));
                t.chains
                    .entry((table.into(), chain.into()))
                    .or_default()
                    .push(rule.into());
            }
        }
        t
    }

    fn of(&self, table: &str, chain: &str) -> Option<&Vec<String>> {
        self.chains.get(&(table.to_string(), chain.to_string()))
    }

    /// Whether `chain` exists.
    pub fn exists(&self, chain: &Chain) -> bool {
        self.of(chain.table, chain.name).is_some()
    }

    /// The rules of `chain` (none when it does not exist).
    pub fn rules(&self, chain: &Chain) -> &[String] {
        self.of(chain.table, chain.name).map_or(&[], |r| r)
    }

    /// How often each jump into `chain` appears in its built-in chain.
    pub fn jumps(&self, chain: &Chain) -> Vec<usize> {
        chain
            .jumps
            .iter()
            .map(|(builtin, jump)| {
                self.of(chain.table, builtin)
                    .map_or(0, |rules| rules.iter().filter(|r| r == jump).count())
            })
            .collect()
    }
}

/// One change of a chain, applied to the chain as the previous ones left it.
#[derive(Debug, PartialEq, Eq)]
pub enum Edit {
    /// `-D CHAIN rule`: deletes the first rule equal to it.
    Delete(String),
    /// `-I CHAIN position rule`, 1-based.
    Insert(usize, String),
}

/// The edits that turn `actual` into `desired` (unique rules): rules already in place stay,
/// so a small change is a few edits however long the chain is.
pub fn edits(actual: &[String], desired: &[&String]) -> Vec<Edit> {
    let wanted: std::collections::HashSet<&String> = desired.iter().copied().collect();
    let mut kept = std::collections::HashSet::new();
    let mut edits = Vec::new();
    let mut cur: Vec<&String> = Vec::new();
    for rule in actual {
        if wanted.contains(rule) && kept.insert(rule) {
            cur.push(rule);
        } else {
            edits.push(Edit::Delete(rule.clone()));
        }
    }
    for (i, rule) in desired.iter().enumerate() {
        if cur.get(i) == Some(rule) {
            continue;
        }
        if let Some(j) = cur.iter().position(|r| r == rule) {
            edits.push(Edit::Delete((*rule).clone()));
            cur.remove(j);
        }
        edits.push(Edit::Insert(i + 1, (*rule).clone()));
        cur.insert(i, rule);
    }
    edits
}

/// A change of netd's chains: a script for `iptables-restore --noflush`, and what it does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The script; empty when nothing changes.
    pub script: String,
    /// What it changes, one line per rule or chain, for the log.
    pub actions: Vec<String>,
}

/// What turns the chains of `now` into `desired` (`None`: no chain and no jump at all). A chain
/// whose rules differ is declared, which empties it (the table is not flushed), and written
/// whole; each table's commit replaces it at once, so no packet sees it half made and no other
/// writer's change lands in between. Chains already right are not touched.
pub fn plan(now: &Tables, desired: Option<&Rules>) -> Plan {
    let mut p = Plan::default();
    for table in ["filter", "nat"] {
        let (mut declared, mut lines) = (Vec::new(), Vec::new());
        for chain in CHAINS.into_iter().filter(|c| c.table == table) {
            let name = chain.name;
            let jumps = chain.jumps.iter().zip(now.jumps(chain));
            let Some(desired) = desired else {
                for ((builtin, jump), n) in jumps {
                    for _ in 0..n {
                        lines.push(format!("-D {builtin} {jump}"));
                    }
                }
                if now.exists(chain) {
                    declared.push(format!(":{name} - [0:0]"));
                    lines.push(format!("-X {name}"));
                    p.actions.push(format!("iptables -t {table} -X {name}"));
                }
                continue;
            };
            let mut seen = std::collections::HashSet::new();
            let want: Vec<&String> = desired
                .of(chain)
                .iter()
                .filter(|r| seen.insert(*r))
                .collect();
            let have = now.rules(chain);
            let edits = edits(have, &want);
            if !now.exists(chain) || edits.len() > want.len() / 2 {
                // Many changes: the chain anew, in one piece.
                declared.push(format!(":{name} - [0:0]"));
                lines.extend(want.iter().map(|r| format!("-A {name} {r}")));
                p.actions.push(format!(
                    "iptables -t {table}: wrote {name} anew ({} rules)",
                    want.len()
                ));
            } else {
                for e in edits {
                    let line = match e {
                        Edit::Delete(r) => format!("-D {name} {r}"),
                        Edit::Insert(pos, r) => format!("-I {name} {pos} {r}"),
                    };
                    p.actions.push(format!("iptables -t {table} {line}"));
                    lines.push(line);
                }
            }
            for ((builtin, jump), n) in jumps {
                if n == 0 {
                    lines.push(format!("-I {builtin} 1 {jump}"));
                    p.actions
                        .push(format!("iptables -t {table} -I {builtin} 1 {jump}"));
                }
                for _ in 1..n {
                    lines.push(format!("-D {builtin} {jump}"));
                    p.actions
                        .push(format!("iptables -t {table} -D {builtin} {jump}"));
                }
            }
        }
        if !declared.is_empty() || !lines.is_empty() {
            p.script += &format!("*{table}\n");
            for line in declared.iter().chain(&lines) {
                p.script += line;
                p.script.push('\n');
            }
            p.script += "COMMIT\n";
        }
    }
    p
}

/// iptables through two programs: `iptables-save` reads every table in one go and
/// `iptables-restore --noflush` applies a sync's changes in one transaction. netd touches rules
/// only when networks or port forwards change, never for a TAP.
pub struct Firewall;

impl Firewall {
    /// Checks that iptables can be read.
    pub fn new() -> Result<Firewall, String> {
        let fw = Firewall;
        fw.read()?;
        Ok(fw)
    }

    /// netd's chains as they are.
    pub fn read(&self) -> Result<Tables, String> {
        let out = std::process::Command::new("iptables-save")
            .output()
            .map_err(|e| format!("running iptables-save: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "iptables-save: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tables::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Makes netd's chains hold exactly `desired` (`None`: removes them and their jumps).
    /// Returns what it changed.
    pub fn sync(&self, desired: Option<&Rules>) -> Result<Vec<String>, String> {
        let plan = plan(&self.read()?, desired);
        if plan.script.is_empty() {
            return Ok(Vec::new());
        }
        let mut child = std::process::Command::new("iptables-restore")
            .args(["--noflush", "--wait", "10"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("running iptables-restore: {e}"))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(plan.script.as_bytes()));
        let out = child
            .wait_with_output()
            .map_err(|e| format!("iptables-restore: {e}"))?;
        if !out.status.success() || !matches!(written, Some(Ok(()))) {
            return Err(format!(
                "iptables-restore refused netd's change (nothing of it was applied): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(plan.actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
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

    /// A system's rules as `iptables-save` prints them, with netd's chains in `nat`.
    fn saved(prerouting: &[&str], jumps: usize) -> String {
        let mut t = String::from(
            "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n:VOLANT-PREROUTING - [0:0]\n\
             -A PREROUTING -j DOCKER\n",
        );
        for _ in 0..jumps {
            t += "-A PREROUTING -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING\n";
        }
        for r in prerouting {
            t += &format!("-A VOLANT-PREROUTING {r}\n");
        }
        t + "COMMIT\n*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -j DROP\nCOMMIT\n"
    }

    fn apply(actual: &[String], edits: &[Edit]) -> Vec<String> {
        let mut cur = actual.to_vec();
        for e in edits {
            match e {
                Edit::Delete(r) => {
                    let i = cur.iter().position(|x| x == r).expect("a present rule");
                    cur.remove(i);
                }
                Edit::Insert(p, r) => cur.insert(p - 1, r.clone()),
            }
        }
        cur
    }

    #[test]
    fn edits_converge_and_leave_matching_rules_alone() {
        let want = s(&["a", "b", "c", "d"]);
        let refs: Vec<&String> = want.iter().collect();
        for actual in [
            s(&[]),
            s(&["a", "b", "c", "d"]),
            s(&["a", "c", "d"]),
            s(&["x", "a", "b", "y", "c", "d", "z"]),
            s(&["d", "c", "b", "a"]),
            s(&["a", "a", "b", "b", "c", "d", "d"]),
        ] {
            let e = edits(&actual, &refs);
            assert_eq!(apply(&actual, &e), want, "from {actual:?} via {e:?}");
        }
        assert!(edits(&want, &refs).is_empty());
        assert_eq!(
            edits(&s(&["a", "c", "d"]), &refs),
            vec![Edit::Insert(2, "b".into())]
        );
    }

    #[test]
    fn saved_tables_parse() {
        let t = Tables::parse(&saved(&["a", "b"], 2));
        assert_eq!(t.rules(&PREROUTING), s(&["a", "b"]));
        assert_eq!(t.jumps(&PREROUTING), [2, 0]);
        assert!(t.exists(&PREROUTING) && !t.exists(&FORWARD));
        assert_eq!(t.jumps(&FORWARD), [0]);
    }

    #[test]
    fn a_plan_rewrites_only_the_chains_that_differ_in_one_commit_per_table() {
        let mut want = Rules {
            forward: s(&["-i volant0 -j ACCEPT"]),
            postrouting: vec![],
            prerouting: s(&["a", "b"]),
        };
        // Everything to make: every chain declared before any rule or jump names it.
        let p = plan(&Tables::default(), Some(&want));
        assert_eq!(
            p.script,
            "*filter\n:VOLANT-FORWARD - [0:0]\n-A VOLANT-FORWARD -i volant0 -j ACCEPT\n\
             -I FORWARD 1 -j VOLANT-FORWARD\nCOMMIT\n*nat\n:VOLANT-POSTROUTING - [0:0]\n\
             :VOLANT-PREROUTING - [0:0]\n-I POSTROUTING 1 -j VOLANT-POSTROUTING\n\
             -A VOLANT-PREROUTING a\n-A VOLANT-PREROUTING b\n\
             -I PREROUTING 1 -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING\n\
             -I OUTPUT 1 ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING\n\
             COMMIT\n"
        );
        // Applied, nothing is left to do.
        let mut now = Tables::default();
        for chain in CHAINS {
            let key = (chain.table.to_string(), chain.name.to_string());
            now.chains.insert(key, want.of(chain).to_vec());
            for (builtin, jump) in chain.jumps {
                let key = (chain.table.to_string(), builtin.to_string());
                now.chains.entry(key).or_default().push(jump.to_string());
            }
        }
        assert_eq!(plan(&now, Some(&want)), Plan::default());
        // One rule more: only that chain, by one edit; a doubled jump goes.
        want.prerouting.push("c".into());
        let mut t = Tables::parse(&saved(&["a", "b"], 2));
        t.chains
            .extend(now.chains.into_iter().filter(|(k, _)| k.0 == "filter"));
        let p = plan(&t, Some(&want));
        assert!(!p.script.contains("*filter"), "{}", p.script);
        assert!(
            p.script.contains("\n-I VOLANT-PREROUTING 3 c\n"),
            "{}",
            p.script
        );
        assert!(!p.script.contains(":VOLANT-PREROUTING"), "{}", p.script);
        assert!(
            p.script
                .contains("-D PREROUTING -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING\n")
        );
        assert!(
            p.actions
                .contains(&"iptables -t nat -I VOLANT-PREROUTING 3 c".to_string())
        );
        // Most rules changed: the chain anew.
        want.prerouting = s(&["x", "y", "z"]);
        let p = plan(&t, Some(&want));
        assert!(
            p.script.contains(":VOLANT-PREROUTING - [0:0]\n"),
            "{}",
            p.script
        );
        assert!(
            p.script
                .contains("-A VOLANT-PREROUTING x\n-A VOLANT-PREROUTING y\n")
        );
        // Nothing wanted: jumps and chains go, other rules stay.
        let p = plan(&Tables::parse(&saved(&["a"], 1)), None);
        assert_eq!(
            p.script,
            "*nat\n:VOLANT-PREROUTING - [0:0]\n\
             -D PREROUTING -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING\n\
             -X VOLANT-PREROUTING\nCOMMIT\n"
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
        // A desired list with a rule twice (what panicked netd's rule task) is written once.
        let twice = Rules {
            prerouting: s(&["a", "b", "b"]),
            ..Rules::default()
        };
        let p = plan(&Tables::default(), Some(&twice));
        assert_eq!(p.script.matches("-A VOLANT-PREROUTING b\n").count(), 1);
    }
}
