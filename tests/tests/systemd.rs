//! Volant under a real systemd: the Debian system `tests/systemd-root` builds is booted with
//! systemd-nspawn in a network namespace of its own (private, gone with the machine), with the
//! daemons and units that `volar setup --install-systemd --root` puts there. The services start
//! under their sandboxing,
//! run a bridge VM and a vsock VM, survive restarts and a `kill -9`, and bring the VMs back after
//! the machine reboots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volant_tests::{Netns, bin, guest_dir, sh, try_sh};

const UNITS: [&str; 5] = ["ipamd", "netd", "proxyd", "vmmd", "gateway"];

static MACHINES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The system directory, built by `tests/systemd-root` (tests/run does).
fn system_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/systemd-root");
    assert!(
        root.join(".complete").is_file(),
        "{} is missing: run tests/systemd-root (tests/run does)",
        root.display()
    );
    root
}

/// Volant installed into `root` as an operator would: volar's daemons and units, enabled; the
/// vsock backend beside them; the guest kernel and image where the hello manifest expects them.
/// Whatever an earlier run left there is removed first.
fn install(root: &Path) {
    for old in ["var/lib/volant", "etc/volant", "var/log/journal"] {
        let _ = std::fs::remove_dir_all(root.join(old));
    }
    let out = Command::new(bin("volar"))
        .args(["setup", "--install-systemd", "--root"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A container under a cgroup v1 host gets its cpu, memory and pids hierarchies read-only
    // (systemd-nspawn delegates none of them), so vmmd cannot make its VMs' cgroups here and
    // is told to run them unlimited; the limits are tested on the host (tests/vms.rs).
    let config = root.join("etc/volant/volant.yaml");
    assert!(
        !config.exists(),
        "volar setup wrote a config; this would replace it"
    );
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "vmmd:\n  resource_limits: false\n").unwrap();
    let vsock = sh("command -v vhost-device-vsock || echo $HOME/.cargo/bin/vhost-device-vsock");
    std::fs::copy(vsock.trim(), root.join("usr/local/bin/vhost-device-vsock")).unwrap();
    for (from, to) in [
        ("vmlinux", "var/lib/volant/kernel/vmlinux"),
        ("hello.cpio.gz", "var/lib/volant/images/hello.cpio.gz"),
    ] {
        let to = root.join(to);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(guest_dir().join(from), to).unwrap();
    }
}

/// A booted container: systemd as its PID 1, in a network namespace of its own.
struct Machine {
    nspawn: Child,
    /// The container's PID 1, as this machine sees it.
    init: u32,
    /// The container's network, named for `ip netns exec` (the name goes with the machine).
    net: Netns,
}

impl Machine {
    /// Boots `root` and waits until systemd has finished starting everything.
    fn boot(root: &Path) -> Machine {
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--register=no", "--keep-unit", "--boot"])
            .arg(format!("--directory={}", root.display()))
            // Its own network, where it may manage links, rules and /proc/sys/net as on a host.
            .args([
                "--private-network",
                "--bind=/dev/net/tun",
                "--console=passive",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (package systemd-container)");
        let parent = nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            if let Some(pid) = child_of(parent) {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "systemd-nspawn started no container"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let seq = MACHINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vt-systemd-{}-{seq}", std::process::id());
        sh(&format!("ip netns attach {name} {init}"));
        let m = Machine {
            nspawn,
            init,
            net: Netns { name },
        };
        // Until systemd has set up its bus, systemctl cannot ask it ("offline", or no bus).
        let state = loop {
            let (up, state) = m.run("timeout 60 systemctl is-system-running --wait");
            let asked = ["running", "degraded", "maintenance"].contains(&state.trim());
            if up || asked || Instant::now() > deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            state.trim() == "running",
            "the machine booted {}: {}",
            state.trim(),
            m.run("systemctl --failed --no-pager; journalctl -u 'volant*' --no-pager | tail -n 40")
                .1
        );
        m
    }

    /// Runs `script` inside the container (all its namespaces); its success and output.
    fn run(&self, script: &str) -> (bool, String) {
        try_sh(&format!(
            "nsenter -t {} -a sh -c '{}' 2>&1",
            self.init,
            script.replace('\'', "'\\''")
        ))
    }

    /// Whether every Volant service is active, waiting up to 10 s for those restarting.
    fn all_active(&self) -> bool {
        let units: Vec<String> = UNITS.iter().map(|u| format!("volant-{u}")).collect();
        let check = format!("systemctl is-active {}", units.join(" "));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.run(&check).0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// The journal of the Volant services, for a failure's message.
    fn journal(&self) -> String {
        self.run("journalctl -u 'volant*' --no-pager | tail -n 60")
            .1
    }

    /// Shuts the machine down cleanly and waits until it is gone.
    fn power_off(mut self) {
        self.run("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.nspawn.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the machine did not power off");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Machine {
    /// Ends the container with everything in it (killing a PID namespace's init kills all its
    /// processes, hypervisors included), also when the test fails.
    fn drop(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_none() {
            // SAFETY: a signal to the container's init, which this test started.
            unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
            let _ = self.nspawn.wait();
        }
    }
}

/// The process whose parent is `parent`, if there is one yet.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat[stat.rfind(')')? + 2..]
            .split(' ')
            .nth(1)?
            .parse()
            .ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// volar from the host, talking to the gateway inside the machine's network.
fn volar(m: &Machine, args: &str) -> (bool, String) {
    m.net
        .try_sh(&format!("{} {args} 2>&1", bin("volar").display()))
}

/// What `url` answers, fetched inside the machine's network.
fn page(m: &Machine, url: &str) -> String {
    m.net.try_sh(&format!("curl -sS -m 20 {url}")).1
}

const HELLO: &str = "Hello from Volant";
const BRIDGE_VM: &str = "http://192.168.127.100/";
const THROUGH_GATEWAY: [&str; 2] = [
    "http://127.0.0.1:8080/api/v1/vms/demo/proxy/",
    "http://127.0.0.1:8080/api/v1/vms/sec/proxy/",
];

/// Both VMs answer: the bridge one at its address and through the gateway, the vsock one
/// through the gateway, proxyd and kestrel.
fn both_answer(m: &Machine, when: &str) {
    for url in [BRIDGE_VM, THROUGH_GATEWAY[0], THROUGH_GATEWAY[1]] {
        let p = page(m, url);
        assert!(p.contains(HELLO), "{when}: {url}: {p}\n{}", m.journal());
    }
}

#[test]
fn volant_runs_under_systemd_and_comes_back_after_a_reboot() {
    let root = system_root();
    install(&root);
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/plugins/hello/manifest.json");

    let m = Machine::boot(&root);
    assert!(m.all_active(), "{}", m.journal());

    // The guide's first steps, then a VM in each mode.
    for args in [
        "setup".to_string(),
        format!("plugins install --manifest {}", manifest.display()),
        "vms create demo --plugin hello".into(),
        "vms create sec --plugin hello --network vsock".into(),
    ] {
        let (ok, out) = volar(&m, &args);
        assert!(ok, "volar {args}: {out}\n{}", m.journal());
    }
    assert_eq!(m.net.sh("sysctl -n net.ipv4.ip_forward").trim(), "1");
    both_answer(&m, "created");
    assert!(
        !m.net.try_sh("ip link show vmtap-sec").0,
        "a vsock VM has no TAP"
    );

    // Each service restarted, then each killed with SIGKILL and brought back by systemd: the
    // VMs run on (vmmd re-adopts its hypervisors, which systemd leaves running).
    for unit in UNITS {
        let (ok, out) = m.run(&format!("systemctl restart volant-{unit}"));
        assert!(
            ok && m.all_active(),
            "restarting {unit}: {out}\n{}",
            m.journal()
        );
        both_answer(&m, &format!("after restarting {unit}"));
    }
    // The guide's `systemctl restart volantd` restarts every service.
    let pids = || {
        m.run("systemctl show -p MainPID --value volant-ipamd volant-netd volant-proxyd volant-vmmd volant-gateway").1
    };
    let before = pids();
    let (ok, out) = m.run("systemctl restart volantd");
    assert!(
        ok && m.all_active(),
        "restarting volantd: {out}\n{}",
        m.journal()
    );
    let after = pids();
    let nonblank = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    assert_eq!(nonblank(&before).len(), UNITS.len(), "{before}");
    for (b, a) in nonblank(&before).iter().zip(nonblank(&after)) {
        assert_ne!(
            *b, a,
            "a service kept its process across `restart volantd`: {before} / {after}"
        );
    }
    both_answer(&m, "after restarting volantd");
    for unit in UNITS {
        let (ok, out) = m.run(&format!(
            "systemctl kill --kill-who=main --signal=SIGKILL volant-{unit}"
        ));
        assert!(ok, "{out}");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(m.all_active(), "{unit} was not restarted\n{}", m.journal());
        both_answer(&m, &format!("after killing {unit}"));
    }

    // A reboot, with a network as fresh as a real one's: the VMs are stopped, keep their
    // addresses, and start again at once.
    m.power_off();
    let m = Machine::boot(&root);
    let (_, list) = volar(&m, "vms list");
    assert!(
        list.lines().filter(|l| l.contains(" stopped ")).count() == 2,
        "{list}"
    );
    for vm in ["demo", "sec"] {
        let (ok, out) = volar(&m, &format!("vms start {vm}"));
        assert!(ok, "starting {vm}: {out}\n{}", m.journal());
    }
    both_answer(&m, "started after the reboot");

    // Deleting leaves nothing behind in the network.
    for vm in ["demo", "sec"] {
        let (ok, out) = volar(&m, &format!("vms delete {vm}"));
        assert!(ok, "deleting {vm}: {out}");
    }
    // (netd retires a TAP at once and deletes the retired in a batch moments later.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while m.net.try_sh("ip link show vmtap-demo").0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !m.net.try_sh("ip link show vmtap-demo").0,
        "the TAP is still there: {}\n{}",
        m.net.try_sh("ip -br link").1,
        m.journal()
    );
    assert!(m.all_active(), "{}", m.journal());
    m.power_off();
}
