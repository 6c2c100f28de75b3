//! The Cloud Hypervisor driver against the real `cloud-hypervisor` binary (named by
//! `VOLANT_CLOUD_HYPERVISOR`, else found in `PATH`; without one every test here says loudly that
//! it was skipped, and why). No ordinary guest boots under this machine's nested KVM, so the
//! guest is a PVH stub kernel the test writes itself ([`volant_tests::stub`]): it prints
//! kestrel's ready line on the serial port and halts, which is enough for the whole lifecycle
//! through the REST API, and for every way a VM can end: its hypervisor killed (by vmmd's child
//! or after vmmd was restarted and re-adopted it, or while vmmd was down), or told to shut down
//! behind vmmd's back (Cloud Hypervisor exits 0 then, as after a guest power-off).

use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_stream::StreamExt as _;
use volant_services::api::vmm::v1::{VmStatus, WatchEventsRequest};
use volant_tests::{
    ControlPlane, Daemon, cloud_hypervisor_or_skip, host_and_upstream, proc_status, run_leftovers,
    stub,
};

fn manifest(name: &str, kernel: &Path, initramfs: &Path, mode: &str) -> String {
    serde_json::json!({
        "name": name, "version": "1.0.0",
        "boot": { "kernel": kernel, "initramfs": initramfs, "cmdline": "console=ttyS0" },
        "resources": { "cpu_cores": 1, "memory_mb": 64 },
        "networking": { "mode": mode },
        "workload": { "entrypoint": ["/bin/true"] }
    })
    .to_string()
}

/// The control plane with vmmd on `hypervisor` (Cloud Hypervisor at `ch`, or `auto`), the
/// gateway, and the stub's plugins: `stub` on the bridge, `stubv` in vsock mode, and `mute`,
/// whose guest never says it is ready.
struct Lab {
    cp: ControlPlane,
    _gateway: Daemon,
    _dir: tempfile::TempDir,
}

async fn lab(ch: &Path, hypervisor: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initramfs) = stub::write(dir.path(), "stub", stub::READY);
    let (mute, _) = stub::write(dir.path(), "mute", "booting, and that is all\n");
    let (host, up) = host_and_upstream();
    let vmmd = format!(
        "  hypervisor: {hypervisor}\n  cloud_hypervisor_binary: {}\n  stop_timeout_secs: 1\n  \
         boot_timeout_secs: 5\n  reconcile_interval_secs: 2",
        ch.display()
    );
    let cp = ControlPlane::start_in(host, up, &[], &vmmd).await;
    let gateway = cp.gateway(&[]).await;
    let lab = Lab {
        cp,
        _gateway: gateway,
        _dir: dir,
    };
    for (name, kernel, mode) in [
        ("stub", &kernel, "bridge"),
        ("stubv", &kernel, "vsock"),
        ("mute", &mute, "bridge"),
    ] {
        let (code, body) = lab.rest(
            "POST",
            "/plugins",
            Some(&manifest(name, kernel, &initramfs, mode)),
        );
        assert_eq!(code, 201, "{body}");
    }
    lab
}

impl Lab {
    /// A REST call through the gateway: status and JSON body.
    fn rest(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let data = body
            .map(|b| format!("-H 'Content-Type: application/json' --data-binary '{b}'"))
            .unwrap_or_default();
        let (_, out) = self.cp.host.try_sh(&format!(
            "curl -sS -X {method} {data} -o - -w '\\n%{{http_code}}' \
             http://127.0.0.1:8080/api/v1{path}"
        ));
        let (text, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(text).unwrap_or(Value::String(text.into())),
        )
    }

    fn vm(&self, name: &str) -> Value {
        let (code, vm) = self.rest("GET", &format!("/vms/{name}"), None);
        assert_eq!(code, 200, "{vm}");
        vm
    }

    /// Waits until `name` is `status`; returns the VM.
    async fn until(&self, name: &str, status: &str) -> Value {
        self.until_vm(name, status, |vm| vm["status"] == status)
            .await
    }

    /// Waits until VM `name` satisfies `done` (`what` names it in the failure); returns it.
    async fn until_vm(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vm = self.vm(name);
            if done(&vm) {
                return vm;
            }
            assert!(Instant::now() < deadline, "{name} never {what}: {vm}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn run_dir_files(&self) -> Vec<String> {
        run_leftovers(&self.cp.run_dir())
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.cp.root.path().join("vmmd/state/vms").join(name)
    }
}

fn kill9(pid: i64) {
    // SAFETY: kill(2) on a hypervisor this test's control plane started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifecycle_through_the_rest_api() {
    let Some(ch) = cloud_hypervisor_or_skip("the_lifecycle_through_the_rest_api") else {
        return;
    };
    let lab = lab(&ch, "cloud-hypervisor").await;
    let mut events = lab
        .cp
        .vmm()
        .watch_events(WatchEventsRequest { name: "c1".into() })
        .await
        .unwrap()
        .into_inner();

    let (code, vm) = lab.rest("POST", "/vms", Some(r#"{"name":"c1","plugin":"stub"}"#));
    assert_eq!(code, 201, "{vm}");
    assert_eq!(vm["hypervisor"], "cloud-hypervisor");
    let vm = lab.until("c1", "running").await;
    assert_eq!(vm["ip_address"], "192.168.127.100");
    // Cloud Hypervisor's own seccomp filters are on (it installs one per thread: every thread
    // but the main one, which only waits for the VMM thread), and it can gain no privileges.
    let pid = vm["pid"].as_i64().unwrap();
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    // Under a uid of its own, with no capability.
    let uid = proc_status(pid, "Uid");
    assert!(
        uid.split_whitespace()
            .all(|u| u.parse::<u32>().is_ok_and(|u| u >= 1_900_000_000)),
        "{uid}"
    );
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    let threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let tid = t.ok()?.file_name().to_str()?.to_string();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let seccomp = status.lines().find_map(|l| l.strip_prefix("Seccomp:"))?;
            (tid != pid.to_string()).then(|| (comm.trim().into(), seccomp.trim().into()))
        })
        .collect();
    assert!(
        threads.iter().any(|(comm, _)| comm == "vmm") && threads.iter().all(|(_, s)| s == "2"),
        "{threads:?}"
    );

    // The stub ignores the power button: the stop is forced after the stop timeout.
    let (code, vm) = lab.rest("POST", "/vms/c1/stop", None);
    assert_eq!(
        (code, vm["status"].as_str()),
        (200, Some("stopped")),
        "{vm}"
    );
    assert_eq!(
        lab.run_dir_files(),
        ["vms/c1/"],
        "after a stop: the VM's empty directory"
    );

    // Each boot keeps a console of its own; the previous one is kept beside it.
    let (code, vm) = lab.rest("POST", "/vms/c1/start", None);
    assert_eq!(code, 200, "{vm}");
    lab.until("c1", "running").await;
    let (code, vm) = lab.rest("POST", "/vms/c1/restart", None);
    assert_eq!(code, 200, "{vm}");
    lab.until("c1", "running").await;
    for log in ["serial.log", "serial.log.1"] {
        let text = std::fs::read_to_string(lab.state_dir("c1").join(log)).unwrap();
        assert_eq!(text.matches("kestrel: ready").count(), 1, "{log}: {text}");
    }

    let (code, _) = lab.rest("DELETE", "/vms/c1", None);
    assert_eq!(code, 204);
    assert_eq!(
        lab.run_dir_files(),
        Vec::<String>::new(),
        "after the delete"
    );
    assert!(!lab.state_dir("c1").exists());

    // The events, in order.
    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_secs(1), events.next()).await {
        seen.push(VmStatus::try_from(e.status).unwrap_or(VmStatus::Unspecified));
    }
    use VmStatus::*;
    let up = [Booting, Running];
    let down = [Stopping, Stopped];
    let want: Vec<VmStatus> = [
        &[Creating][..],
        &up,
        &down,
        &up,
        &down,
        &up,
        &[Deleting, Unspecified],
    ]
    .concat();
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_end_of_a_vm_is_told_for_what_it_is() {
    let Some(ch) = cloud_hypervisor_or_skip("every_end_of_a_vm_is_told_for_what_it_is") else {
        return;
    };
    let mut lab = lab(&ch, "cloud-hypervisor").await;
    for (name, plugin) in [
        ("v1", "stubv"),
        ("c2", "stub"),
        ("c3", "stub"),
        ("c4", "stub"),
    ] {
        let body = format!(r#"{{"name":"{name}","plugin":"{plugin}"}}"#);
        let (code, vm) = lab.rest("POST", "/vms", Some(&body));
        assert_eq!(code, 201, "{vm}");
    }
    let mut pids = std::collections::BTreeMap::new();
    for name in ["v1", "c2", "c3", "c4"] {
        pids.insert(
            name,
            lab.until(name, "running").await["pid"].as_i64().unwrap(),
        );
    }

    // vmmd's own child killed: failed, with the signal. The vsock VM starts again at once
    // (the socket its hypervisor bound and left is cleared).
    kill9(pids["v1"]);
    let vm = lab.until("v1", "failed").await;
    assert_eq!(vm["error"], "the hypervisor was killed by signal 9");
    let (code, vm) = lab.rest("POST", "/vms/v1/start", None);
    assert_eq!(code, 200, "{vm}");
    lab.until("v1", "running").await;

    // Told to shut down behind vmmd's back: Cloud Hypervisor exits 0, as after a guest
    // power-off, but no guest said it was powering off.
    let api = lab.cp.run_dir().join("vms/c2/api.sock");
    let (ok, out) = lab.cp.host.try_sh(&format!(
        "curl -sS -X PUT --unix-socket {} http://localhost/api/v1/vmm.shutdown",
        api.display()
    ));
    assert!(ok, "{out}");
    let vm = lab.until("c2", "failed").await;
    assert_eq!(
        vm["error"],
        "the hypervisor exited without a guest power-off"
    );

    // vmmd killed, then a hypervisor while it is down: failed when vmmd is back.
    lab.cp.vmmd.kill9();
    kill9(pids["c3"]);
    lab.cp.vmmd.restart().await;
    let vm = lab.until("c3", "failed").await;
    assert_eq!(
        vm["error"],
        "the hypervisor exited without a guest power-off"
    );

    // A hypervisor vmmd re-adopted after its restart, killed: failed too.
    assert_eq!(lab.vm("c4")["status"], "running");
    kill9(pids["c4"]);
    let vm = lab.until("c4", "failed").await;
    assert_eq!(
        vm["error"],
        "the hypervisor exited without a guest power-off"
    );

    // A guest that never says it is ready: failed at the boot deadline, its hypervisor stopped.
    let (code, vm) = lab.rest("POST", "/vms", Some(r#"{"name":"m1","plugin":"mute"}"#));
    assert_eq!(
        (code, vm["status"].as_str()),
        (201, Some("booting")),
        "{vm}"
    );
    let vm = lab.until("m1", "failed").await;
    assert_eq!(
        vm["error"],
        "the guest did not say it was ready within 5s; its console ends: booting, and that is all"
    );
    // Its hypervisor is stopped right after: the record then names no process.
    lab.until_vm("m1", "without a hypervisor", |vm| {
        vm.get("pid").is_none_or(Value::is_null)
    })
    .await;

    // Nothing of any of them remains once deleted.
    for name in ["v1", "c2", "c3", "c4", "m1"] {
        let (code, _) = lab.rest("DELETE", &format!("/vms/{name}"), None);
        assert_eq!(code, 204);
        assert!(!lab.state_dir(name).exists(), "{name}'s state");
    }
    assert_eq!(lab.run_dir_files(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_does_not_pick_a_hypervisor_that_cannot_boot_the_guest() {
    let Some(ch) =
        cloud_hypervisor_or_skip("auto_does_not_pick_a_hypervisor_that_cannot_boot_the_guest")
    else {
        return;
    };
    // The stub never answers kestrel's probe, so Cloud Hypervisor is not chosen for it.
    let lab = lab(&ch, "auto").await;
    let (code, vm) = lab.rest("POST", "/vms", Some(r#"{"name":"a1","plugin":"stub"}"#));
    assert_eq!(code, 201, "{vm}");
    assert_eq!(vm["hypervisor"], "qemu");
    let log = lab.cp.vmmd.log_text();
    assert!(
        log.contains("cloud-hypervisor") && log.contains("did not boot under KVM"),
        "{log}"
    );
    let (code, _) = lab.rest("DELETE", "/vms/a1?force=true", None);
    assert_eq!(code, 204);
}
