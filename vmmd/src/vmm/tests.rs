//! The create and delete steps, their compensations, port forwards and reconciliation, against
//! fake peers and a fake hypervisor (a `sleep` process): every failure of every step, in
//! milliseconds. The end-to-end suites run the same paths on the real daemons and guests.

use super::fakes::{fixture, request};
use super::*;
use crate::peers::net;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_takes_its_steps_in_order_and_a_delete_undoes_them_in_reverse() {
    let f = fixture().await;
    let rec = f.vmm.create(request("a", "")).await.unwrap().0;
    assert_eq!(rec.status, VmStatus::Booting);
    assert_eq!(rec.ip, Some([192, 168, 127, 100].into()));
    assert_eq!(f.peers.calls(), ["allocate a", "create_tap a"]);
    assert!(f.vmm.delete("a", false).await.unwrap());
    assert_eq!(
        f.peers.calls(),
        ["remove_forwards a", "delete_tap a", "release_vm a"]
    );
    assert!(f.vmm.get("a").is_err());
    assert!(!f.vmm.delete("a", false).await.unwrap(), "deleting again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_refused_by_a_peer_is_undone_and_leaves_no_record() {
    for (step, e, says) in [
        (
            "allocate",
            Error::not_found("ipamd: no pool"),
            "has no address pool",
        ),
        (
            "allocate",
            Error::exhausted("ipamd: pool full"),
            "pool full",
        ),
        ("create_tap", Error::unavailable("netd: down"), "netd: down"),
    ] {
        let f = fixture().await;
        f.peers.fail(step, e.clone());
        let err = f.vmm.create(request("a", "")).await.unwrap_err();
        assert_eq!(err.kind(), e.kind(), "{step}");
        assert!(err.message().contains(says), "{step}: {err}");
        assert!(
            err.message().contains("nothing of vm \"a\" was kept"),
            "{err}"
        );
        assert!(f.vmm.get("a").is_err(), "{step}: a record was kept");
        let calls = f.peers.calls();
        assert!(
            calls.ends_with(&["release_vm a".to_string()]),
            "{step}: {calls:?}"
        );
        assert!(lock(&f.peers.leases).is_empty() && lock(&f.peers.taps).is_empty());
        // The cause fixed, the same create succeeds.
        f.peers.heal();
        f.vmm.create(request("a", "")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_that_cannot_start_leaves_a_failed_vm_holding_nothing() {
    let f = fixture().await;
    *lock(&f.driver.refuse) = true;
    let err = f.vmm.create(request("a", "")).await.unwrap_err();
    assert_eq!(err.kind(), Kind::Precondition);
    let rec = f.vmm.get("a").unwrap();
    assert_eq!(rec.status, VmStatus::Failed);
    assert!(
        rec.error.contains("the fake hypervisor refuses"),
        "{}",
        rec.error
    );
    assert_eq!((rec.ip, rec.tap.as_str()), (None, ""));
    assert!(lock(&f.peers.leases).is_empty() && lock(&f.peers.taps).is_empty());
    // A failed VM starts again once its hypervisor can.
    *lock(&f.driver.refuse) = false;
    assert_eq!(f.vmm.start("a").await.unwrap().status, VmStatus::Booting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_a_peer_refuses_stays_deleting_until_retried_or_forced() {
    let f = fixture().await;
    f.vmm.create(request("a", "")).await.unwrap();
    f.vmm.create(request("v", "vsock")).await.unwrap();
    f.peers
        .fail("release_vm", Error::unavailable("ipamd: down"));
    f.peers
        .fail("unregister_route", Error::unavailable("proxyd: down"));
    let err = f.vmm.delete("a", false).await.unwrap_err();
    assert!(err.message().contains("retry"), "{err}");
    assert_eq!(f.vmm.get("a").unwrap().status, VmStatus::Deleting);
    // The reconciliation's pass: v's delete is stuck too, and holds up nothing else.
    f.vmm.delete("v", false).await.unwrap_err();
    lock(&f.peers.fail).remove("release_vm");
    f.vmm.reconcile_once().await.unwrap_err();
    assert!(f.vmm.get("a").is_err(), "a's delete finished");
    assert_eq!(f.vmm.get("v").unwrap().status, VmStatus::Deleting);
    assert!(f.vmm.delete("v", true).await.unwrap(), "forced");
    assert!(f.vmm.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_are_recorded_first_and_undone_when_netd_refuses() {
    let f = fixture().await;
    f.vmm.create(request("a", "")).await.unwrap();
    f.vmm.create(request("b", "")).await.unwrap();
    f.vmm.create(request("v", "vsock")).await.unwrap();
    let fwd = |port| PortForward::checked("tcp", port, 80).unwrap();
    f.peers
        .fail("add_forward", Error::exists("netd: host port taken"));
    let err = f.vmm.add_forward("a", fwd(8080)).await.unwrap_err();
    assert_eq!(err.kind(), Kind::Exists);
    assert!(f.vmm.get("a").unwrap().forwards.is_empty(), "undone");
    f.peers.heal();
    let (ip, created) = f.vmm.add_forward("a", fwd(8080)).await.unwrap();
    assert_eq!((ip, created), ([192, 168, 127, 100].into(), true));
    assert!(!f.vmm.add_forward("a", fwd(8080)).await.unwrap().1);
    let taken = f.vmm.add_forward("b", fwd(8080)).await.unwrap_err();
    assert!(taken.message().contains("vm \"a\""), "{taken}");
    let vsock = f.vmm.add_forward("v", fwd(8081)).await.unwrap_err();
    assert_eq!(vsock.kind(), Kind::Precondition);
    // Removed from the record even while netd is down; reconciliation removes the rule.
    f.peers
        .fail("remove_forward", Error::unavailable("netd: down"));
    f.vmm.remove_forward("a", "tcp", 8080).await.unwrap();
    assert!(f.vmm.get("a").unwrap().forwards.is_empty());
    assert_eq!(lock(&f.peers.forwards).len(), 1);
    f.peers.heal();
    f.vmm.reconcile_peers().await.unwrap();
    assert!(lock(&f.peers.forwards).is_empty());
    let gone = f.vmm.remove_forward("a", "tcp", 8080).await.unwrap_err();
    assert_eq!(gone.kind(), Kind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_repairs_each_peer_from_the_records() {
    let f = fixture().await;
    f.vmm.create(request("a", "")).await.unwrap();
    f.vmm
        .add_forward("a", PortForward::checked("udp", 5353, 53).unwrap())
        .await
        .unwrap();
    f.vmm.create(request("v", "vsock")).await.unwrap();
    // What no VM holds, and what a peer lost.
    lock(&f.peers.leases).push(("volant0".into(), "192.168.127.200".into(), "gone".into()));
    lock(&f.peers.taps).push(("tap-gone".into(), "gone".into()));
    lock(&f.peers.routes).clear();
    lock(&f.peers.routes).push("gone".into());
    let stale = Forward {
        vm: "gone".into(),
        protocol: "tcp".into(),
        host_port: 9000,
        vm_ip: [192, 168, 127, 100].into(),
        vm_port: 80,
    };
    lock(&f.peers.forwards).clear();
    lock(&f.peers.forwards).push(stale);
    f.peers.calls();
    f.vmm.reconcile_once().await.unwrap();
    let mut calls = f.peers.calls();
    calls.sort();
    assert_eq!(
        calls,
        [
            "add_forward a",
            "delete_tap gone",
            "register_route v",
            "release 192.168.127.200",
            "remove_forward gone",
            "unregister_route gone",
        ]
    );
    f.vmm.reconcile_once().await.unwrap();
    assert!(
        f.peers.calls().is_empty(),
        "a second pass has nothing to repair"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_illegal_transition_changes_nothing() {
    let f = fixture().await;
    f.vmm.create(request("a", "")).await.unwrap();
    f.vmm.stop("a").await.unwrap();
    let before = f.vmm.get("a").unwrap();
    assert_eq!(before.status, VmStatus::Stopped);
    let err = f.vmm.transition("a", Event::Ready, |_| {}).unwrap_err();
    assert_eq!(err.kind(), Kind::Precondition);
    assert!(
        err.message().contains("a stopped VM cannot become ready"),
        "{err}"
    );
    assert_eq!(f.vmm.get("a").unwrap(), before);
    // Stopping a stopped VM is fine; starting it runs it again.
    assert_eq!(f.vmm.stop("a").await.unwrap().status, VmStatus::Stopped);
    assert_eq!(f.vmm.start("a").await.unwrap().status, VmStatus::Booting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_is_its_pool_then_its_bridge_and_a_failed_bridge_takes_the_pool_back() {
    let f = fixture().await;
    let bridge = |name: &str| net::Network {
        name: name.into(),
        subnet: "10.9.0.0/24".into(),
        nat: true,
        ..Default::default()
    };
    f.peers.fail(
        "ensure_network",
        Error::invalid("netd: the subnet overlaps"),
    );
    let err = f
        .vmm
        .create_network(bridge("n1"), Default::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Kind::Invalid);
    assert_eq!(
        f.peers.calls(),
        ["create_pool n1", "ensure_network n1", "delete_pool n1"]
    );
    assert!(f.vmm.networks().await.unwrap().is_empty(), "nothing kept");
    f.peers.heal();
    let (n, created) = f
        .vmm
        .create_network(bridge("n1"), Default::default())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(n.bridge.unwrap().gateway, "10.9.0.1", "the pool's gateway");
    // A VM on it holds it, unless forced.
    f.vmm.create(request("a", "bridge=n1")).await.unwrap();
    let err = f.vmm.delete_network("n1", false).await.unwrap_err();
    assert!(err.message().contains("vm(s) a"), "{err}");
    assert_eq!(f.vmm.networks().await.unwrap().len(), 1);
    f.peers.calls();
    f.vmm.delete_network("n1", true).await.unwrap();
    assert_eq!(f.peers.calls(), ["delete_network n1", "delete_pool n1"]);
    let gone = f.vmm.network("n1").await.unwrap_err();
    assert_eq!(gone.kind(), Kind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_made_by_hand_is_adopted_on_first_use_and_said_so() {
    let f = fixture().await;
    // No bridge by that name: refused, nothing kept, nothing made.
    f.peers.fail(
        "allocate",
        Error::not_found("ipamd: pool \"volant1\" does not exist"),
    );
    let err = f
        .vmm
        .create(request("a", "bridge=volant1"))
        .await
        .unwrap_err();
    assert!(err.message().contains("has no address pool"), "{err}");
    assert!(f.vmm.get("a").is_err() && f.vmm.networks().await.unwrap().is_empty());
    f.peers.heal();
    f.peers.calls();
    // The guide's recipe: ip link add volant1 type bridge; ip addr add 192.168.128.1/24 …
    lock(&f.peers.hand_made).push(("volant1".into(), [192, 168, 128, 1].into(), 24));
    let (_, notes) = f.vmm.create(request("a", "bridge=volant1")).await.unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("adopted the bridge volant1 (192.168.128.1/24)"),
        "{notes:?}"
    );
    assert_eq!(
        f.peers.calls(),
        [
            "inspect_bridge volant1",
            "create_pool volant1",
            "ensure_network volant1",
            "allocate a",
            "create_tap a"
        ]
    );
    let bridge = lock(&f.peers.bridges)[0].clone();
    assert_eq!(
        (bridge.subnet.as_str(), bridge.gateway.as_str(), bridge.nat),
        ("192.168.128.0/24", "192.168.128.1", true)
    );
    // Adopted once: the next VM finds its network.
    let (_, notes) = f.vmm.create(request("b", "bridge=volant1")).await.unwrap();
    assert!(notes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_made_before_records_held_them_are_adopted_once() {
    let f = fixture().await;
    f.vmm.create(request("a", "")).await.unwrap();
    // A store from before: netd holds a's forward, made through the old gateway path.
    f.vmm
        .store
        .unmark(crate::records::FORWARDS_IN_RECORDS)
        .unwrap();
    let at = |vm: &str, port: u16| Forward {
        vm: vm.into(),
        protocol: "tcp".into(),
        host_port: port,
        vm_ip: [192, 168, 127, 100].into(),
        vm_port: 80,
    };
    lock(&f.peers.forwards).extend([at("a", 8080), at("gone", 8081)]);
    f.vmm.reconcile_peers().await.unwrap();
    let kept = PortForward::checked("tcp", 8080, 80).unwrap();
    assert_eq!(
        f.vmm.get("a").unwrap().forwards,
        std::slice::from_ref(&kept)
    );
    assert_eq!(
        *lock(&f.peers.forwards),
        [at("a", 8080)],
        "a VM that is gone keeps none"
    );
    // Once only: a forward made at netd afterwards is nobody's.
    lock(&f.peers.forwards).push(at("a", 8082));
    f.vmm.reconcile_peers().await.unwrap();
    assert_eq!(f.vmm.get("a").unwrap().forwards, [kept]);
    assert_eq!(*lock(&f.peers.forwards), [at("a", 8080)]);
}
