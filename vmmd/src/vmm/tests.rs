//! The create and delete steps, their compensations, port forwards and reconciliation, against
//! fake peers and a fake hypervisor (a `sleep` process): every failure of every step, in
//! milliseconds. The end-to-end suites run the same paths on the real daemons and guests.

use std::collections::HashMap;
use std::sync::Mutex;

use volant_services::api::proxy::v1 as proxy;

use super::*;
use crate::driver::Launched;
use crate::peers::{Lease, ipam, net};

/// Peers that keep what they are given, log every call, and fail the calls they are told to.
#[derive(Default)]
struct FakePeers {
    calls: Mutex<Vec<String>>,
    fail: Mutex<HashMap<&'static str, Error>>,
    routes: Mutex<Vec<String>>,
    leases: Mutex<Vec<(String, String, String)>>,
    taps: Mutex<Vec<(String, String)>>,
    forwards: Mutex<Vec<Forward>>,
    pools: Mutex<Vec<ipam::Pool>>,
    bridges: Mutex<Vec<net::Network>>,
    /// Bridges of the host made by hand: name, address, prefix.
    hand_made: Mutex<Vec<(String, IpAddr, u8)>>,
}

impl FakePeers {
    fn call(&self, name: &'static str, about: &str) -> Result<()> {
        lock(&self.calls).push(format!("{name} {about}"));
        match lock(&self.fail).get(name) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
    fn fail(&self, name: &'static str, e: Error) {
        lock(&self.fail).insert(name, e);
    }
    fn heal(&self) {
        lock(&self.fail).clear();
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.calls))
    }
}

#[tonic::async_trait]
impl Peers for FakePeers {
    async fn register_route(&self, route: proxy::Route) -> Result<()> {
        self.call("register_route", &route.vm)?;
        lock(&self.routes).push(route.vm);
        Ok(())
    }
    async fn unregister_route(&self, vm: &str) -> Result<()> {
        self.call("unregister_route", vm)?;
        lock(&self.routes).retain(|r| r != vm);
        Ok(())
    }
    async fn routes(&self) -> Result<Vec<String>> {
        Ok(lock(&self.routes).clone())
    }
    async fn allocate(&self, network: &str, vm: &str, _: Option<IpAddr>) -> Result<Lease> {
        self.call("allocate", vm)?;
        let mut leases = lock(&self.leases);
        let n = leases.len() as u8;
        let ip: IpAddr = [192, 168, 127, 100 + n].into();
        leases.push((network.into(), ip.to_string(), vm.into()));
        Ok(Lease {
            ip,
            prefix_len: 24,
            gateway: [192, 168, 127, 1].into(),
        })
    }
    async fn release_vm(&self, vm: &str) -> Result<()> {
        self.call("release_vm", vm)?;
        lock(&self.leases).retain(|l| l.2 != vm);
        Ok(())
    }
    async fn release(&self, _: &str, ip: &str) -> Result<()> {
        self.call("release", ip)?;
        lock(&self.leases).retain(|l| l.1 != ip);
        Ok(())
    }
    async fn leases(&self) -> Result<Vec<(String, String, String)>> {
        Ok(lock(&self.leases).clone())
    }
    async fn create_tap(&self, _: &str, vm: &str, _: IpAddr, _: u32) -> Result<(String, String)> {
        self.call("create_tap", vm)?;
        let tap = format!("tap-{vm}");
        lock(&self.taps).push((tap.clone(), vm.into()));
        Ok((tap, "52:54:00:00:00:01".into()))
    }
    async fn delete_tap(&self, vm: &str) -> Result<()> {
        self.call("delete_tap", vm)?;
        lock(&self.taps).retain(|t| t.1 != vm);
        Ok(())
    }
    async fn taps(&self) -> Result<Vec<(String, String)>> {
        Ok(lock(&self.taps).clone())
    }
    async fn add_forward(&self, f: &Forward) -> Result<()> {
        self.call("add_forward", &f.vm)?;
        let mut forwards = lock(&self.forwards);
        if !forwards.contains(f) {
            forwards.push(f.clone());
        }
        Ok(())
    }
    async fn remove_forward(&self, vm: &str, protocol: &str, port: u16) -> Result<()> {
        self.call("remove_forward", vm)?;
        lock(&self.forwards).retain(|f| f.protocol != protocol || f.host_port != port);
        Ok(())
    }
    async fn remove_forwards(&self, vm: &str) -> Result<()> {
        self.call("remove_forwards", vm)?;
        lock(&self.forwards).retain(|f| f.vm != vm);
        Ok(())
    }
    async fn forwards(&self) -> Result<Vec<Forward>> {
        Ok(lock(&self.forwards).clone())
    }
    async fn reconcile_net(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    async fn create_pool(&self, mut pool: ipam::Pool) -> Result<(ipam::Pool, bool)> {
        self.call("create_pool", &pool.name)?;
        let mut pools = lock(&self.pools);
        if let Some(p) = pools.iter().find(|p| p.name == pool.name) {
            return Ok((p.clone(), false));
        }
        if pool.gateway.is_empty() {
            pool.gateway = "10.9.0.1".into();
        }
        pools.push(pool.clone());
        Ok((pool, true))
    }
    async fn delete_pool(&self, name: &str, _: bool) -> Result<()> {
        self.call("delete_pool", name)?;
        lock(&self.pools).retain(|p| p.name != name);
        Ok(())
    }
    async fn pools(&self) -> Result<Vec<ipam::Pool>> {
        Ok(lock(&self.pools).clone())
    }
    async fn ensure_network(&self, n: net::Network, _: bool) -> Result<(net::Network, bool)> {
        self.call("ensure_network", &n.name)?;
        let mut bridges = lock(&self.bridges);
        bridges.retain(|b| b.name != n.name);
        bridges.push(n.clone());
        Ok((n, true))
    }
    async fn delete_network(&self, name: &str, _: bool) -> Result<()> {
        self.call("delete_network", name)?;
        lock(&self.bridges).retain(|b| b.name != name);
        Ok(())
    }
    async fn networks(&self) -> Result<Vec<net::Network>> {
        Ok(lock(&self.bridges).clone())
    }
    async fn inspect_bridge(&self, name: &str) -> Result<(IpAddr, u8)> {
        self.call("inspect_bridge", name)?;
        lock(&self.hand_made)
            .iter()
            .find(|b| b.0 == name)
            .map(|b| (b.1, b.2))
            .ok_or_else(|| Error::not_found(format!("netd: the host has no bridge named {name}")))
    }
}

/// A hypervisor that is a `sleep`: started, or refused when told to; stopped by SIGKILL.
#[derive(Default)]
struct FakeDriver {
    refuse: Mutex<bool>,
    pids: Mutex<HashMap<PathBuf, u32>>,
}

#[tonic::async_trait]
impl Driver for FakeDriver {
    async fn launch(&self, spec: &LaunchSpec<'_>) -> std::result::Result<Launched, String> {
        if *lock(&self.refuse) {
            return Err("the fake hypervisor refuses".into());
        }
        let child = tokio::process::Command::new("sleep")
            .arg("60")
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = child.id().unwrap_or_default();
        lock(&self.pids).insert(spec.paths.api_socket.clone(), pid);
        Ok(Launched {
            child,
            spawned_in: Duration::ZERO,
        })
    }
    async fn request_shutdown(&self, api: &std::path::Path) -> std::result::Result<(), String> {
        self.force_stop(api).await
    }
    async fn force_stop(&self, api: &std::path::Path) -> std::result::Result<(), String> {
        let pid = lock(&self.pids).remove(api);
        if let Some(p) = pid.and_then(|pid| process::Process::open(pid, None)) {
            p.kill();
        }
        Ok(())
    }
    async fn ping(&self, _: &std::path::Path) -> std::result::Result<(), String> {
        Ok(())
    }
}

struct Fixture {
    vmm: Arc<Vmm>,
    peers: Arc<FakePeers>,
    driver: Arc<FakeDriver>,
    _dir: tempfile::TempDir,
}

/// A driver shared between the fixture and the VM manager.
struct Shared(Arc<FakeDriver>);

#[tonic::async_trait]
impl Driver for Shared {
    async fn launch(&self, spec: &LaunchSpec<'_>) -> std::result::Result<Launched, String> {
        self.0.launch(spec).await
    }
    async fn request_shutdown(&self, api: &std::path::Path) -> std::result::Result<(), String> {
        self.0.request_shutdown(api).await
    }
    async fn force_stop(&self, api: &std::path::Path) -> std::result::Result<(), String> {
        self.0.force_stop(api).await
    }
    async fn ping(&self, api: &std::path::Path) -> std::result::Result<(), String> {
        self.0.ping(api).await
    }
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs) = (dir.path().join("vmlinux"), dir.path().join("initramfs"));
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::write(&initramfs, b"07070").unwrap();
    let settings = Settings {
        state_dir: dir.path().join("state"),
        run_dir: dir.path().join("run"),
        default_network: "volant0".into(),
        dns: vec![],
        hypervisor: Some(Hypervisor::Qemu),
        qemu: "qemu-system-x86_64".into(),
        cloud_hypervisor: None,
        vsock_backend: "vhost-device-vsock".into(),
        stop_timeout: Duration::from_secs(1),
        boot_timeout: Duration::from_secs(60),
        cgroups: None,
        jail: None,
    };
    std::fs::create_dir_all(&settings.state_dir).unwrap();
    std::fs::create_dir_all(&settings.run_dir).unwrap();
    let store = Store::open(&settings.state_dir).unwrap();
    let peers = Arc::new(FakePeers::default());
    let driver = Arc::new(FakeDriver::default());
    let drivers = Drivers {
        qemu: Box::new(Shared(driver.clone())),
        cloud_hypervisor: None,
    };
    let accel = Accel::new(Some("tcg".into()), dir.path().join("accel.json"));
    let vmm = Arc::new(Vmm::open(settings, store, peers.clone(), drivers, accel).unwrap());
    let manifest = serde_json::json!({
        "name": "hello", "version": "1.0.0",
        "boot": { "kernel": kernel, "initramfs": initramfs, "cmdline": "console=ttyS0" },
        "resources": { "cpu_cores": 1, "memory_mb": 64 },
        "networking": { "mode": "bridge" },
        "workload": { "entrypoint": ["/bin/true"] }
    });
    vmm.install_plugin(&manifest.to_string()).await.unwrap();
    Fixture {
        vmm,
        peers,
        driver,
        _dir: dir,
    }
}

fn request(name: &str, network: &str) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        plugin: "hello".into(),
        cpu_cores: 0,
        memory_mb: 0,
        network: network.into(),
        ip: String::new(),
        kernel_cmdline: String::new(),
    }
}

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
