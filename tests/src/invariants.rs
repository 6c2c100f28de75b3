//! The invariants of a control plane at rest, read from every owner (vmmd's records, ipamd's
//! leases, netd's TAPs and the bridge's ports, proxyd's routes, the hypervisor and vsock backend
//! processes, iptables), for the reliability and concurrency runs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use volant_services::api::ipam::v1::ListLeasesRequest;
use volant_services::api::net::v1::{ListPortForwardsRequest, ListTapsRequest};
use volant_services::api::proxy::v1::ListRoutesRequest;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;
use volant_services::api::vmm::v1::{CreateVmRequest, ListVmsRequest, Vm, VmStatus};

use crate::{ControlPlane, host_and_upstream, processes_by_arg};

/// A control plane whose vmmd reconciles every two seconds, with `hello` installed.
pub async fn control_plane() -> ControlPlane {
    let (host, up) = host_and_upstream();
    let cp = ControlPlane::start_in(
        host,
        up,
        &[("RUST_LOG", "warn")],
        // Many guests boot at once under emulation here: they have time to.
        "  stop_timeout_secs: 2\n  reconcile_interval_secs: 2\n  boot_timeout_secs: 1800",
    )
    .await;
    cp.install_hello().await;
    cp
}

/// Like [`control_plane`], with vmmd on the Cloud Hypervisor at `binary` and `hello` a plugin of
/// the PVH stub kernel ([`crate::stub`]), written under the control plane's root.
pub async fn control_plane_on_cloud_hypervisor(binary: &std::path::Path) -> ControlPlane {
    let (host, up) = host_and_upstream();
    let cp = ControlPlane::start_in(
        host,
        up,
        &[("RUST_LOG", "warn")],
        &format!(
            "  hypervisor: cloud-hypervisor\n  cloud_hypervisor_binary: {}\n  \
             stop_timeout_secs: 1\n  reconcile_interval_secs: 2",
            binary.display()
        ),
    )
    .await;
    let (kernel, initramfs) = crate::stub::write(cp.root.path(), "stub", crate::stub::READY);
    let manifest = serde_json::json!({
        "name": "hello", "version": "1.0.0",
        "boot": { "kernel": kernel, "initramfs": initramfs, "cmdline": "console=ttyS0" },
        "resources": { "cpu_cores": 1, "memory_mb": 64 },
        "networking": { "mode": "bridge" },
        "workload": { "entrypoint": ["/bin/true"] }
    });
    cp.vmm()
        .install_plugin(volant_services::api::vmm::v1::InstallPluginRequest {
            manifest_json: manifest.to_string(),
        })
        .await
        .expect("installing the stub plugin");
    cp
}

pub fn request(name: &str, network: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        plugin: "hello".into(),
        network: network.into(),
        memory_mb: 64,
        ..Default::default()
    }
}

/// The VM whose `<run>/vms/<vm>/<file>` is among a process's arguments.
fn vm_of(args: &[String], run: &str, file: &str) -> Option<String> {
    let prefix = format!("{run}/vms/");
    args.iter().find_map(|a| {
        let rest = &a[a.find(&prefix)? + prefix.len()..];
        let (vm, tail) = rest.split_once('/')?;
        tail.starts_with(file).then(|| vm.to_string())
    })
}

/// What the system looks like right now, read from every owner.
pub struct Snapshot {
    pub vms: BTreeMap<String, Vm>,
    pub leases: Vec<(String, String)>,
    pub taps: Vec<(String, String)>,
    /// netd's port forwards: VM, address, `protocol/host port`, guest port.
    pub forwards: Vec<(String, String, String, u32)>,
    pub links: BTreeSet<String>,
    pub routes: Vec<String>,
    pub hypervisors: Vec<String>,
    pub backends: Vec<String>,
    pub rules: String,
    /// The VMs' files in the run directory (control sockets, locks, vsock sockets).
    pub run_files: Vec<String>,
    /// The VMs' directories in vmmd's state directory.
    pub vm_dirs: Vec<String>,
    /// The VMs that have a cgroup, in each hierarchy.
    pub cgroups: Vec<String>,
}

pub async fn snapshot(cp: &ControlPlane) -> Result<Snapshot, String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |s: tonic::Status| format!("{what}: {}", s.message())
    };
    let vms = cp
        .vmm()
        .list_vms(ListVmsRequest {})
        .await
        .map_err(e("ListVms"))?
        .into_inner()
        .vms;
    let leases = cp
        .ipam()
        .list_leases(ListLeasesRequest::default())
        .await
        .map_err(e("ListLeases"))?
        .into_inner()
        .leases;
    let taps = cp
        .net()
        .list_taps(ListTapsRequest::default())
        .await
        .map_err(e("ListTaps"))?
        .into_inner()
        .taps;
    let forwards = cp
        .net()
        .list_port_forwards(ListPortForwardsRequest::default())
        .await
        .map_err(e("ListPortForwards"))?
        .into_inner()
        .forwards;
    let routes = ProxyClient::new(cp.proxyd.channel())
        .list_routes(ListRoutesRequest {})
        .await
        .map_err(e("ListRoutes"))?
        .into_inner()
        .routes;
    let run = cp.run_dir().display().to_string();
    Ok(Snapshot {
        vms: vms.into_iter().map(|v| (v.name.clone(), v)).collect(),
        leases: leases.into_iter().map(|l| (l.ip, l.vm)).collect(),
        taps: taps.into_iter().map(|t| (t.name, t.vm)).collect(),
        forwards: forwards
            .into_iter()
            .map(|f| {
                let from = format!("{}/{}", f.protocol, f.host_port);
                (f.vm, f.vm_ip, from, f.vm_port)
            })
            .collect(),
        links: cp
            .host
            .sh("ip -o link show master volant0 | awk -F': ' '{print $2}' | cut -d@ -f1")
            .lines()
            .map(str::to_string)
            .collect(),
        routes: routes.into_iter().map(|r| r.vm).collect(),
        hypervisors: processes_by_arg(&format!("{run}/vms/"))
            .iter()
            .filter_map(|(_, args)| vm_of(args, &run, "api.sock"))
            .collect(),
        // The vsock backend names the vhost-user socket and, unlike QEMU, no API socket.
        backends: processes_by_arg(&format!("{run}/vms/"))
            .iter()
            .filter(|(_, args)| vm_of(args, &run, "api.sock").is_none())
            .filter_map(|(_, args)| vm_of(args, &run, "vhost.sock"))
            .collect(),
        rules: cp
            .host
            .sh("iptables-save | grep -v '^#' | grep -i volant || true"),
        run_files: crate::run_leftovers(&cp.run_dir()),
        vm_dirs: names_in(&cp.root.path().join("vmmd/state/vms")),
        cgroups: crate::vm_cgroups(&crate::cgroup_of(cp.root.path()))
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(d)
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
            })
            .collect(),
    })
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The invariants that must hold at every instant (an address is never leased twice).
pub fn always(s: &Snapshot) -> Vec<String> {
    let mut seen = BTreeMap::new();
    let mut bad = Vec::new();
    for (ip, vm) in &s.leases {
        if let Some(other) = seen.insert(ip, vm) {
            bad.push(format!("{ip} is leased to both {other} and {vm}"));
        }
    }
    let mut ips = BTreeMap::new();
    for vm in s.vms.values().filter(|v| !v.ip_address.is_empty()) {
        if let Some(other) = ips.insert(&vm.ip_address, &vm.name) {
            bad.push(format!(
                "{} is recorded for both {other} and {}",
                vm.ip_address, vm.name
            ));
        }
    }
    bad
}

/// Whether a VM of `status` has its hypervisor: booting (its guest not yet ready) or running.
pub fn up(status: i32) -> bool {
    status == VmStatus::Running as i32 || status == VmStatus::Booting as i32
}

/// The invariants of a system at rest.
pub fn at_rest(s: &Snapshot) -> Vec<String> {
    let mut bad = always(s);
    let running = |name: &str| s.vms.get(name).is_some_and(|v| up(v.status));
    for v in s.vms.values() {
        let status = VmStatus::try_from(v.status).unwrap_or(VmStatus::Unspecified);
        match status {
            VmStatus::Running | VmStatus::Booting => {
                let n = s.hypervisors.iter().filter(|h| **h == v.name).count();
                if n != 1 {
                    bad.push(format!("running {} has {n} hypervisors", v.name));
                }
                if v.network_mode == "bridge" {
                    if !s.leases.contains(&(v.ip_address.clone(), v.name.clone())) {
                        bad.push(format!("running {} has no lease", v.name));
                    }
                    if !s.links.contains(&v.tap_device) {
                        bad.push(format!("running {} has no TAP on the bridge", v.name));
                    }
                } else if !s.routes.contains(&v.name) {
                    bad.push(format!("running vsock {} has no route", v.name));
                }
            }
            VmStatus::Failed => {
                if !v.ip_address.is_empty() || !v.tap_device.is_empty() {
                    bad.push(format!("failed {} still holds an address or a TAP", v.name));
                }
            }
            other => bad.push(format!("{} is {other:?}", v.name)),
        }
    }
    for (ip, vm) in &s.leases {
        if s.vms.get(vm).is_none_or(|v| v.ip_address != *ip) {
            bad.push(format!("lease {ip} of {vm}, which does not hold it"));
        }
    }
    for (tap, vm) in &s.taps {
        if s.vms.get(vm).is_none_or(|v| v.tap_device != *tap) {
            bad.push(format!(
                "netd keeps TAP {tap} of {vm}, which does not hold it"
            ));
        }
    }
    let held: BTreeSet<&str> = s.vms.values().map(|v| v.tap_device.as_str()).collect();
    for link in &s.links {
        if !held.contains(link.as_str()) {
            bad.push(format!("TAP {link} on the bridge belongs to no VM"));
        }
    }
    let recorded = |v: &Vm| -> Vec<(String, String, String, u32)> {
        v.port_forwards
            .iter()
            .map(|f| {
                let from = format!("{}/{}", f.protocol, f.host_port);
                (v.name.clone(), v.ip_address.clone(), from, f.guest_port)
            })
            .collect()
    };
    for f in &s.forwards {
        let (vm, ip, from, _) = f;
        if !s.vms.get(vm).is_some_and(|v| recorded(v).contains(f)) {
            bad.push(format!(
                "port forward {from} to {ip} of {vm}, which does not hold it at that address"
            ));
        }
    }
    for v in s.vms.values().filter(|v| !v.ip_address.is_empty()) {
        for f in recorded(v) {
            if !s.forwards.contains(&f) {
                bad.push(format!(
                    "{} holds port forward {}, which netd lacks",
                    v.name, f.2
                ));
            }
        }
    }
    for vm in &s.routes {
        if s.vms.get(vm).is_none_or(|v| v.network_mode != "vsock") {
            bad.push(format!("a proxy route for {vm}, which is no vsock VM"));
        }
    }
    for vm in &s.hypervisors {
        if !running(vm) {
            bad.push(format!("a hypervisor for {vm}, which is not running"));
        }
    }
    for vm in &s.backends {
        if !running(vm) {
            bad.push(format!("a vsock backend for {vm}, which is not running"));
        }
    }
    for f in &s.run_files {
        let holder = if let Some(rest) = f.strip_prefix("vsock-") {
            // vsock-<cid>.sock: the link to the hypervisor's vsock socket, while it runs.
            let cid = rest.split('.').next().and_then(|c| c.parse::<u32>().ok());
            s.vms
                .values()
                .find(|v| Some(v.vsock_cid) == cid && up(v.status))
                .map(|v| v.name.clone())
        } else {
            // vms/<vm>/ while the VM exists, proxyd's egress listener in it while its route is
            // registered (a vsock VM), and the hypervisor's sockets while it runs.
            let rest = f.strip_prefix("vms/").unwrap_or_default();
            let (name, file) = rest.split_once('/').unwrap_or((rest, ""));
            s.vms
                .get(name)
                .filter(|v| {
                    file.is_empty()
                        || (file.starts_with("vsock.sock_") && v.network_mode == "vsock")
                        || up(v.status)
                })
                .map(|v| v.name.clone())
        };
        if holder.is_none() {
            bad.push(format!("{f} is left in the run directory"));
        }
    }
    for d in &s.vm_dirs {
        if !s.vms.contains_key(d) {
            bad.push(format!(
                "vmmd keeps the directory of {d}, which does not exist"
            ));
        }
    }
    for vm in &s.cgroups {
        if !running(vm) {
            bad.push(format!("a cgroup for {vm}, which is not running"));
        }
    }
    let mut lines = BTreeSet::new();
    for line in s.rules.lines().filter(|l| l.starts_with("-A")) {
        if !lines.insert(line) {
            bad.push(format!("duplicated rule: {line}"));
        }
    }
    bad
}

/// Waits up to `limit` for the invariants of rest; returns what still fails then, plus every
/// instant violation seen on the way.
pub async fn converge(cp: &ControlPlane, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut instant = Vec::new();
    loop {
        let last = match snapshot(cp).await {
            Ok(s) => {
                instant.extend(always(&s));
                let bad = at_rest(&s);
                if bad.is_empty() {
                    return instant;
                }
                bad
            }
            Err(e) => vec![format!("a service does not answer: {e}")],
        };
        if Instant::now() > deadline {
            instant.extend(last);
            return instant;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
