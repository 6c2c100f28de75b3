//! Crash-proof, measured: VM creates and deletes in a loop while, at a random moment of each
//! operation, a random service (ipamd, netd, proxyd or vmmd) is killed with `kill -9` and
//! restarted. After each cycle the system must converge to the invariants
//! ([`volant_tests::invariants`]): no address leased twice, no lease, TAP, route, hypervisor or
//! vsock backend without a VM that holds it, no file of a VM that is gone (or down) in the run
//! or state directories, no cgroup of a VM that is not running, no duplicated iptables rule, every VM running (with exactly one
//! hypervisor) or cleanly failed (holding nothing). Some creates are abandoned by
//! their caller after a short deadline, which must not leave a VM half made. Short form here
//! (`VOLANT_CHAOS_CYCLES`, default 12); the long form by hand:
//! `VOLANT_CHAOS_CYCLES=200 cargo test -p volant-tests --test reliability -- --nocapture`
//! (`VOLANT_CHAOS_SEED` replays a run). It runs twice: under QEMU with the real guest, and on
//! the real Cloud Hypervisor (`VOLANT_CLOUD_HYPERVISOR`, else PATH) with the PVH stub kernel.

use std::time::{Duration, Instant};

use volant_services::api::net::v1::ListPortForwardsRequest;
use volant_services::api::vmm::v1::{
    AddPortForwardRequest, DeleteVmRequest, GetVmRequest, PortForward,
};
use volant_tests::invariants::{
    control_plane, control_plane_on_cloud_hypervisor, converge, request, snapshot,
};
use volant_tests::{ControlPlane, Daemon};

/// A small, seedable generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn victim(cp: &mut ControlPlane, i: u64) -> &mut Daemon {
    match i {
        0 => &mut cp.ipamd,
        1 => &mut cp.netd,
        2 => &mut cp.proxyd,
        _ => &mut cp.vmmd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    chaos_on(control_plane().await).await;
}

/// The same on the real Cloud Hypervisor, with the PVH stub kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_cloud_hypervisor() {
    let Some(ch) = volant_tests::cloud_hypervisor_or_skip("chaos_on_cloud_hypervisor") else {
        return;
    };
    chaos_on(control_plane_on_cloud_hypervisor(&ch).await).await;
}

/// The status of VM `name`, or `None` once it is gone.
async fn status_of(cp: &ControlPlane, name: &str) -> Option<i32> {
    match cp
        .vmm()
        .get_vm(volant_services::api::vmm::v1::GetVmRequest { name: name.into() })
        .await
    {
        Ok(r) => r.into_inner().vm.map(|v| v.status),
        Err(e) if e.code() == tonic::Code::NotFound => None,
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Waits up to 30 s for VM `name` to be gone.
async fn until_gone(cp: &ControlPlane, name: &str, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(cp, name).await.is_some() {
        assert!(Instant::now() < deadline, "{name} is still there: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stuck_delete_holds_up_no_other() {
    let mut cp = control_plane().await;
    // "a" (vsock) needs proxyd to go, "b" (bridge) needs netd; names in that order, as the
    // reconciliation visits them.
    for (name, network) in [("a", "vsock"), ("b", "")] {
        cp.vmm().create_vm(request(name, network)).await.unwrap();
    }
    cp.proxyd.kill9();
    cp.netd.kill9();
    for name in ["a", "b"] {
        let err = cp
            .vmm()
            .delete_vm(DeleteVmRequest {
                name: name.into(),
                force: false,
            })
            .await
            .unwrap_err();
        assert!(err.message().contains("retry"), "{name}: {err:?}");
    }
    // netd is back, proxyd is not: b's delete finishes by reconciliation, a's cannot yet.
    cp.netd.restart().await;
    until_gone(&cp, "b", "a stuck delete held up the reconciliation").await;
    assert_eq!(
        status_of(&cp, "a").await,
        Some(volant_services::api::vmm::v1::VmStatus::Deleting as i32)
    );
    cp.proxyd.restart().await;
    until_gone(&cp, "a", "proxyd is back").await;
    let bad = converge(&cp, Duration::from_secs(30)).await;
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A forward belongs to its VM: deleted with it even while netd is down (the issue's
/// reproduction: the DNAT rule outlived the VM and the next VM on that address inherited its
/// traffic), restored when netd loses it, and never pointing at an address its VM does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_goes_with_its_vm() {
    let mut cp = control_plane().await;
    let a = cp
        .vmm()
        .create_vm(request("a", ""))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let add = |vm: &str, host_port: u32| AddPortForwardRequest {
        vm: vm.into(),
        forward: Some(PortForward {
            host_port,
            protocol: String::new(),
            guest_port: 80,
        }),
    };
    let added = cp
        .vmm()
        .add_port_forward(add("a", 8081))
        .await
        .unwrap()
        .into_inner();
    assert!(added.created);
    assert_eq!(added.vm_ip, a.ip_address);
    assert!(
        !cp.vmm()
            .add_port_forward(add("a", 8081))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    let dnat = format!("--to-destination {}:80", a.ip_address);
    assert!(cp.host.sh("iptables-save -t nat").contains(&dnat));
    // Taken host port, bad ports and protocols, vsock VMs and unknown VMs: refused, nothing kept.
    cp.vmm().create_vm(request("v", "vsock")).await.unwrap();
    assert_eq!(
        code(cp.vmm().add_port_forward(add("v", 8082)).await),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(cp.vmm().add_port_forward(add("v", 8081)).await),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        code(cp.vmm().add_port_forward(add("nope", 8082)).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(cp.vmm().add_port_forward(add("a", 0)).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(cp.vmm().add_port_forward(add("a", 65536)).await),
        tonic::Code::InvalidArgument
    );
    let mut udp = add("a", 8083);
    udp.forward.as_mut().unwrap().protocol = "sctp".into();
    assert_eq!(
        code(cp.vmm().add_port_forward(udp).await),
        tonic::Code::InvalidArgument
    );
    // netd loses its forwards (its state removed while it is down): vmmd makes them again.
    cp.netd.kill9();
    cp.netd.restart().await;
    cp.net()
        .remove_port_forward(volant_services::api::net::v1::RemovePortForwardRequest {
            target: Some(
                volant_services::api::net::v1::remove_port_forward_request::Target::Vm("a".into()),
            ),
        })
        .await
        .unwrap();
    let bad = converge(&cp, Duration::from_secs(30)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(cp.host.sh("iptables-save -t nat").contains(&dnat));
    // The reproduction: netd down, forced delete, netd back.
    cp.netd.kill9();
    cp.vmm()
        .delete_vm(DeleteVmRequest {
            name: "a".into(),
            force: true,
        })
        .await
        .unwrap();
    cp.netd.restart().await;
    let bad = converge(&cp, Duration::from_secs(30)).await;
    assert!(bad.is_empty(), "{bad:#?}");
    let left = cp
        .net()
        .list_port_forwards(ListPortForwardsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .forwards;
    assert!(left.is_empty(), "{left:?}");
    // The next VM leases the same address and inherits nothing.
    let b = cp
        .vmm()
        .create_vm(request("b", ""))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(b.ip_address, a.ip_address);
    assert!(!cp.host.sh("iptables-save -t nat").contains(&dnat));
    // Removing: gone from the record and from netd; a second removal is NOT_FOUND.
    cp.vmm().add_port_forward(add("b", 8081)).await.unwrap();
    let remove = || volant_services::api::vmm::v1::RemovePortForwardRequest {
        vm: "b".into(),
        host_port: 8081,
        protocol: "tcp".into(),
    };
    cp.vmm().remove_port_forward(remove()).await.unwrap();
    assert_eq!(
        code(cp.vmm().remove_port_forward(remove()).await),
        tonic::Code::NotFound
    );
    let b = cp
        .vmm()
        .get_vm(GetVmRequest { name: "b".into() })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert!(b.port_forwards.is_empty());
    assert!(!cp.host.sh("iptables-save -t nat").contains(&dnat));
    let bad = converge(&cp, Duration::from_secs(30)).await;
    assert!(bad.is_empty(), "{bad:#?}");
}

/// The code of a refusal.
fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    r.unwrap_err().code()
}

async fn chaos_on(mut cp: ControlPlane) {
    let cycles: u64 = env_or("VOLANT_CHAOS_CYCLES", 12);
    let seed: u64 = env_or(
        "VOLANT_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!("chaos: {cycles} cycles, VOLANT_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let names = ["ipamd", "netd", "proxyd", "vmmd"];
    let mut kills = [0u32; 4];
    let (mut created, mut refused, mut deleted, mut forwarded) = (0, 0, 0, 0);
    let mut violations = Vec::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        let vms: Vec<String> = snapshot(&cp)
            .await
            .map(|s| s.vms.into_keys().collect())
            .unwrap_or_default();
        let mut vmm = cp.vmm();
        let create = vms.len() < 2 || (vms.len() < 5 && rng.below(10) < 6);
        let forward = !create && rng.below(3) == 0;
        let op = if create {
            let network = if rng.below(4) == 0 { "vsock" } else { "" };
            let mut req = tonic::Request::new(request(&format!("c{cycle}"), network));
            // Now and then the caller gives up early: the create must still end cleanly.
            if rng.below(4) == 0 {
                req.set_timeout(Duration::from_millis(10 + rng.below(100)));
            }
            tokio::spawn(async move { vmm.create_vm(req).await.map(drop) })
        } else if forward {
            let req = AddPortForwardRequest {
                vm: vms[rng.below(vms.len() as u64) as usize].clone(),
                forward: Some(PortForward {
                    host_port: 20000 + cycle as u32,
                    protocol: "tcp".into(),
                    guest_port: 80,
                }),
            };
            tokio::spawn(async move { vmm.add_port_forward(req).await.map(drop) })
        } else {
            let req = DeleteVmRequest {
                name: vms[rng.below(vms.len() as u64) as usize].clone(),
                force: rng.below(2) == 0,
            };
            tokio::spawn(async move { vmm.delete_vm(req).await.map(drop) })
        };
        let who = rng.below(4);
        let delay = Duration::from_millis(rng.below(150));
        kills[who as usize] += 1;
        tokio::time::sleep(delay).await;
        let daemon = victim(&mut cp, who);
        daemon.kill9();
        daemon.restart().await;
        let outcome = tokio::time::timeout(Duration::from_secs(60), op).await;
        match outcome {
            Ok(Ok(Ok(()))) if create => created += 1,
            Ok(Ok(Ok(()))) if forward => forwarded += 1,
            Ok(Ok(Ok(()))) => deleted += 1,
            Ok(Ok(Err(e))) => {
                refused += 1;
                println!(
                    "cycle {cycle}: {} killed after {delay:?}: {:?} {}",
                    names[who as usize],
                    e.code(),
                    e.message()
                );
            }
            _ => violations.push(format!("cycle {cycle}: the operation hung")),
        }
        for v in converge(&cp, Duration::from_secs(30)).await {
            violations.push(format!(
                "cycle {cycle} ({} killed after {delay:?}): {v}",
                names[who as usize]
            ));
        }
    }
    // Everything deleted leaves nothing behind.
    let left: Vec<String> = snapshot(&cp).await.unwrap().vms.into_keys().collect();
    for name in left {
        cp.vmm()
            .delete_vm(DeleteVmRequest { name, force: true })
            .await
            .unwrap();
    }
    for v in converge(&cp, Duration::from_secs(30)).await {
        violations.push(format!("after deleting everything: {v}"));
    }
    let s = snapshot(&cp).await.unwrap();
    let left = [
        ("VMs", s.vms.len()),
        ("leases", s.leases.len()),
        ("TAPs at netd", s.taps.len()),
        ("port forwards", s.forwards.len()),
        ("TAPs on the bridge", s.links.len()),
        ("routes", s.routes.len()),
        ("hypervisors", s.hypervisors.len()),
        ("vsock backends", s.backends.len()),
    ];
    for (what, n) in left.into_iter().filter(|(_, n)| *n > 0) {
        violations.push(format!("after deleting everything, {n} {what} remain"));
    }
    println!(
        "| cycles | kill -9 (ipamd/netd/proxyd/vmmd) | creates ok | forwards ok | deletes ok | refused | violations | wall |\n|---:|---|---:|---:|---:|---:|---:|---:|\n| {cycles} | {} | {created} | {forwarded} | {deleted} | {refused} | {} | {:.0} s |",
        kills.map(|k| k.to_string()).join("/"),
        violations.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}
