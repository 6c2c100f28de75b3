//! Fakes for vmmd's unit tests: peers that keep what they are given, log every call and fail
//! the calls they are told to, and a hypervisor that is a `sleep` process.

use std::collections::HashMap;
use std::sync::Mutex;

use volant_services::api::proxy::v1 as proxy;

use super::*;
use crate::driver::Launched;
use crate::peers::{Lease, ipam, net};

/// Peers that keep what they are given, log every call, and fail the calls they are told to.
#[derive(Default)]
pub(super) struct FakePeers {
    pub(super) calls: Mutex<Vec<String>>,
    pub(super) fail: Mutex<HashMap<&'static str, Error>>,
    pub(super) routes: Mutex<Vec<String>>,
    pub(super) leases: Mutex<Vec<(String, String, String)>>,
    pub(super) taps: Mutex<Vec<(String, String)>>,
    pub(super) forwards: Mutex<Vec<Forward>>,
    pub(super) pools: Mutex<Vec<ipam::Pool>>,
    pub(super) bridges: Mutex<Vec<net::Network>>,
    /// Bridges of the host made by hand: name, address, prefix.
    pub(super) hand_made: Mutex<Vec<(String, IpAddr, u8)>>,
}

impl FakePeers {
    fn call(&self, name: &'static str, about: &str) -> Result<()> {
        lock(&self.calls).push(format!("{name} {about}"));
        match lock(&self.fail).get(name) {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
    pub(super) fn fail(&self, name: &'static str, e: Error) {
        lock(&self.fail).insert(name, e);
    }
    pub(super) fn heal(&self) {
        lock(&self.fail).clear();
    }
    pub(super) fn calls(&self) -> Vec<String> {
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
pub(super) struct FakeDriver {
    pub(super) refuse: Mutex<bool>,
    pub(super) pids: Mutex<HashMap<PathBuf, u32>>,
}

#[tonic::async_trait]
impl Driver for Arc<FakeDriver> {
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

pub(super) struct Fixture {
    pub(super) vmm: Arc<Vmm>,
    pub(super) peers: Arc<FakePeers>,
    pub(super) driver: Arc<FakeDriver>,
    _dir: tempfile::TempDir,
}

pub(super) async fn fixture() -> Fixture {
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
        qemu: Box::new(driver.clone()),
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

pub(super) fn request(name: &str, network: &str) -> CreateRequest {
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
