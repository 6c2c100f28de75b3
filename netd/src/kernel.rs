//! Converging the kernel to the desired state: bridges and addresses, TAPs, the forwarding
//! sysctl, the iptables chains and the TAPs' anti-spoofing rules. Every function here is
//! idempotent and reports what it changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::desired::{Desired, Network, Tap};
use crate::firewall::{self, Firewall, ForwardRules, NetRules, Rules};
use crate::guard::{self, Guest};
use crate::links::{Link, Links};
use crate::naming::{bridge_mac, format_mac, is_tap_name};
use crate::tap;

/// The alias netd gives its bridges, for people reading `ip link`.
pub const BRIDGE_ALIAS: &str = "volant-netd";

/// Whether `link` is a bridge netd made or adopted. A bridge netd creates gets its fixed MAC in
/// the creating message itself (the kernel ignores an alias there), so even a bridge left by a
/// crash right after creation is recognised; an adopted bridge carries the alias.
fn owned_bridge(link: &Link) -> bool {
    link.kind == "bridge" && (link.mac == bridge_mac(&link.name) || link.alias == BRIDGE_ALIAS)
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// What a network looks like in the kernel right now.
#[derive(Debug, Default)]
pub struct Status {
    /// The bridge exists.
    pub bridge_present: bool,
    /// It is up.
    pub bridge_up: bool,
    /// Its MAC.
    pub bridge_mac: String,
    /// It carries the gateway address.
    pub address_present: bool,
    /// `net.ipv4.ip_forward` is 1.
    pub forwarding: bool,
    /// The MASQUERADE rule and its jump are in place.
    pub nat_rule: bool,
    /// The accept rules and their jump are in place.
    pub forward_rules: bool,
    /// Ports: name, state, MAC, VM.
    pub ports: Vec<(String, String, String, String)>,
    /// Forwarding database: MAC, port name, permanent.
    pub fdb: Vec<(String, String, bool)>,
    /// netd's rules that concern this network.
    pub rules: Vec<String>,
}

/// The link group of TAPs waiting to be deleted ("VTAP").
const RETIRED_GROUP: u32 = 0x5654_4150;

/// How long the reaper gathers retired TAPs before deleting them together.
const REAP_DELAY: Duration = Duration::from_millis(100);

/// The kernel side of netd.
pub struct Kernel {
    links: Links,
    firewall: Arc<Firewall>,
    /// Wakes the reaper, which deletes retired TAPs in batches: deleting one link costs a whole
    /// RCU grace period under the RTNL lock (~15 ms here, stalling every other link change),
    /// deleting a group of them costs about the same.
    reaper: Arc<Notify>,
    /// What the anti-spoofing table holds as netd last left it (`None`: read it anew); held
    /// across each read and write, so that no two interleave.
    guard: Arc<std::sync::Mutex<Option<guard::Actual>>>,
}

fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// Whether IPv4 forwarding is on.
pub fn forwarding() -> Result<bool, String> {
    std::fs::read_to_string(IP_FORWARD)
        .map(|v| v.trim() == "1")
        .map_err(|e| format!("reading {IP_FORWARD}: {e}"))
}

fn set_forwarding(on: bool) -> Result<(), String> {
    std::fs::write(IP_FORWARD, if on { "1\n" } else { "0\n" })
        .map_err(|e| format!("writing {IP_FORWARD}: {e}"))
}

/// The rules the desired state calls for.
pub fn rules_of(desired: &Desired) -> Rules {
    let nets: Vec<NetRules<'_>> = desired
        .networks
        .values()
        .map(|n| NetRules {
            bridge: &n.name,
            subnet: n.subnet,
            nat: n.nat,
        })
        .collect();
    let forwards: Vec<ForwardRules<'_>> = desired
        .forwards
        .values()
        .map(|f| ForwardRules {
            protocol: match f.protocol {
                crate::desired::Protocol::Tcp => "tcp",
                crate::desired::Protocol::Udp => "udp",
            },
            host_port: f.host_port,
            vm_ip: f.vm_ip,
            vm_port: f.vm_port,
            bridge: &f.network,
        })
        .collect();
    firewall::desired(&nets, &forwards)
}

/// The guests the anti-spoofing table should let through; no table at all without a network.
pub fn guests_of(desired: &Desired) -> Option<BTreeSet<String>> {
    if desired.networks.is_empty() {
        return None;
    }
    let guests: Vec<Guest<'_>> = desired
        .taps
        .values()
        .map(|t| Guest {
            tap: &t.name,
            mac: t.mac,
            ip: t.ip,
        })
        .collect();
    Some(guard::elements(&guests))
}

impl Kernel {
    /// Connects to netlink and finds iptables. Needs a Tokio runtime.
    pub fn connect() -> Result<Kernel, String> {
        let links = Links::connect().map_err(|e| format!("netlink: {e}"))?;
        let reaper = Arc::new(Notify::new());
        let (wake, reaping) = (reaper.clone(), links.clone());
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                tokio::time::sleep(REAP_DELAY).await;
                if let Err(e) = reaping.delete_group(RETIRED_GROUP).await {
                    tracing::warn!("{e}; the next reconciliation retries");
                }
            }
        });
        Ok(Kernel {
            links,
            firewall: Arc::new(Firewall::new()?),
            reaper,
            guard: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    /// The index of the interface called `name`, if any: one ioctl, cheaper than netlink.
    pub fn index(&self, name: &str) -> Option<u32> {
        if_index(name)
    }

    /// The interface called `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, String> {
        self.links.get(name).await
    }

    /// The addresses of interface `index`, with their prefix lengths.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpAddr, u8)>, String> {
        self.links.addresses(index).await
    }

    /// The host's IPv4 routes: destination and outgoing interface name.
    pub async fn routes(&self) -> Result<Vec<(ipnet::IpNet, String)>, String> {
        let names: HashMap<u32, String> = self
            .links
            .list()
            .await?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect();
        Ok(self
            .links
            .routes()
            .await?
            .into_iter()
            .map(|(dst, oif)| {
                let dev = oif.and_then(|i| names.get(&i).cloned()).unwrap_or_default();
                (dst, dev)
            })
            .collect())
    }

    /// Makes the bridge of `net` exist, marked as netd's, up, with the gateway address and no
    /// other IPv4 address. Returns its index.
    pub async fn apply_network(
        &self,
        net: &Network,
        done: &mut Vec<String>,
    ) -> Result<u32, String> {
        let name = &net.name;
        let mut created = false;
        let link = match self.links.get(name).await? {
            Some(link) => link,
            None => {
                created = true;
                self.links.add_bridge(name, &bridge_mac(name)).await?;
                done.push(format!("created bridge {name}"));
                self.links
                    .get(name)
                    .await?
                    .ok_or_else(|| format!("bridge {name} vanished after creation"))?
            }
        };
        if link.kind != "bridge" {
            return Err(format!(
                "interface {name} exists and is a {} device, not a bridge",
                if link.kind.is_empty() {
                    "non-bridge"
                } else {
                    &link.kind
                }
            ));
        }
        if link.alias != BRIDGE_ALIAS {
            // An existing bridge of that name, made by hand as the networking guide describes,
            // is adopted.
            self.links.set_alias(link.index, BRIDGE_ALIAS).await?;
            if !created {
                done.push(format!("adopted bridge {name}"));
            }
        }
        if !link.up {
            self.links.set_up(link.index).await?;
            done.push(format!("set {name} up"));
        }
        let prefix = net.subnet.prefix_len();
        let addrs = self.links.addresses(link.index).await?;
        for (ip, len) in &addrs {
            if ip.is_ipv4() && (*ip != net.gateway || *len != prefix) {
                self.links.delete_address(link.index, *ip).await?;
                done.push(format!("removed {ip}/{len} from {name}"));
            }
        }
        if !addrs.contains(&(net.gateway, prefix)) {
            self.links
                .add_address(link.index, net.gateway, prefix)
                .await?;
            done.push(format!("added {}/{prefix} to {name}", net.gateway));
        }
        Ok(link.index)
    }

    /// Deletes the bridge `name` if it is netd's.
    pub async fn remove_network(&self, name: &str, done: &mut Vec<String>) -> Result<(), String> {
        if let Some(link) = self.links.get(name).await?
            && owned_bridge(&link)
        {
            self.links.delete(link.index).await?;
            done.push(format!("deleted bridge {name}"));
        }
        Ok(())
    }

    /// Makes the TAP exist, up and enslaved to the bridge with index `bridge`. A TAP retired
    /// moments ago and not yet reaped is taken back into service.
    pub async fn apply_tap(
        &self,
        t: &Tap,
        bridge: u32,
        done: &mut Vec<String>,
    ) -> Result<(), String> {
        if let Some(index) = if_index(&t.name) {
            match self.links.get(&t.name).await? {
                Some(l) if l.kind != "tun" => {
                    return Err(format!("interface {} exists and is not a TAP", t.name));
                }
                Some(l) if l.up && l.master == Some(bridge) && l.group != RETIRED_GROUP => {
                    return Ok(());
                }
                Some(_) => match self.links.attach(index, bridge).await {
                    Ok(()) => {
                        done.push(format!("attached {} to its bridge", t.name));
                        return Ok(());
                    }
                    // Reaped in between: create it anew.
                    Err(_) if if_index(&t.name).is_none() => {}
                    Err(e) => return Err(e),
                },
                None => {}
            }
        }
        // Closing the creating descriptor waits for an RCU grace period: off the async workers.
        let (name, owner) = (t.name.clone(), t.owner);
        tokio::task::spawn_blocking(move || tap::create(&name, owner))
            .await
            .map_err(|e| format!("TAP task: {e}"))?
            .map_err(|e| format!("creating TAP {}: {e}", t.name))?;
        let index =
            if_index(&t.name).ok_or_else(|| format!("TAP {} vanished after creation", t.name))?;
        self.links.attach(index, bridge).await?;
        done.push(format!("created TAP {}", t.name));
        Ok(())
    }

    /// Gives the existing TAP of `t` to its recorded owner (it must have no hypervisor attached).
    pub async fn set_tap_owner(&self, t: &Tap, done: &mut Vec<String>) -> Result<(), String> {
        let (name, owner) = (t.name.clone(), t.owner);
        tokio::task::spawn_blocking(move || tap::create(&name, owner))
            .await
            .map_err(|e| format!("TAP task: {e}"))?
            .map_err(|e| format!("giving TAP {} to its owner: {e}", t.name))?;
        done.push(format!("gave TAP {} to uid {:?}", t.name, t.owner));
        Ok(())
    }

    /// Retires the TAP `name`: it leaves netd's records at once and the reaper deletes the
    /// device moments later, together with the others retired meanwhile. (Taking it down or off
    /// its bridge now would cost an RCU grace period of its own; its VM is gone already.)
    pub async fn remove_tap(&self, name: &str, done: &mut Vec<String>) -> Result<(), String> {
        let Some(index) = if_index(name) else {
            return Ok(());
        };
        self.links.set_group(index, RETIRED_GROUP).await?;
        self.reaper.notify_one();
        done.push(format!("deleted TAP {name}"));
        Ok(())
    }

    /// Deletes the retired TAPs now, not after the reaper's delay.
    pub async fn reap_now(&self) -> Result<(), String> {
        self.links.delete_group(RETIRED_GROUP).await
    }

    /// Makes netd's chains hold exactly the rules `desired` calls for; with no network at all,
    /// removes the chains and their jumps.
    pub async fn sync_rules(
        &self,
        desired: &Desired,
        done: &mut Vec<String>,
    ) -> Result<(), String> {
        let rules = (!desired.networks.is_empty()).then(|| rules_of(desired));
        let fw = self.firewall.clone();
        let started = std::time::Instant::now();
        let changed = tokio::task::spawn_blocking(move || fw.sync(rules.as_ref()))
            .await
            .map_err(|e| format!("iptables task: {e}"))
            .and_then(|r| r);
        crate::metrics::rule_sync("iptables", started.elapsed(), changed.is_ok());
        done.extend(changed?);
        Ok(())
    }

    /// Makes the anti-spoofing table let exactly `guests` through, or removes it with `None`;
    /// the entries of deleted TAPs go only with `sweep` (see [`guard::Actual::script`]). With
    /// `fresh`, the table is read anew rather than taken as netd last left it (anything may
    /// have changed it meanwhile).
    pub async fn sync_guard(
        &self,
        guests: Option<BTreeSet<String>>,
        fresh: bool,
        sweep: bool,
        done: &mut Vec<String>,
    ) -> Result<(), String> {
        let lock = self.guard.clone();
        let started = std::time::Instant::now();
        let changed = tokio::task::spawn_blocking(move || {
            let mut known = lock.lock().unwrap_or_else(|e| e.into_inner());
            if fresh {
                *known = None;
            }
            guard::sync(&mut known, guests.as_ref(), sweep)
        })
        .await
        .map_err(|e| format!("ebtables task: {e}"))
        .and_then(|r| r);
        crate::metrics::rule_sync("ebtables", started.elapsed(), changed.is_ok());
        done.extend(changed?);
        Ok(())
    }

    /// Turns forwarding on while there are networks, recording what it was; restores it after
    /// the last network.
    pub fn sync_forwarding(
        &self,
        desired: &mut Desired,
        done: &mut Vec<String>,
    ) -> Result<bool, String> {
        let on = forwarding()?;
        let mut record_changed = false;
        if !desired.networks.is_empty() {
            if desired.forwarding_before.is_none() {
                desired.forwarding_before = Some(on);
                record_changed = true;
            }
            if !on {
                set_forwarding(true)?;
                done.push("set net.ipv4.ip_forward=1".into());
            }
        } else if let Some(before) = desired.forwarding_before.take() {
            record_changed = true;
            if on != before {
                set_forwarding(before)?;
                done.push(format!("restored net.ipv4.ip_forward={}", u8::from(before)));
            }
        }
        Ok(record_changed)
    }

    /// Converges everything: networks, stray bridges, TAPs, stray TAPs, rules. Forwarding is
    /// handled by the caller, which persists the recorded setting.
    pub async fn reconcile(&self, desired: &Desired, done: &mut Vec<String>) -> Result<(), String> {
        let mut bridges = BTreeMap::new();
        for net in desired.networks.values() {
            bridges.insert(net.name.clone(), self.apply_network(net, done).await?);
        }
        self.sync_guard(guests_of(desired), true, true, done)
            .await?;
        for t in desired.taps.values() {
            let bridge = bridges
                .get(&t.network)
                .copied()
                .ok_or_else(|| format!("TAP {} names unknown network {}", t.name, t.network))?;
            self.apply_tap(t, bridge, done).await?;
        }
        for link in self.links.list().await? {
            let stray_bridge = owned_bridge(&link) && !desired.networks.contains_key(&link.name);
            let stray_tap = link.kind == "tun"
                && is_tap_name(&link.name)
                && link.group != RETIRED_GROUP
                && !desired.taps.values().any(|t| t.name == link.name);
            if stray_bridge {
                self.links.delete(link.index).await?;
                done.push(format!("deleted stray bridge {}", link.name));
            } else if stray_tap {
                self.remove_tap(&link.name, done).await?;
            }
        }
        // Retired TAPs go now, also those a previous run left behind.
        self.links.delete_group(RETIRED_GROUP).await?;
        self.sync_rules(desired, done).await
    }

    /// The live state of `net`.
    pub async fn status(&self, net: &Network, desired: &Desired) -> Result<Status, String> {
        let mut st = Status {
            forwarding: forwarding()?,
            ..Default::default()
        };
        let fw = self.firewall.clone();
        let now = tokio::task::spawn_blocking(move || fw.read())
            .await
            .map_err(|e| format!("iptables task: {e}"))??;
        let actual: Vec<&[String]> = firewall::CHAINS.iter().map(|c| now.rules(c)).collect();
        let jumped: Vec<bool> = firewall::CHAINS
            .iter()
            .map(|c| now.jumps(c).iter().all(|n| *n >= 1))
            .collect();
        let [forward, postrouting, prerouting] = [actual[0], actual[1], actual[2]];
        let nat_rule = firewall::masquerade(&NetRules {
            bridge: &net.name,
            subnet: net.subnet,
            nat: net.nat,
        });
        st.nat_rule = net.nat && jumped[1] && postrouting.contains(&nat_rule);
        st.forward_rules = jumped[0]
            && firewall::accepts(&net.name)
                .iter()
                .all(|r| forward.contains(r));
        let word = |rule: &String| rule.split(' ').any(|w| w == net.name);
        let to_subnet = |rule: &String| {
            rule.split(' ')
                .filter_map(|w| {
                    w.rsplit_once(':')
                        .and_then(|(ip, _)| ip.parse::<IpAddr>().ok())
                })
                .any(|ip| net.subnet.contains(&ip))
        };
        st.rules = forward
            .iter()
            .filter(|r| word(r))
            .map(|r| format!("-A {} {r}", firewall::FORWARD.name))
            .chain(
                postrouting
                    .iter()
                    .filter(|r| word(r))
                    .map(|r| format!("-A {} {r}", firewall::POSTROUTING.name)),
            )
            .chain(
                prerouting
                    .iter()
                    .filter(|r| to_subnet(r))
                    .map(|r| format!("-A {} {r}", firewall::PREROUTING.name)),
            )
            .collect();
        let taps: Vec<&str> = desired
            .taps
            .values()
            .filter(|t| t.network == net.name)
            .map(|t| t.name.as_str())
            .collect();
        if !taps.is_empty() {
            let lock = self.guard.clone();
            let saved = tokio::task::spawn_blocking(move || {
                let _one_reader = lock.lock().unwrap_or_else(|e| e.into_inner());
                guard::read()
            })
            .await
            .map_err(|e| format!("ebtables task: {e}"))??;
            st.rules.extend(
                saved
                    .elements
                    .iter()
                    .filter(|e| taps.iter().any(|t| e.starts_with(&format!("\"{t}\" "))))
                    .map(|e| format!("nft bridge {} guests: {e}", guard::TABLE)),
            );
        }

        let Some(bridge) = self.links.get(&net.name).await? else {
            return Ok(st);
        };
        st.bridge_present = true;
        st.bridge_up = bridge.up;
        st.bridge_mac = format_mac(&bridge.mac);
        st.address_present = self
            .links
            .addresses(bridge.index)
            .await?
            .contains(&(net.gateway, net.subnet.prefix_len()));
        let links = self.links.list().await?;
        let names: HashMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
        for port in links.iter().filter(|l| l.master == Some(bridge.index)) {
            let vm = desired
                .taps
                .values()
                .find(|t| t.name == port.name)
                .map(|t| t.vm.clone())
                .unwrap_or_default();
            st.ports.push((
                port.name.clone(),
                port.state.clone(),
                format_mac(&port.mac),
                vm,
            ));
        }
        for entry in self.links.fdb(bridge.index).await? {
            let port = names
                .get(&entry.port)
                .copied()
                .unwrap_or_default()
                .to_string();
            st.fdb.push((format_mac(&entry.mac), port, entry.permanent));
        }
        Ok(st)
    }
}
