//! Real microVMs on the bridge, end to end: ipamd, netd and vmmd as separate processes in a
//! fresh namespace, QEMU booting Debian's kernel with kestrel and the `hello` workload, traffic
//! from the host, between VMs and out through NAT, a crash of vmmd, and a teardown that leaves
//! nothing behind. Guest boots are few and shared by many checks (each takes seconds under TCG).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic::Code;
use volant_services::Channel;
use volant_services::api::ipam::v1::{CreatePoolRequest, ListLeasesRequest, Pool};
use volant_services::api::net::v1::{EnsureNetworkRequest, ListTapsRequest, Network};
use volant_services::api::vmm::v1::vmm_client::VmmClient;
use volant_services::api::vmm::v1::{
    CreateVmRequest, DeleteVmRequest, GetVmRequest, InstallPluginRequest, ListVmsRequest,
    StartVmRequest, StopVmRequest, Vm, VmStatus, WatchEventsRequest,
};
use volant_tests::{
    ControlPlane, cgroup_limits, cgroup_of, firewall_save, hello_manifest, proc_status, ready,
    vm_cgroups,
};

type Vmm = VmmClient<Channel>;

fn create(name: &str, network: &str, ip: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        plugin: "hello".into(),
        network: network.into(),
        ip: ip.into(),
        ..Default::default()
    }
}

async fn get(vmm: &mut Vmm, name: &str) -> Vm {
    vmm.get_vm(GetVmRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap()
}

fn page(cp: &ControlPlane, ip: &str, path: &str) -> String {
    let (code, body) = cp
        .host
        .http_get(&format!("{ip}:80"), path)
        .unwrap_or_else(|e| panic!("GET http://{ip}{path}: {e}"));
    assert_eq!(code, 200, "GET http://{ip}{path}: {body}");
    body.trim().to_string()
}

/// Whether the process runs (a zombie waiting for whoever adopted it does not).
fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| !s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_boot_on_the_bridge_talk_and_leave_nothing_behind() {
    let mut cp = ControlPlane::start().await;
    cp.up.serve_http("0.0.0.0:80", "up");
    let mut vmm = cp.vmm();
    let mut events = vmm
        .watch_events(WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let installed = vmm
        .install_plugin(InstallPluginRequest {
            manifest_json: hello_manifest(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(installed.created);

    // A second network whose pool holds exactly one address.
    cp.ipam()
        .create_pool(CreatePoolRequest {
            pool: Some(Pool {
                name: "volant1".into(),
                subnet: "192.168.128.0/24".into(),
                gateway: "192.168.128.1".into(),
                range_start: "192.168.128.50".into(),
                range_end: "192.168.128.50".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    cp.net()
        .ensure_network(EnsureNetworkRequest {
            network: Some(Network {
                name: "volant1".into(),
                subnet: "192.168.128.0/24".into(),
                gateway: "192.168.128.1".into(),
                nat: true,
                status: None,
            }),
            update: false,
        })
        .await
        .unwrap();
    let rules_before_vms = firewall_save(&cp.host);
    // A guest with root that moves itself to an address it did not lease.
    let spoofer = hello_manifest()
        .replace("\"hello\"", "\"spoofer\"")
        .replace(
            "\"entrypoint\": [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"80\", \"-h\", \"/srv/www\"]",
            "\"entrypoint\": [\"/bin/busybox\", \"sh\", \"-c\", \"busybox ip addr flush dev eth0; \
             busybox ip addr add 192.168.127.200/24 dev eth0; \
             busybox ip route add default via 192.168.127.1; \
             echo $SECRET > /srv/www/secret; \
             exec busybox httpd -f -p 80 -h /srv/www\"]",
        )
        .replace("\"env\": {}", "\"env\": {\"SECRET\": \"only-the-guest-sees-this\"}");
    assert!(
        spoofer.contains("192.168.127.200") && spoofer.contains("only-the-guest"),
        "{spoofer}"
    );
    vmm.install_plugin(InstallPluginRequest {
        manifest_json: spoofer,
    })
    .await
    .unwrap();

    // Three guests: two on volant0, one with a fixed address on volant1.
    let a = vmm
        .create_vm(create("a", "", ""))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let b = vmm
        .create_vm(create("b", "bridge", ""))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let d = vmm
        .create_vm(create("d", "bridge=volant1", "192.168.128.50"))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(
        (a.ip_address.as_str(), b.ip_address.as_str()),
        ("192.168.127.100", "192.168.127.101")
    );
    assert_eq!(d.ip_address, "192.168.128.50");
    let s = vmm
        .create_vm(CreateVmRequest {
            plugin: "spoofer".into(),
            ..create("s", "", "")
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(s.ip_address, "192.168.127.102");
    for vm in [&a, &b, &d] {
        assert_eq!(vm.status, VmStatus::Booting as i32, "{vm:?}");
        assert!(alive(vm.pid), "{} has no hypervisor", vm.name);
        assert_eq!(vm.hypervisor, "qemu");
        assert!(vm.tap_device.starts_with("vmtap-"));
        assert!(
            vm.kernel_cmdline
                .contains(&format!("volant.ip={}/24", vm.ip_address))
        );
    }
    let limit = Duration::from_secs(120);
    let boots = tokio::join!(
        ready(cp.vmm(), "a".into(), limit),
        ready(cp.vmm(), "b".into(), limit),
        ready(cp.vmm(), "d".into(), limit),
        ready(cp.vmm(), "s".into(), limit)
    );
    for boot in [&boots.0, &boots.1, &boots.2, &boots.3] {
        boot.as_ref().unwrap();
    }
    println!("boot to kestrel ready (four at once): {boots:?}");
    // Every hypervisor runs under its seccomp filter and can gain no privileges.
    for vm in [&a, &b, &d, &s] {
        assert_eq!(proc_status(vm.pid, "Seccomp"), "2", "{}", vm.name);
        assert_eq!(proc_status(vm.pid, "NoNewPrivs"), "1", "{}", vm.name);
    }
    // Each under a uid of its own, without capabilities, owning its TAP; none reaches vmmd's
    // socket or another VM's files and sockets (checked as that uid, with a control: the same
    // uid reads its own console).
    let mut uids = BTreeSet::new();
    for vm in [&a, &b, &d, &s] {
        let ids = proc_status(vm.pid, "Uid");
        let uid: u32 = ids.split_whitespace().next().unwrap().parse().unwrap();
        assert!(uid >= 1_900_000_000, "{}: uid {ids}", vm.name);
        assert!(
            ids.split_whitespace().all(|i| i == uid.to_string()),
            "{ids}"
        );
        assert!(uids.insert(uid), "{} shares uid {uid}", vm.name);
        assert_eq!(
            proc_status(vm.pid, "CapEff"),
            "0000000000000000",
            "{}",
            vm.name
        );
        assert_eq!(
            cp.host
                .sh(&format!("cat /sys/class/net/{}/owner", vm.tap_device))
                .trim(),
            uid.to_string(),
            "{}'s TAP",
            vm.name
        );
    }
    let a_uid: u32 = proc_status(a.pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let state = cp.root.path().join("vmmd/state/vms");
    let run = cp.run_dir();
    let as_a = |cmd: &str| {
        volant_tests::try_sh(&format!(
            "setpriv --reuid={a_uid} --regid={a_uid} --clear-groups -- {cmd}"
        ))
    };
    // A bare connect(2), which succeeds wherever the socket's permissions let it.
    let connect = |path: &std::path::Path| {
        format!(
            "/usr/bin/python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect(\"{}\")'",
            path.display()
        )
    };
    let (ok, out) = as_a(&format!("cat {}", state.join("a/serial.log").display()));
    assert!(
        ok && out.contains("kestrel: ready"),
        "a cannot read its own console: {out}"
    );
    let (ok, out) = as_a(&connect(&run.join("vms/a/api.sock")));
    assert!(ok, "a cannot reach its own QMP socket: {out}");
    for cmd in [
        format!("cat {}", state.join("b/serial.log").display()),
        format!("cat {}", state.join("b/initramfs").display()),
        format!("ls {}", run.join("vms/b").display()),
        connect(&run.join("vmmd.sock")),
        connect(&run.join("vms/b/api.sock")),
        format!("kill -0 {}", b.pid),
    ] {
        let (ok, out) = as_a(&cmd);
        assert!(!ok, "VM a's uid may `{cmd}`: {out}");
    }
    // Each in a cgroup of its own, limited to what the VM asked for (the hello plugin: one
    // vCPU, 256 MiB, plus the hypervisor's own 320 MiB).
    let subtree = cgroup_of(cp.root.path());
    for vm in [&a, &b, &d, &s] {
        let (path, quota, memory, pids) = cgroup_limits(vm.pid);
        assert!(
            path.ends_with(&format!("/{subtree}/{}", vm.name)),
            "{}: {path}",
            vm.name
        );
        assert_eq!(
            (quota, memory, pids),
            (100_000, (256 + 320) << 20, 512),
            "{}",
            vm.name
        );
    }

    // The spoofer is on 192.168.127.200 (seen with netd's anti-spoofing table removed), and
    // with the table back nothing it sends from there reaches the host or another VM.
    cp.host.sh("nft delete table bridge volant");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match cp.host.http_get("192.168.127.200:80", "/cgi-bin/whoami") {
            Ok((200, body)) if body.trim() == "s" => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the spoofer never came up on .200: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Its env reached the workload (through the initramfs), and no command line holds it: not
    // the hypervisor's, which any local user reads, nor the one the VM's record shows.
    assert_eq!(
        page(&cp, "192.168.127.200", "/secret"),
        "only-the-guest-sees-this"
    );
    let argv = std::fs::read(format!("/proc/{}/cmdline", s.pid)).unwrap();
    assert!(
        !String::from_utf8_lossy(&argv).contains("only-the-guest"),
        "the env is on the hypervisor's command line"
    );
    assert!(
        !get(&mut vmm, "s")
            .await
            .kernel_cmdline
            .contains("volant.workload")
    );
    let repaired = cp
        .net()
        .reconcile(volant_services::api::net::v1::ReconcileRequest {})
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert!(repaired.iter().any(|a| a.contains("nft")), "{repaired:?}");
    let reached = cp.host.http_get("192.168.127.200:80", "/cgi-bin/whoami");
    assert!(
        reached.is_err(),
        "the host reached the spoofer: {reached:?}"
    );
    assert!(
        page(
            &cp,
            "192.168.127.100",
            "/cgi-bin/fetch?http://192.168.127.200/cgi-bin/whoami"
        )
        .ends_with("fetch failed"),
        "VM a reached the spoofer"
    );
    let gone = vmm
        .delete_vm(DeleteVmRequest {
            name: "s".into(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert!(gone);

    // The host reaches every guest; the guests reach each other on one bridge, and the
    // upstream through NAT; the networks do not reach each other.
    assert!(page(&cp, "192.168.127.100", "/").contains("Hello from Volant"));
    assert_eq!(page(&cp, "192.168.127.100", "/cgi-bin/whoami"), "a");
    assert_eq!(page(&cp, "192.168.127.101", "/cgi-bin/whoami"), "b");
    assert_eq!(page(&cp, "192.168.128.50", "/cgi-bin/whoami"), "d");
    assert_eq!(
        page(
            &cp,
            "192.168.127.100",
            "/cgi-bin/fetch?http://192.168.127.101/cgi-bin/whoami"
        ),
        "b",
        "VM a fetches VM b's page"
    );
    assert_eq!(
        page(&cp, "192.168.127.100", "/cgi-bin/fetch?http://10.99.0.2/"),
        "up sees 10.99.0.1",
        "VM a reaches the upstream through NAT"
    );
    assert_eq!(
        page(&cp, "192.168.128.50", "/cgi-bin/fetch?http://10.99.0.2/"),
        "up sees 10.99.0.1"
    );
    let crossed = page(
        &cp,
        "192.168.128.50",
        "/cgi-bin/fetch?http://192.168.127.100/cgi-bin/whoami",
    );
    assert!(
        crossed.ends_with("fetch failed"),
        "volant1 reached volant0: {crossed}"
    );

    // Clear errors, nothing leaked.
    let err = vmm
        .create_vm(CreateVmRequest {
            plugin: "nope".into(),
            ..create("x", "", "")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = vmm.create_vm(create("a", "", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let err = vmm
        .create_vm(create("e", "bridge=volant1", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("no free address"),
        "{}",
        err.message()
    );
    // Refused before anything started: nothing of it is kept, so the same name is free.
    assert!(
        err.message().contains("nothing of vm \"e\" was kept"),
        "{}",
        err.message()
    );
    let gone = vmm
        .get_vm(GetVmRequest { name: "e".into() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let broken = hello_manifest()
        .replace("\"hello\"", "\"broken\"")
        .replace("vmlinux\"", "hello.cpio.gz\"");
    vmm.install_plugin(InstallPluginRequest {
        manifest_json: broken,
    })
    .await
    .unwrap();
    let err = vmm
        .create_vm(CreateVmRequest {
            plugin: "broken".into(),
            ..create("f", "", "")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("could not start"),
        "{}",
        err.message()
    );
    let leases: BTreeSet<String> = cp
        .ipam()
        .list_leases(ListLeasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.vm)
        .collect();
    assert_eq!(
        leases,
        BTreeSet::from(["a".into(), "b".into(), "d".into()]),
        "no lease for e or f"
    );
    let taps: BTreeSet<String> = cp
        .net()
        .list_taps(ListTapsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .taps
        .into_iter()
        .map(|t| t.vm)
        .collect();
    assert_eq!(
        taps,
        BTreeSet::from(["a".into(), "b".into(), "d".into()]),
        "no TAP for e or f"
    );

    // The events told the story so far.
    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        seen.push((e.name, e.previous, e.status));
    }
    for name in ["a", "b", "d"] {
        let story: Vec<(i32, i32)> = seen
            .iter()
            .filter(|(n, ..)| n == name)
            .map(|(_, from, to)| (*from, *to))
            .collect();
        assert_eq!(
            story[..3],
            [
                (VmStatus::Unspecified as i32, VmStatus::Creating as i32),
                (VmStatus::Creating as i32, VmStatus::Booting as i32),
                (VmStatus::Booting as i32, VmStatus::Running as i32)
            ],
            "{name}: {seen:?}"
        );
    }
    // The refused create came and went; the one whose hypervisor could not start stays failed
    // and says why.
    for (name, to) in [("e", VmStatus::Unspecified), ("f", VmStatus::Failed)] {
        let event = (name.to_string(), VmStatus::Creating as i32, to as i32);
        assert!(seen.contains(&event), "{event:?} in {seen:?}");
    }
    let f = get(&mut vmm, "f").await;
    assert!(
        f.status == VmStatus::Failed as i32 && f.error.contains("could not start"),
        "{f:?}"
    );
    // The refused name is free: created again where there is room, it is created.
    let e = vmm
        .create_vm(create("e", "", ""))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(e.status, VmStatus::Booting as i32, "{e:?}");

    // vmmd crashes; its VMs keep running and are re-adopted.
    cp.vmmd.kill9();
    assert!(alive(a.pid) && alive(b.pid) && alive(d.pid));
    cp.vmmd.restart().await;
    vmm = cp.vmm();
    let mut events = vmm
        .watch_events(WatchEventsRequest { name: "a".into() })
        .await
        .unwrap()
        .into_inner();
    for vm in [&a, &b, &d] {
        let now = get(&mut vmm, &vm.name).await;
        assert_eq!(
            (now.status, now.pid),
            (VmStatus::Running as i32, vm.pid),
            "{}",
            vm.name
        );
    }
    assert_eq!(page(&cp, "192.168.127.100", "/cgi-bin/whoami"), "a");

    // A clean stop through the guest, and a start with the same address.
    let stopped = vmm
        .stop_vm(StopVmRequest { name: "b".into() })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(stopped.status, VmStatus::Stopped as i32);
    assert!(!alive(b.pid));
    let started = vmm
        .start_vm(StartVmRequest { name: "b".into() })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(started.ip_address, "192.168.127.101");
    ready(cp.vmm(), "b".into(), limit).await.unwrap();
    // The power button reached kestrel, which stopped the workload and powered off; that
    // boot's console is kept beside this one's.
    let console = cp.root.path().join("vmmd/state/vms/b/serial.log.1");
    let console = std::fs::read_to_string(console).unwrap();
    assert!(console.contains("kestrel: power button"), "{console}");
    assert!(console.contains("kestrel: powering off"), "{console}");
    assert!(
        !cp.vmmd.log_text().contains("did not shut down in time"),
        "the stop had to force the hypervisor"
    );
    assert_eq!(page(&cp, "192.168.127.101", "/cgi-bin/whoami"), "b");

    // An escaped hypervisor swaps its QMP socket for a link to another VM's: stopping its own VM
    // must not reach that other VM (vmmd never follows a link to a socket).
    let link = format!(
        "ln -sfn {} {}",
        cp.run_dir().join("vms/b/api.sock").display(),
        cp.run_dir().join("vms/a/api.sock").display()
    );
    let (ok, out) = volant_tests::try_sh(&format!(
        "setpriv --reuid={a_uid} --regid={a_uid} --clear-groups -- {link}"
    ));
    assert!(ok, "{out}");
    let b_now = get(&mut vmm, "b").await;
    let stopped = vmm
        .stop_vm(StopVmRequest { name: "a".into() })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(stopped.status, VmStatus::Stopped as i32);
    let b_after = get(&mut vmm, "b").await;
    assert!(
        b_after.status == VmStatus::Running as i32 && b_after.pid == b_now.pid && alive(b_now.pid),
        "stopping a reached b: {b_after:?}"
    );
    assert_eq!(page(&cp, "192.168.127.101", "/cgi-bin/whoami"), "b");

    // Delete everything: no lease, no TAP, no hypervisor, no stray rule.
    let pids: Vec<i64> = vmm
        .list_vms(ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
        .iter()
        .map(|v| v.pid)
        .filter(|p| *p > 0)
        .collect();
    for name in ["a", "b", "d", "e", "f"] {
        let deleted = vmm
            .delete_vm(DeleteVmRequest {
                name: name.into(),
                force: false,
            })
            .await
            .unwrap()
            .into_inner()
            .deleted;
        assert!(deleted, "{name}");
    }
    let again = vmm
        .delete_vm(DeleteVmRequest {
            name: "a".into(),
            force: false,
        })
        .await
        .unwrap();
    assert!(!again.into_inner().deleted, "idempotent");
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "hypervisors left: {pids:?}"
    );
    assert!(
        cp.ipam()
            .list_leases(ListLeasesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .leases
            .is_empty()
    );
    assert!(
        cp.net()
            .list_taps(ListTapsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .taps
            .is_empty()
    );
    cp.net()
        .reconcile(volant_services::api::net::v1::ReconcileRequest {})
        .await
        .unwrap();
    let links = cp.host.sh("ip -o link show");
    assert!(!links.contains("vmtap-"), "{links}");
    // No VM's cgroup outlives it.
    for dir in vm_cgroups(&subtree) {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{}: {left:?}", dir.display());
    }
    assert_eq!(firewall_save(&cp.host), rules_before_vms, "no stray rule");
    assert!(
        vmm.list_vms(ListVmsRequest {})
            .await
            .unwrap()
            .into_inner()
            .vms
            .is_empty()
    );

    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(1), events.next()).await {
        seen.push((e.previous, e.status, e.deleted));
    }
    let deleting = VmStatus::Deleting as i32;
    assert_eq!(
        seen,
        [
            (VmStatus::Running as i32, VmStatus::Stopping as i32, false),
            (VmStatus::Stopping as i32, VmStatus::Stopped as i32, false),
            (VmStatus::Stopped as i32, deleting, false),
            (deleting, VmStatus::Unspecified as i32, true)
        ],
        "a's events after the restart"
    );
}
