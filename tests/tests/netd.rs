//! netd as a real process in throwaway network namespaces: the bridge, rules and forwarding it
//! sets up, TAPs, real traffic between VM stand-ins, an upstream host behind NAT and a port
//! forward, crashes and restarts, teardown, and bad input.
//!
//! Layout of every lab: netd runs in the "host" namespace; an "upstream" namespace sits behind
//! the veth `up0` (host 10.99.0.1, upstream 10.99.0.2) and has no route back to the VM subnets,
//! so anything that reaches it from a VM went through NAT. VM stand-ins are namespaces whose
//! `eth0` is a veth enslaved to a bridge, with a lease address and the gateway as default route.

use std::collections::BTreeSet;
use std::time::Duration;

use tonic::Code;
use volant_services::Channel;
use volant_services::api::net::v1::net_client::NetClient;
use volant_services::api::net::v1::{
    AddPortForwardRequest, CreateTapRequest, DeleteNetworkRequest, DeleteTapRequest,
    EnsureNetworkRequest, GetNetworkRequest, HostPort, ListNetworksRequest,
    ListPortForwardsRequest, ListTapsRequest, Network, PortForward, ReconcileRequest,
    RemovePortForwardRequest, remove_port_forward_request,
};
use volant_tests::{Daemon, Netns, firewall_save, host_and_upstream};

type Client = NetClient<Channel>;

struct Lab {
    root: tempfile::TempDir,
    netd: Daemon,
    client: Client,
    /// `iptables-save` and the links of the host before netd first started.
    pristine: (String, BTreeSet<String>),
    up: Netns,
    host: Netns,
}

async fn lab() -> Lab {
    let root = tempfile::tempdir().unwrap();
    let (host, up) = host_and_upstream();
    // An operator's own rules, which netd must never touch.
    host.sh("iptables -A FORWARD -s 10.98.0.0/16 -j ACCEPT && \
         iptables -t nat -A POSTROUTING -s 10.98.0.0/16 -o up0 -j MASQUERADE");
    // A new namespace inherits the host's forwarding (Docker's hosts have it on): the lab sets
    // its own, so that what netd restores is known.
    host.sh("sysctl -qw net.ipv4.ip_forward=0");
    let pristine = (firewall_save(&host), host.links());
    let netd = Daemon::start_in(Some(&host), "netd", root.path(), &[]).await;
    let client = NetClient::new(netd.channel());
    Lab {
        root,
        netd,
        client,
        pristine,
        up,
        host,
    }
}

impl Lab {
    /// A VM stand-in on `bridge` with address `ip`/24 and gateway `gw`.
    fn vm(&self, name: &str, bridge: &str, ip: &str, gw: &str) -> Netns {
        let ns = Netns::new(name);
        self.host.sh(&format!(
            "ip link add vs-{name} type veth peer name eth0 netns {} && \
             ip link set vs-{name} master {bridge} up",
            ns.name
        ));
        ns.sh(&format!(
            "ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via {gw}"
        ));
        ns
    }

    async fn restart(&mut self, crash: bool) {
        if crash {
            self.netd.kill9();
        } else {
            assert!(self.netd.terminate().success(), "SIGTERM exit status");
        }
        self.netd.restart().await;
        self.client = NetClient::new(self.netd.channel());
    }

    async fn reconcile(&mut self) -> Vec<String> {
        self.client
            .reconcile(ReconcileRequest {})
            .await
            .unwrap()
            .into_inner()
            .actions
    }
}

fn net(name: &str, subnet: &str, gateway: &str) -> EnsureNetworkRequest {
    EnsureNetworkRequest {
        network: Some(Network {
            name: name.into(),
            subnet: subnet.into(),
            gateway: gateway.into(),
            nat: true,
            status: None,
        }),
        update: false,
    }
}

/// The elements of netd's anti-spoofing set: `"tap" . mac . ip`.
fn guests(ns: &Netns) -> BTreeSet<String> {
    let listing = ns.sh("nft list set bridge volant guests");
    let Some((_, rest)) = listing.split_once("elements = {") else {
        return BTreeSet::new();
    };
    rest.split('}')
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

/// Waits (up to 5 s) until the anti-spoofing set is `want`: a deleted TAP's entry goes right
/// after its delete is answered.
async fn until_guests(ns: &Netns, want: BTreeSet<String>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while guests(ns) != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "guests {:?}, want {want:?}",
            guests(ns)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tap(network: &str, vm: &str, ip: &str) -> CreateTapRequest {
    CreateTapRequest {
        network: network.into(),
        vm: vm.into(),
        ip: ip.into(),
        owner_uid: 0,
    }
}

fn forward(host_port: u32, protocol: &str, vm_ip: &str, vm_port: u32) -> AddPortForwardRequest {
    AddPortForwardRequest {
        forward: Some(PortForward {
            host_port,
            protocol: protocol.into(),
            vm_ip: vm_ip.into(),
            vm_port,
            vm: String::new(),
            network: String::new(),
        }),
    }
}

const DEFAULT_RULES: &str = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:VOLANT-FORWARD - [0:0]
-A FORWARD -j VOLANT-FORWARD
-A FORWARD -s 10.98.0.0/16 -j ACCEPT
-A VOLANT-FORWARD -i volant0 -j ACCEPT
-A VOLANT-FORWARD -o volant0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:VOLANT-POSTROUTING - [0:0]
:VOLANT-PREROUTING - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j VOLANT-PREROUTING
-A POSTROUTING -j VOLANT-POSTROUTING
-A POSTROUTING -s 10.98.0.0/16 -o up0 -j MASQUERADE
-A VOLANT-POSTROUTING -s 192.168.127.0/24 ! -o volant0 -j MASQUERADE
COMMIT
table bridge volant {
	set guests {
		type ifname . ether_addr . ipv4_addr
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_network_comes_up_as_the_guide_sets_it_up_and_survives_restarts() {
    let mut lab = lab().await;
    let addr = lab.host.sh("ip -o -4 addr show dev volant0");
    assert!(addr.contains("inet 192.168.127.1/24"), "{addr}");
    let link = lab.host.sh("ip -o link show volant0");
    assert!(link.contains(",UP") || link.contains("<UP"), "{link}");
    assert_eq!(lab.host.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert_eq!(firewall_save(&lab.host), DEFAULT_RULES);

    let status = lab
        .client
        .get_network(GetNetworkRequest {
            name: "volant0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .network
        .unwrap()
        .status
        .unwrap();
    assert!(status.bridge_present && status.bridge_up && status.address_present);
    assert!(status.forwarding && status.nat_rule && status.forward_rules);
    assert_eq!(status.rules.len(), 3, "{:?}", status.rules);

    for i in 0..10 {
        lab.restart(i % 2 == 1).await;
        assert_eq!(firewall_save(&lab.host), DEFAULT_RULES, "after restart {i}");
    }
    assert_eq!(
        lab.reconcile().await,
        Vec::<String>::new(),
        "nothing left to converge"
    );
    assert!(lab.netd.log_text().contains("netd serving"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_are_persistent_vnet_hdr_taps_on_the_bridge_and_touch_no_rule() {
    let mut lab = lab().await;
    let rules = firewall_save(&lab.host);
    let long_vm = "a-very-long-vm-name-that-broke-flintlock";
    let mut names = Vec::new();
    for (vm, ip) in [("web", "192.168.127.100"), (long_vm, "192.168.127.101")] {
        let reply = lab
            .client
            .create_tap(tap("volant0", vm, ip))
            .await
            .unwrap()
            .into_inner();
        assert!(reply.created);
        assert!(
            reply.tap.len() <= 15
                && (reply.tap.starts_with("vmtap-") || reply.tap.starts_with("vmtap_")),
            "{}",
            reply.tap
        );
        let first = u8::from_str_radix(&reply.mac[..2], 16).unwrap();
        assert_eq!(
            first & 0x03,
            0x02,
            "locally administered unicast: {}",
            reply.mac
        );
        let details = lab.host.sh(&format!("ip -d link show {}", reply.tap));
        assert!(
            details.contains("tun type tap pi off vnet_hdr on persist on"),
            "{details}"
        );
        assert!(details.contains("master volant0"), "{details}");
        assert!(
            details.contains(",UP") || details.contains("<UP"),
            "{details}"
        );
        let again = lab
            .client
            .create_tap(tap("volant0", vm, ip))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (again.tap.as_str(), again.mac.as_str(), again.created),
            (reply.tap.as_str(), reply.mac.as_str(), false)
        );
        names.push(reply.tap);
    }
    assert_eq!(names[0], "vmtap-web");
    // The long name's hash digits are a valid VM name: that VM gets a TAP of its own, and
    // deleting its TAP (as a failed create's rollback does) leaves the long-named VM's alone.
    let digits = names[1].strip_prefix("vmtap_").expect("hashed").to_string();
    let other = lab
        .client
        .create_tap(tap("volant0", &digits, "192.168.127.102"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.tap, names[1]);
    for _ in 0..2 {
        lab.client
            .delete_tap(DeleteTapRequest { vm: digits.clone() })
            .await
            .unwrap();
    }
    assert!(
        lab.host.links().contains(&names[1]),
        "another VM's TAP was removed"
    );
    // Owned by netd's user (root here): no other local user can attach to it.
    assert_eq!(
        lab.host.sh("cat /sys/class/net/vmtap-web/owner").trim(),
        "0"
    );

    let listed = lab
        .client
        .list_taps(ListTapsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .taps;
    assert_eq!(listed.len(), 2);
    let status = lab
        .client
        .get_network(GetNetworkRequest {
            name: "volant0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .network
        .unwrap()
        .status
        .unwrap();
    let ports: BTreeSet<(String, String)> = status
        .ports
        .iter()
        .map(|p| (p.name.clone(), p.vm.clone()))
        .collect();
    assert!(
        ports.contains(&("vmtap-web".into(), "web".into())),
        "{ports:?}"
    );
    assert!(
        ports.contains(&(names[1].clone(), long_vm.into())),
        "{ports:?}"
    );

    // The TAPs survive a crash of netd, and a stray TAP with netd's prefix does not.
    lab.host.sh("ip tuntap add dev vmtap-stray mode tap");
    lab.restart(true).await;
    let present = lab.host.links();
    assert!(present.contains("vmtap-web") && present.contains(&names[1]));
    assert!(
        !present.contains("vmtap-stray"),
        "stray TAP removed on start"
    );

    for vm in ["web", long_vm] {
        let del = lab
            .client
            .delete_tap(DeleteTapRequest { vm: vm.into() })
            .await
            .unwrap();
        assert!(del.into_inner().deleted);
        let del = lab
            .client
            .delete_tap(DeleteTapRequest { vm: vm.into() })
            .await
            .unwrap();
        assert!(!del.into_inner().deleted, "idempotent");
    }
    // Deleted TAPs leave netd's records at once and the devices go in the reaper's next batch
    // (within a fraction of a second), which a reconciliation runs straight away; their
    // entries in the anti-spoofing set go right after the answer.
    until_guests(&lab.host, BTreeSet::new()).await;
    assert_eq!(lab.reconcile().await, Vec::<String>::new());
    assert!(!lab.host.links().iter().any(|l| l.starts_with("vmtap-")));
    assert_eq!(firewall_save(&lab.host), rules, "TAPs touched iptables");

    let err = lab
        .client
        .create_tap(tap("nonet", "web", "192.168.127.100"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_where_it_should_and_nowhere_else() {
    let mut lab = lab().await;
    lab.client
        .ensure_network(net("volant1", "192.168.128.0/24", ""))
        .await
        .unwrap();
    let a = lab.vm("a", "volant0", "192.168.127.100", "192.168.127.1");
    let b = lab.vm("b", "volant0", "192.168.127.101", "192.168.127.1");
    let c = lab.vm("c", "volant1", "192.168.128.100", "192.168.128.1");
    a.serve("0.0.0.0:80", "a");
    b.serve("0.0.0.0:80", "b");
    c.serve("0.0.0.0:80", "c");
    lab.up.serve("0.0.0.0:80", "up");

    // Host → VM, VM → VM on one bridge.
    assert_eq!(
        lab.host.fetch("192.168.127.100:80").unwrap(),
        "a sees 192.168.127.1"
    );
    assert_eq!(
        a.fetch("192.168.127.101:80").unwrap(),
        "b sees 192.168.127.100"
    );
    // VM → upstream through NAT: the upstream sees the host's address, and has no route back.
    assert_eq!(a.fetch("10.99.0.2:80").unwrap(), "up sees 10.99.0.1");
    assert_eq!(c.fetch("10.99.0.2:80").unwrap(), "up sees 10.99.0.1");
    // No traffic between volant0 and volant1.
    assert!(
        a.fetch("192.168.128.100:80").is_err(),
        "volant0 reached volant1"
    );
    assert!(
        c.fetch("192.168.127.100:80").is_err(),
        "volant1 reached volant0"
    );

    // Upstream → host port → VM, and the host itself through the same forward.
    let before = firewall_save(&lab.host);
    let reply = lab
        .client
        .add_port_forward(forward(8080, "tcp", "192.168.127.100", 80))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.created);
    assert_eq!(reply.forward.unwrap().network, "volant0");
    assert_eq!(lab.up.fetch("10.99.0.1:8080").unwrap(), "a sees 10.99.0.2");
    assert_eq!(
        lab.host.fetch("10.99.0.1:8080").unwrap(),
        "a sees 10.99.0.1"
    );
    let same = lab
        .client
        .add_port_forward(forward(8080, "tcp", "192.168.127.100", 80))
        .await
        .unwrap();
    assert!(!same.into_inner().created);
    let clash = lab
        .client
        .add_port_forward(forward(8080, "tcp", "192.168.127.101", 80))
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::AlreadyExists, "{clash:?}");
    // Another host port to the same guest port: both forward (their accept rule is one).
    let second = lab
        .client
        .add_port_forward(forward(8081, "tcp", "192.168.127.100", 80))
        .await
        .unwrap()
        .into_inner();
    assert!(second.created);
    assert_eq!(lab.up.fetch("10.99.0.1:8081").unwrap(), "a sees 10.99.0.2");
    assert_eq!(lab.up.fetch("10.99.0.1:8080").unwrap(), "a sees 10.99.0.2");
    lab.client
        .remove_port_forward(RemovePortForwardRequest {
            target: Some(remove_port_forward_request::Target::HostPort(HostPort {
                protocol: "tcp".into(),
                port: 8081,
            })),
        })
        .await
        .unwrap();
    assert_eq!(lab.up.fetch("10.99.0.1:8080").unwrap(), "a sees 10.99.0.2");
    assert_eq!(
        lab.client
            .list_port_forwards(ListPortForwardsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .forwards
            .len(),
        1
    );

    // The bridge has learned the stand-in's MAC.
    let mac = a.sh("cat /sys/class/net/eth0/address").trim().to_string();
    let status = lab
        .client
        .get_network(GetNetworkRequest {
            name: "volant0".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .network
        .unwrap()
        .status
        .unwrap();
    assert!(
        status
            .fdb
            .iter()
            .any(|e| e.mac == mac && e.port == "vs-a" && !e.permanent),
        "{:?}",
        status.fdb
    );
    assert!(
        status.rules.iter().any(|r| r.contains("DNAT")),
        "{:?}",
        status.rules
    );

    let removed = lab
        .client
        .remove_port_forward(RemovePortForwardRequest {
            target: Some(remove_port_forward_request::Target::HostPort(HostPort {
                port: 8080,
                protocol: "tcp".into(),
            })),
        })
        .await
        .unwrap()
        .into_inner()
        .removed;
    assert_eq!(removed.len(), 1);
    assert_eq!(firewall_save(&lab.host), before, "removal is exact");
    assert!(lab.up.fetch("10.99.0.1:8080").is_err());
    lab.restart(true).await;
    assert_eq!(
        a.fetch("10.99.0.2:80").unwrap(),
        "up sees 10.99.0.1",
        "after a crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_calls_converges_on_restart() {
    let mut lab = lab().await;
    for round in 0..3 {
        // The TAPs go on a network of their own, with room for every address they lease.
        lab.client
            .ensure_network(net("vbig", "10.200.0.0/16", ""))
            .await
            .unwrap();
        let mut tasks = Vec::new();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for w in 0..4 {
            let mut c = NetClient::new(lab.netd.channel());
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0.. {
                    let vm = format!("r{round}w{w}n{i}");
                    let ip = format!("10.200.{}.{}", (round * 4 + w) * 16 + i / 250, 2 + i % 250);
                    if c.create_tap(tap("vbig", &vm, &ip)).await.is_err() {
                        break;
                    }
                    acked.push(vm);
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                acked
            }));
        }
        let mut c = NetClient::new(lab.netd.channel());
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let name = format!("x{round}{}", i % 3);
                let subnet = format!("10.{}.{}.0/24", 100 + round, i % 3);
                if c.ensure_network(net(&name, &subnet, "")).await.is_err() {
                    break;
                }
                let req = DeleteNetworkRequest { name, force: true };
                if c.delete_network(req).await.is_err() {
                    break;
                }
            }
            Vec::new()
        }));
        // Kill it in full flight: once a few calls went through, at a moment that moves.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while done.load(std::sync::atomic::Ordering::SeqCst) < 6
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50 + 100 * round)).await;
        lab.netd.kill9();
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        assert!(
            acked.len() > 5,
            "round {round}: only {} TAPs acknowledged",
            acked.len()
        );
        lab.netd.restart().await;
        lab.client = NetClient::new(lab.netd.channel());

        let taps = lab
            .client
            .list_taps(ListTapsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .taps;
        let listed: BTreeSet<String> = taps.iter().map(|t| t.name.clone()).collect();
        // Exactly the recorded TAPs pass, each with its own MAC and address.
        let passing: BTreeSet<String> = taps
            .iter()
            .map(|t| format!("\"{}\" . {} . {}", t.name, t.mac, t.ip))
            .collect();
        assert_eq!(guests(&lab.host), passing, "round {round}");
        let devices: BTreeSet<String> = lab
            .host
            .links()
            .into_iter()
            .filter(|l| l.starts_with("vmtap-"))
            .collect();
        assert_eq!(
            listed, devices,
            "round {round}: TAP devices differ from netd's record"
        );
        for vm in &acked {
            let name = format!("vmtap-{vm}");
            assert!(devices.contains(&name), "acknowledged {name} lost");
            let details = lab.host.sh(&format!("ip -d link show {name}"));
            assert!(details.contains("master vbig"), "{details}");
        }
        // A network whose create or delete was cut off may or may not exist, but the bridges
        // are exactly the networks netd reports, and deleting them leaves the default rules.
        let nets: BTreeSet<String> = lab
            .client
            .list_networks(ListNetworksRequest {})
            .await
            .unwrap()
            .into_inner()
            .networks
            .into_iter()
            .map(|n| n.name)
            .collect();
        let bridges: BTreeSet<String> = lab
            .host
            .sh("ip -o link show type bridge")
            .lines()
            .filter_map(|l| l.split(": ").nth(1).map(str::to_string))
            .collect();
        assert_eq!(nets, bridges, "round {round}");
        assert_eq!(lab.reconcile().await, Vec::<String>::new());
        for name in nets.into_iter().filter(|n| n != "volant0") {
            let req = DeleteNetworkRequest { name, force: true };
            lab.client.delete_network(req).await.unwrap();
        }
        assert_eq!(firewall_save(&lab.host), DEFAULT_RULES, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_networks_leaves_nothing_behind() {
    let mut lab = lab().await;
    let with_default = (firewall_save(&lab.host), lab.host.links());
    lab.client
        .ensure_network(net("volant1", "192.168.128.0/24", "192.168.128.254"))
        .await
        .unwrap();
    lab.client
        .create_tap(tap("volant1", "db", "192.168.128.100"))
        .await
        .unwrap();
    lab.client
        .add_port_forward(forward(5432, "udp", "192.168.128.100", 5432))
        .await
        .unwrap();
    let addr = lab.host.sh("ip -o -4 addr show dev volant1");
    assert!(addr.contains("192.168.128.254/24"), "{addr}");

    let err = lab
        .client
        .delete_network(DeleteNetworkRequest {
            name: "volant1".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let deleted = lab
        .client
        .delete_network(DeleteNetworkRequest {
            name: "volant1".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert!(deleted);
    assert_eq!((firewall_save(&lab.host), lab.host.links()), with_default);

    let err = lab
        .client
        .delete_network(DeleteNetworkRequest {
            name: "volant0".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "the config's network needs force"
    );
    lab.client
        .delete_network(DeleteNetworkRequest {
            name: "volant0".into(),
            force: true,
        })
        .await
        .unwrap();
    assert_eq!((firewall_save(&lab.host), lab.host.links()), lab.pristine);
    assert_eq!(
        lab.host.sh("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0",
        "restored to the lab's value"
    );
    let again = lab
        .client
        .delete_network(DeleteNetworkRequest {
            name: "volant0".into(),
            force: true,
        })
        .await
        .unwrap();
    assert!(!again.into_inner().deleted, "idempotent");
    drop(lab.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_changes_nothing() {
    let mut lab = lab().await;
    lab.host.sh("ip route add 10.50.0.0/16 dev up0");
    lab.client
        .create_tap(tap("volant0", "web", "192.168.127.100"))
        .await
        .unwrap();
    lab.client
        .add_port_forward(forward(8080, "tcp", "192.168.127.100", 80))
        .await
        .unwrap();
    let snapshot = |lab: &Lab| (firewall_save(&lab.host), lab.host.links());
    let before = snapshot(&lab);
    let nets_before = lab
        .client
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks
        .len();

    let nets = [
        (
            net("Bad!", "10.1.0.0/24", ""),
            Code::InvalidArgument,
            "network name",
        ),
        (
            net("a-very-long-name", "10.1.0.0/24", ""),
            Code::InvalidArgument,
            "at most 15",
        ),
        (net("br1", "10.1.0.0", ""), Code::InvalidArgument, "CIDR"),
        (
            net("br1", "10.1.0.9/24", ""),
            Code::InvalidArgument,
            "host bits",
        ),
        (
            net("br1", "10.1.0.0/24", "10.2.0.1"),
            Code::InvalidArgument,
            "outside the subnet",
        ),
        (
            net("br1", "192.168.0.0/16", ""),
            Code::InvalidArgument,
            "overlaps network \"volant0\"",
        ),
        (
            net("br1", "10.50.1.0/24", ""),
            Code::InvalidArgument,
            "route 10.50.0.0/16 dev up0",
        ),
        (
            net("br1", "10.99.0.0/24", ""),
            Code::InvalidArgument,
            "route 10.99.0.0/24 dev up0",
        ),
        (
            net("up0", "10.1.0.0/24", ""),
            Code::AlreadyExists,
            "not a bridge",
        ),
        (
            net("volant0", "10.1.0.0/24", ""),
            Code::AlreadyExists,
            "already exists",
        ),
        (
            EnsureNetworkRequest {
                network: None,
                update: false,
            },
            Code::InvalidArgument,
            "network is required",
        ),
    ];
    for (req, code, why) in nets {
        let err = lab.client.ensure_network(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }
    let ok = "192.168.127.101";
    let taps = [
        (tap("nonet", "db", ok), Code::NotFound, "does not exist"),
        (tap("volant0", "DB", ok), Code::InvalidArgument, "vm \"DB\""),
        (
            tap("volant0", "", ok),
            Code::InvalidArgument,
            "vm is required",
        ),
        (
            tap("bad net", "db", ok),
            Code::InvalidArgument,
            "network \"bad net\"",
        ),
        (
            tap("volant0", "db", ""),
            Code::InvalidArgument,
            "ip is required",
        ),
        (
            tap("volant0", "db", "fd00::5"),
            Code::InvalidArgument,
            "not an IPv4 address",
        ),
        (
            tap("volant0", "db", "10.7.0.1"),
            Code::InvalidArgument,
            "outside the subnet 192.168.127.0/24",
        ),
        (
            tap("volant0", "db", "192.168.127.1"),
            Code::InvalidArgument,
            "gateway",
        ),
        (
            tap("volant0", "db", "192.168.127.255"),
            Code::InvalidArgument,
            "broadcast",
        ),
        (
            tap("volant0", "db", "192.168.127.100"),
            Code::AlreadyExists,
            "held by vm \"web\"",
        ),
    ];
    for (req, code, why) in taps {
        let err = lab.client.create_tap(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }
    let forwards = [
        (
            forward(0, "tcp", "192.168.127.100", 80),
            Code::InvalidArgument,
            "host_port 0",
        ),
        (
            forward(70000, "tcp", "192.168.127.100", 80),
            Code::InvalidArgument,
            "1–65535",
        ),
        (
            forward(8081, "tcp", "192.168.127.100", 0),
            Code::InvalidArgument,
            "vm_port 0",
        ),
        (
            forward(8081, "sctp", "192.168.127.100", 80),
            Code::InvalidArgument,
            "sctp",
        ),
        (
            forward(8081, "tcp", "web", 80),
            Code::InvalidArgument,
            "not an IP address",
        ),
        (
            forward(8081, "tcp", "10.7.0.1", 80),
            Code::InvalidArgument,
            "lies in no network",
        ),
        (
            forward(8081, "tcp", "192.168.127.1", 80),
            Code::InvalidArgument,
            "gateway",
        ),
        (
            forward(8081, "tcp", "192.168.127.255", 80),
            Code::InvalidArgument,
            "broadcast",
        ),
        (
            forward(8080, "tcp", "192.168.127.101", 80),
            Code::AlreadyExists,
            "already forwards",
        ),
        (
            AddPortForwardRequest { forward: None },
            Code::InvalidArgument,
            "forward is required",
        ),
    ];
    for (req, code, why) in forwards {
        let err = lab.client.add_port_forward(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }
    let removals = [
        (None, "set host_port or vm"),
        (
            Some(remove_port_forward_request::Target::HostPort(HostPort {
                port: 0,
                protocol: "tcp".into(),
            })),
            "host_port 0",
        ),
        (
            Some(remove_port_forward_request::Target::Vm("No!".into())),
            "vm \"No!\"",
        ),
    ];
    for (target, why) in removals {
        let req = RemovePortForwardRequest { target };
        let err = lab
            .client
            .remove_port_forward(req.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
        assert!(err.message().contains(why), "{req:?}: {}", err.message());
    }
    let err = lab
        .client
        .delete_network(DeleteNetworkRequest {
            name: "Bad!".into(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = lab
        .client
        .get_network(GetNetworkRequest {
            name: "nonet".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = lab
        .client
        .delete_tap(DeleteTapRequest { vm: "Bad!".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    assert_eq!(snapshot(&lab), before, "bad input changed the host");
    let nets_after = lab
        .client
        .list_networks(ListNetworksRequest {})
        .await
        .unwrap()
        .into_inner()
        .networks
        .len();
    assert_eq!(nets_after, nets_before);
    assert_eq!(lab.reconcile().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_sends_only_from_its_own_mac_and_leased_address() {
    let mut lab = lab().await;
    let victim = lab.vm("victim", "volant0", "192.168.127.100", "192.168.127.1");
    victim.serve("0.0.0.0:80", "victim");
    lab.up.serve("0.0.0.0:80", "up");
    let reply = lab
        .client
        .create_tap(tap("volant0", "mallory", "192.168.127.101"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.tap, "vmtap-mallory");
    let mac = reply.mac;
    // A guest with root: a real network stack behind a veth that takes the TAP's place (the
    // guard knows a TAP by its name), free to set any address and MAC.
    let mallory = Netns::new("mallory");
    let swap_in = |lab: &Lab| {
        lab.host.sh(&format!(
            "ip link del vmtap-mallory 2>/dev/null; \
             ip link add vmtap-mallory type veth peer name eth0 netns {} && \
             ip link set vmtap-mallory master volant0 up",
            mallory.name
        ));
    };
    let act_as = |mac: &str, ip: &str| {
        mallory.sh(&format!(
            "ip link set eth0 down && ip link set eth0 address {mac} && ip addr flush dev eth0 \
             && ip addr add {ip}/24 dev eth0 && ip link set eth0 up && \
             ip route replace default via 192.168.127.1"
        ));
    };
    swap_in(&lab);

    // Honest: its own MAC and lease reach the gateway, the other VM and the upstream.
    act_as(&mac, "192.168.127.101");
    assert_eq!(
        mallory.fetch("192.168.127.100:80").unwrap(),
        "victim sees 192.168.127.101"
    );
    assert_eq!(mallory.fetch("10.99.0.2:80").unwrap(), "up sees 10.99.0.1");

    // Another VM's address, an address nobody leased, the gateway's: nothing gets through,
    // and the host never learns the thief's MAC for the victim's address.
    let spoofs = [
        (mac.as_str(), "192.168.127.100"),
        (mac.as_str(), "192.168.127.150"),
        ("02:66:66:66:66:66", "192.168.127.101"),
        ("02:66:66:66:66:66", "192.168.127.150"),
    ];
    for (m, ip) in spoofs {
        act_as(m, ip);
        assert!(
            mallory.fetch("10.99.0.2:80").is_err(),
            "{m} {ip} reached the upstream"
        );
        assert!(
            mallory.fetch("192.168.127.100:80").is_err() || ip == "192.168.127.100",
            "{m} {ip} reached the victim"
        );
        let (_, neigh) = lab.host.try_sh("ip neigh show 192.168.127.100");
        assert!(
            !neigh.contains(m),
            "the host learnt {m} for the victim: {neigh}"
        );
    }
    assert_eq!(
        lab.host.fetch("192.168.127.100:80").unwrap(),
        "victim sees 192.168.127.1",
        "the victim's address still leads to the victim"
    );
    // IPv6 (the bridge's link-local address) gets nothing from it either.
    act_as(&mac, "192.168.127.101");
    let bridge_ll = lab
        .host
        .sh("ip -6 -o addr show dev volant0 scope link | awk '{print $4}' | cut -d/ -f1");
    if !bridge_ll.trim().is_empty() {
        let (reached, out) =
            mallory.try_sh(&format!("ping -6 -c 2 -W 1 {}%eth0", bridge_ll.trim()));
        assert!(!reached, "IPv6 from a TAP reached the host: {out}");
    }

    // Without the guard the same spoof goes through: the test bites.
    lab.host.sh("nft delete table bridge volant");
    act_as(&mac, "192.168.127.150");
    assert_eq!(mallory.fetch("10.99.0.2:80").unwrap(), "up sees 10.99.0.1");
    // Reconciliation (and a restart after kill -9) puts it back.
    lab.host.sh("ip link del vmtap-mallory");
    let repaired = lab.reconcile().await;
    assert!(repaired.iter().any(|a| a.contains("nft")), "{repaired:?}");
    assert_eq!(lab.reconcile().await, Vec::<String>::new(), "converged");
    lab.restart(true).await;
    swap_in(&lab);
    act_as(&mac, "192.168.127.150");
    assert!(
        mallory.fetch("10.99.0.2:80").is_err(),
        "spoofing after repair"
    );
    act_as(&mac, "192.168.127.101");
    assert_eq!(mallory.fetch("10.99.0.2:80").unwrap(), "up sees 10.99.0.1");

    // The VM's next lease replaces its last one; its delete takes its entry with it.
    lab.host.sh("ip link del vmtap-mallory");
    lab.client
        .create_tap(tap("volant0", "mallory", "192.168.127.102"))
        .await
        .unwrap();
    let entry = |ip: &str| format!("\"vmtap-mallory\" . {mac} . {ip}");
    assert_eq!(
        guests(&lab.host),
        BTreeSet::from([entry("192.168.127.102")])
    );
    lab.client
        .delete_tap(DeleteTapRequest {
            vm: "mallory".into(),
        })
        .await
        .unwrap();
    until_guests(&lab.host, BTreeSet::new()).await;
}

/// With `--withdraw-on-exit` (as the compose stack runs it) SIGTERM leaves the namespace as it
/// was before netd first started, forwarding included; the next start makes every network, TAP
/// and forward again from the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_on_exit_leaves_nothing_until_the_next_start() {
    let root = tempfile::tempdir().unwrap();
    let (host, _up) = host_and_upstream();
    host.sh("sysctl -qw net.ipv4.ip_forward=0");
    // An operator's own rules, which netd must leave as they are.
    host.sh("iptables -A FORWARD -s 10.98.0.0/16 -j ACCEPT && \
         iptables -t nat -A POSTROUTING -s 10.98.0.0/16 -o up0 -j MASQUERADE");
    let pristine = (firewall_save(&host), host.links());
    let args = ["--withdraw-on-exit"];
    let mut netd = Daemon::start_in(Some(&host), "netd", root.path(), &args).await;
    let mut client = NetClient::new(netd.channel());
    client
        .ensure_network(net("volant1", "192.168.128.0/24", "192.168.128.254"))
        .await
        .unwrap();
    client
        .create_tap(tap("volant1", "db", "192.168.128.100"))
        .await
        .unwrap();
    client
        .add_port_forward(forward(5432, "tcp", "192.168.128.100", 5432))
        .await
        .unwrap();
    let made = (firewall_save(&host), host.links());
    assert_ne!(made, pristine);
    let forwarding = || {
        host.sh("cat /proc/sys/net/ipv4/ip_forward")
            .trim()
            .to_string()
    };
    assert_eq!(forwarding(), "1");

    for round in 0..2 {
        assert!(netd.terminate().success(), "SIGTERM exit status");
        assert_eq!(
            (firewall_save(&host), host.links()),
            pristine,
            "round {round}"
        );
        assert_eq!(forwarding(), "0", "restored to the lab's value");
        netd.restart().await;
        client = NetClient::new(netd.channel());
        assert_eq!((firewall_save(&host), host.links()), made, "round {round}");
        assert_eq!(forwarding(), "1");
    }
    let taps = client
        .list_taps(ListTapsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .taps;
    assert_eq!(taps.len(), 1, "the records stayed: {taps:?}");
    drop(client);
    assert!(netd.terminate().success());
    assert_eq!((firewall_save(&host), host.links()), pristine);
}
