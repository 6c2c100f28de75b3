//! The harness of the end-to-end suite: it starts the real daemons as separate processes, each
//! with its own state and run directories, waits until they serve, and kills them — gently or
//! with SIGKILL — on demand and when a test ends, also when it fails.
//!
//! The binaries come from `VOLANT_BIN_DIR`, else the workspace's `target/debug`, and the guest
//! (kernel and initramfs) from `VOLANT_GUEST_DIR`, else `target/guest`: `tests/run` builds both
//! before running the suite.

pub mod contract;
pub mod invariants;
pub mod otlp;
pub mod recorder;
pub mod stub;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::net::v1::net_client::NetClient;
use volant_services::api::vmm::v1::vmm_client::VmmClient;
use volant_services::api::vmm::v1::{StreamLogsRequest, VmStatus};
use volant_services::{Addr, Channel, dial};

/// The directory of the binaries under test.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("VOLANT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Benchmarks (built without debug assertions) measure release binaries.
            let profile = if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            };
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target")
                .join(profile)
        })
}

/// The path of binary `name`, which must have been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which \
         tests/run does), or point VOLANT_BIN_DIR at them",
        path.display()
    );
    path
}

/// The real `cloud-hypervisor`: `VOLANT_CLOUD_HYPERVISOR`, else the one in PATH; or why none.
pub fn cloud_hypervisor() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VOLANT_CLOUD_HYPERVISOR") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "VOLANT_CLOUD_HYPERVISOR={} is not a file",
                p.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("cloud-hypervisor"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| "no cloud-hypervisor in PATH and VOLANT_CLOUD_HYPERVISOR is unset".into())
}

/// [`cloud_hypervisor`], or `None` after saying loudly that `test` is skipped and why.
pub fn cloud_hypervisor_or_skip(test: &str) -> Option<PathBuf> {
    match cloud_hypervisor() {
        Ok(b) => Some(b),
        Err(why) => {
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
            None
        }
    }
}

/// The directory of the guest kernel (`vmlinux`) and the `hello` initramfs.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("VOLANT_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    for f in ["vmlinux", "hello.cpio.gz"] {
        assert!(
            dir.join(f).is_file(),
            "{} is missing: build the guest first (tests/run does), or point VOLANT_GUEST_DIR at it",
            dir.join(f).display()
        );
    }
    dir
}

/// The manifest of the demo plugin `hello`, pointing at the built guest.
pub fn hello_manifest() -> String {
    let dir = guest_dir();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/plugins/hello/manifest.json"),
    )
    .expect("hello manifest");
    text.replace(
        "/var/lib/volant/kernel/vmlinux",
        &dir.join("vmlinux").display().to_string(),
    )
    .replace(
        "/var/lib/volant/images/hello.cpio.gz",
        &dir.join("hello.cpio.gz").display().to_string(),
    )
}

/// A TCP port of loopback that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// What standard gRPC client `lang` (`python`: grpcio, `node`: @grpc/grpc-js, both with their
/// default options; `tests/interop/client.*`) says of a daemon, run inside `ns` when given:
/// `args` are the target, the service, a method and, for mutual TLS, the CA, certificate and
/// key files. The clients are where `tests/run` installed them (`VOLANT_INTEROP`).
pub fn grpc_client(ns: Option<&Netns>, lang: &str, args: &[&str]) -> serde_json::Value {
    let dir = PathBuf::from(std::env::var_os("VOLANT_INTEROP").expect(
        "VOLANT_INTEROP is not set: run the tests with tests/run, which installs the clients",
    ));
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    let command = match lang {
        "python" => format!(
            "{}/venv/bin/python {}/client.py",
            dir.display(),
            scripts.display()
        ),
        _ => format!(
            "NODE_PATH={}/node_modules node {}/client.js",
            dir.display(),
            scripts.display()
        ),
    };
    let script = format!("{command} {} 2>&1", args.join(" "));
    let out = match ns {
        Some(ns) => ns.sh(&script),
        None => sh(&script),
    };
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{lang} {args:?}: {e}: {out}"))
}

/// A field of `/proc/<pid>/status` (`Seccomp`, `NoNewPrivs`, `CapEff`, `Uid`, …), trimmed.
pub fn proc_status(pid: i64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The live processes (not zombies) one of whose arguments contains `needle`, with their
/// arguments.
pub fn processes_by_arg(needle: &str) -> Vec<(i32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = &stat[stat.rfind(')')? + 2..];
            let args = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = args
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            (!state.starts_with('Z') && args.iter().any(|a| a.contains(needle)))
                .then_some((pid, args))
        })
        .collect()
}

/// Kills every process one of whose arguments contains `needle` (hypervisors a test started
/// under its own directory), and waits until they are gone.
pub fn kill_by_arg(needle: &str) {
    let pids: Vec<i32> = processes_by_arg(needle).into_iter().map(|p| p.0).collect();
    for pid in &pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A daemon under test, started from its real binary.
pub struct Daemon {
    name: String,
    args: Vec<String>,
    netns: Option<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Its run directory.
    pub run_dir: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `name` with `--state-dir <root>/<name>/state --run-dir <root>/run` plus `extra`
    /// arguments, and waits until its health service answers SERVING.
    pub async fn start(name: &str, root: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_in(None, name, root, extra).await
    }

    /// Like [`Daemon::start`], inside the network namespace `netns` when given.
    pub async fn start_in(
        netns: Option<&Netns>,
        name: &str,
        root: &Path,
        extra: &[&str],
    ) -> Daemon {
        Daemon::start_with(netns, name, root, extra, &[]).await
    }

    /// Like [`Daemon::start_in`], with extra environment variables.
    pub async fn start_with(
        netns: Option<&Netns>,
        name: &str,
        root: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let state_dir = root.join(name).join("state");
        let run_dir = root.join("run");
        let mut args = vec![
            "--state-dir".to_string(),
            state_dir.display().to_string(),
            "--run-dir".to_string(),
            run_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut daemon = Daemon {
            name: name.to_string(),
            args,
            netns: netns.map(|n| n.name.clone()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log: root.join(format!("{name}.log")),
            state_dir,
            run_dir,
        };
        daemon.restart().await;
        daemon
    }

    /// The address it listens on (its Unix socket unless `--listen` was given).
    pub fn addr(&self) -> Addr {
        match self.args.iter().position(|a| a == "--listen") {
            Some(i) => self.args[i + 1].parse().expect("valid --listen"),
            None => Addr::Unix(self.run_dir.join(format!("{}.sock", self.name))),
        }
    }

    /// A channel to it.
    pub fn channel(&self) -> Channel {
        dial(&self.addr()).expect("dial")
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts it (again) with the same arguments and waits until it serves.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = match &self.netns {
            // nsenter execs the binary, so the child's pid is the daemon's; unlike `ip netns
            // exec` it leaves the mounts alone (a fresh /sys would hide the cgroup hierarchies
            // vmmd puts VMs in).
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg(bin(&self.name));
                cmd
            }
            None => Command::new(bin(&self.name)),
        };
        let child = cmd
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
        self.wait_serving(Duration::from_secs(20)).await;
    }

    async fn wait_serving(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut health = HealthClient::new(self.channel());
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} before serving:\n{}\nholding its files: {:?}",
                    self.name,
                    self.log_text(),
                    holders(
                        &self
                            .log
                            .parent()
                            .unwrap_or(Path::new("/"))
                            .display()
                            .to_string()
                    )
                );
            }
            if self.name == "gateway" {
                // An HTTP server: ready once it accepts connections.
                if self.accepts_tcp() {
                    return;
                }
            } else {
                let req = HealthCheckRequest {
                    service: String::new(),
                };
                if let Ok(reply) = health.check(req).await
                    && reply.into_inner().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve within {limit:?}:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether its TCP listen address accepts a connection (from inside its namespace).
    fn accepts_tcp(&self) -> bool {
        let Addr::Tcp(hostport) = self.addr() else {
            return false;
        };
        let Ok(addr) = hostport.parse::<std::net::SocketAddr>() else {
            return false;
        };
        let connect =
            move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
        match &self.netns {
            Some(ns) => in_netns(ns, connect),
            None => connect(),
        }
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait().expect("wait")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a binary to completion (e.g. a daemon that must refuse to start) and returns its exit
/// status and combined output.
pub fn run(name: &str, args: &[&str], limit: Duration) -> (ExitStatus, String) {
    let mut child = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            return (status, text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static NETNS_SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A network namespace of the test's own, deleted when dropped (also when the test fails).
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Creates a fresh namespace with loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = NETNS_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("vt-{tag}-{}-{n}", std::process::id());
        sh(&format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// The names of the namespace's network interfaces.
    pub fn links(&self) -> std::collections::BTreeSet<String> {
        self.sh("ip -o link show")
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Runs a shell command inside the namespace; panics with its output when it fails.
    pub fn sh(&self, script: &str) -> String {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            script.replace('\'', "'\\''")
        ))
    }

    /// Runs a shell command inside the namespace and returns its exit status and output.
    pub fn try_sh(&self, script: &str) -> (bool, String) {
        try_sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.name,
            script.replace('\'', "'\\''")
        ))
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace")
    }

    /// Serves TCP on `addr` inside the namespace: every connection gets one line,
    /// `<tag> sees <peer address>`. Runs until the process ends.
    pub fn serve(&self, addr: &str, tag: &str) {
        let addr = addr.to_string();
        let tag = tag.to_string();
        let listener = self.enter(move || std::net::TcpListener::bind(&addr).expect("bind"));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ =
                    std::io::Write::write_all(&mut conn, format!("{tag} sees {peer}\n").as_bytes());
            }
        });
    }

    /// Serves HTTP on `addr` inside the namespace: every request gets `200` with the body
    /// `<tag> sees <peer address>`. Runs until the process ends.
    pub fn serve_http(&self, addr: &str, tag: &str) {
        let addr = addr.to_string();
        let tag = tag.to_string();
        let listener = self.enter(move || std::net::TcpListener::bind(&addr).expect("bind"));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let tag = tag.clone();
                std::thread::spawn(move || {
                    conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                        match std::io::Read::read(&mut conn, &mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let peer = conn
                        .peer_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default();
                    let body = format!("{tag} sees {peer}\n");
                    let reply = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = std::io::Write::write_all(&mut conn, reply.as_bytes());
                });
            }
        });
    }

    /// Connects from inside the namespace to `addr` and returns the line it answers, or why not.
    pub fn fetch(&self, addr: &str) -> Result<String, String> {
        let addr: std::net::SocketAddr = addr.parse().expect("socket address");
        self.enter(move || {
            let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut line = String::new();
            std::io::Read::read_to_string(&mut conn, &mut line)
                .map_err(|e| format!("read: {e}"))?;
            Ok(line.trim().to_string())
        })
    }
}

impl Netns {
    /// An HTTP/1.0 GET from inside the namespace: the status code and the body.
    pub fn http_get(&self, addr: &str, path: &str) -> Result<(u16, String), String> {
        let addr: std::net::SocketAddr = addr.parse().expect("socket address");
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        self.enter(move || {
            let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
            std::io::Write::write_all(&mut conn, request.as_bytes()).map_err(|e| e.to_string())?;
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut conn, &mut raw).map_err(|e| format!("read: {e}"))?;
            let text = String::from_utf8_lossy(&raw).to_string();
            let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
            let code = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or("no HTTP status")?;
            Ok((code, body.to_string()))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread that has entered the network namespace `name`.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// Runs a shell command; panics with its output when it fails.
pub fn sh(script: &str) -> String {
    let (ok, out) = try_sh(script);
    assert!(ok, "`{script}` failed:\n{out}");
    out
}

/// Runs a shell command and returns whether it succeeded and its combined output.
pub fn try_sh(script: &str) -> (bool, String) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The firewall of a namespace: `iptables-save` without its comment lines (which carry a
/// timestamp), then the nftables ruleset of the bridge family (netd's anti-spoofing table).
pub fn firewall_save(ns: &Netns) -> String {
    let mut text: String = ns
        .sh("iptables-save")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    text += &ns.sh("nft list ruleset bridge");
    text
}

/// The host namespace and an upstream namespace behind the veth `up0`: host 10.99.0.1, upstream
/// 10.99.0.2, and no route in the upstream back to any VM subnet, so anything that reaches it
/// from a VM went through NAT.
pub fn host_and_upstream() -> (Netns, Netns) {
    let host = Netns::new("host");
    let up = Netns::new("up");
    host.sh(&format!(
        "ip link add up0 type veth peer name eth0 netns {} && \
         ip addr add 10.99.0.1/24 dev up0 && ip link set up0 up",
        up.name
    ));
    up.sh("ip addr add 10.99.0.2/24 dev eth0 && ip link set eth0 up");
    (host, up)
}

/// ipamd, netd, proxyd and vmmd as separate processes in a host namespace with an upstream
/// behind NAT, sharing one config file and run directory. Dropping it kills the daemons and
/// every hypervisor (and vsock backend) they started, then removes the namespaces.
pub struct ControlPlane {
    /// ipamd.
    pub ipamd: Daemon,
    /// netd.
    pub netd: Daemon,
    /// proxyd.
    pub proxyd: Daemon,
    /// vmmd.
    pub vmmd: Daemon,
    /// Where the daemons run.
    pub host: Netns,
    /// The upstream host.
    pub up: Netns,
    /// State, run directory and config.
    pub root: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts the four daemons.
    pub async fn start() -> ControlPlane {
        let (host, up) = host_and_upstream();
        ControlPlane::start_in(host, up, &[], "").await
    }

    /// Starts the four daemons in `host`, with extra environment variables and extra lines for
    /// vmmd's config section (two-space indented YAML).
    pub async fn start_in(
        host: Netns,
        up: Netns,
        env: &[(&str, &str)],
        vmmd: &str,
    ) -> ControlPlane {
        ControlPlane::start_with_config(host, up, env, vmmd, "").await
    }

    /// Like [`ControlPlane::start_in`], with more top-level YAML sections (e.g. `proxyd:`).
    pub async fn start_with_config(
        host: Netns,
        up: Netns,
        env: &[(&str, &str)],
        vmmd: &str,
        sections: &str,
    ) -> ControlPlane {
        let root = tempfile::tempdir().expect("tempdir");
        // Each VM's hypervisor runs as a uid of its own, which must reach its directories below.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let config = root.path().join("volant.yaml");
        std::fs::write(
            &config,
            format!(
                "vmmd:\n  accel_cache: {}\n  dns: [10.99.0.2]\n  cgroup: {}\n{}\n{sections}\n",
                guest_dir().join("accel.json").display(),
                cgroup_of(root.path()),
                if vmmd.is_empty() {
                    "  stop_timeout_secs: 5"
                } else {
                    vmmd
                }
            ),
        )
        .expect("config");
        let args = ["--config", config.to_str().expect("utf-8 path")];
        let ipamd = Daemon::start_with(Some(&host), "ipamd", root.path(), &args, env).await;
        let netd = Daemon::start_with(Some(&host), "netd", root.path(), &args, env).await;
        let proxyd = Daemon::start_with(Some(&host), "proxyd", root.path(), &args, env).await;
        let vmmd = Daemon::start_with(Some(&host), "vmmd", root.path(), &args, env).await;
        ControlPlane {
            ipamd,
            netd,
            proxyd,
            vmmd,
            host,
            up,
            root,
        }
    }

    /// Starts the gateway on tcp://127.0.0.1:8080 in the host namespace, with `env`.
    pub async fn gateway(&self, env: &[(&str, &str)]) -> Daemon {
        let config = self.root.path().join("volant.yaml");
        let args = [
            "--config",
            config.to_str().expect("utf-8 path"),
            "--listen",
            "tcp://127.0.0.1:8080",
        ];
        Daemon::start_with(Some(&self.host), "gateway", self.root.path(), &args, env).await
    }

    /// Installs the `hello` plugin (the guest `tests/run` builds).
    pub async fn install_hello(&self) {
        self.vmm()
            .install_plugin(volant_services::api::vmm::v1::InstallPluginRequest {
                manifest_json: hello_manifest(),
            })
            .await
            .expect("installing hello");
    }

    /// The egress socket proxyd listens on for vsock VM `vm` (where kestrel forwards the guest's
    /// connections to the proxy).
    pub async fn egress_socket(&self, vm: &str) -> String {
        use volant_services::api::proxy::v1::{ListRoutesRequest, proxy_client::ProxyClient};
        ProxyClient::new(self.proxyd.channel())
            .list_routes(ListRoutesRequest {})
            .await
            .expect("ListRoutes")
            .into_inner()
            .routes
            .into_iter()
            .find(|r| r.vm == vm)
            .unwrap_or_else(|| panic!("no route for {vm}"))
            .egress_socket
    }

    /// A vmmd client.
    pub fn vmm(&self) -> VmmClient<Channel> {
        VmmClient::new(self.vmmd.channel())
    }

    /// An ipamd client.
    pub fn ipam(&self) -> IpamClient<Channel> {
        IpamClient::new(self.ipamd.channel())
    }

    /// A netd client.
    pub fn net(&self) -> NetClient<Channel> {
        NetClient::new(self.netd.channel())
    }

    /// The hypervisor control sockets live here; their processes name it in their arguments.
    pub fn run_dir(&self) -> PathBuf {
        self.root.path().join("run")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.vmmd.kill9();
        kill_by_arg(&self.run_dir().join("vms/").display().to_string());
        for dir in vm_cgroups(&cgroup_of(self.root.path())) {
            remove_cgroup(&dir);
        }
    }
}

/// What VMs left in a run directory: the `vsock-<cid>.sock` links, and every VM directory under
/// `vms/` (`vms/<vm>/`) with the files in it (`vms/<vm>/<file>`), sorted.
pub fn run_leftovers(run: &Path) -> Vec<String> {
    let names = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut left: Vec<String> = names(run)
        .into_iter()
        .filter(|n| n.starts_with("vsock-"))
        .collect();
    for vm in names(&run.join("vms")) {
        left.push(format!("vms/{vm}/"));
        for f in names(&run.join("vms").join(&vm)) {
            left.push(format!("vms/{vm}/{f}"));
        }
    }
    left.sort();
    left
}

/// The processes with a sled store open below `dir` (whoever holds its lock): pid, arguments,
/// the file.
fn holders(dir: &str) -> Vec<(i32, String, String)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for pid in procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(|e| e.ok()) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.starts_with(dir) && target.to_string_lossy().contains(".sled") {
                let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args = String::from_utf8_lossy(&args).replace('\0', " ");
                found.push((pid, args, target.display().to_string()));
            }
        }
    }
    found
}

/// The cgroup of process `pid` (or `self`) in the hierarchy of `controller` (`""`: v2), as
/// `/proc/<pid>/cgroup` names it.
fn cgroup_path(pid: &str, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        list.split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })
}

/// The cgroup subtree a control plane's vmmd puts its VMs in: one per control plane, so that
/// tests running side by side never share one.
pub fn cgroup_of(root: &Path) -> String {
    let unique = root.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    format!("volant-test-{}", unique.trim_start_matches('.'))
}

/// The directories of cgroup subtree `name` under this process's cgroups (vmmd, started by
/// the tests, shares them): one in each of the v1 hierarchies `cpu`, `memory` and `pids`, or
/// one in v2.
pub fn vm_cgroups(name: &str) -> Vec<PathBuf> {
    let path_of = |controller: &str| {
        cgroup_path("self", controller).map(|p| p.trim_start_matches('/').to_string())
    };
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        let own = path_of("").unwrap_or_default();
        let own = own
            .trim_end_matches("/supervisor")
            .trim_end_matches("supervisor");
        return vec![root.join(own).join(name)];
    }
    ["cpu", "memory", "pids"]
        .iter()
        .filter_map(|c| Some(root.join(c).join(path_of(c)?).join(name)))
        .collect()
}

/// The limits of the cgroups process `pid` is in, with the cgroup's path: CPU quota in µs per
/// 100 ms, memory in bytes, pids.
pub fn cgroup_limits(pid: i64) -> (String, u64, u64, u64) {
    let path_of = |controller: &str| cgroup_path(&pid.to_string(), controller).unwrap_or_default();
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    let num = |s: String| s.parse::<u64>().unwrap_or(u64::MAX);
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        let path = path_of("");
        let dir = root.join(path.trim_start_matches('/'));
        let cpu = read(dir.join("cpu.max"));
        let quota = cpu
            .split(' ')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(0);
        return (
            path,
            quota,
            num(read(dir.join("memory.max"))),
            num(read(dir.join("pids.max"))),
        );
    }
    let dir = |c: &str| root.join(c).join(path_of(c).trim_start_matches('/'));
    (
        path_of("memory"),
        num(read(dir("cpu").join("cpu.cfs_quota_us"))),
        num(read(dir("memory").join("memory.limit_in_bytes"))),
        num(read(dir("pids").join("pids.max"))),
    )
}

/// Removes a cgroup subtree whose processes are gone or going (waits up to 5 s for them).
fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        let mut left = false;
        for c in &children {
            left |= std::fs::remove_dir(c).is_err();
        }
        if (!left && std::fs::remove_dir(dir).is_ok()) || !dir.exists() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("cgroup {} is still in use", dir.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until VM `name` is `running` (vmmd makes it so when kestrel reports ready on the
/// console of the current boot), at most `limit`; a VM that fails or stops first is an error
/// carrying its console.
pub async fn ready(
    mut vmm: VmmClient<Channel>,
    name: String,
    limit: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let vm = vmm
            .get_vm(volant_services::api::vmm::v1::GetVmRequest { name: name.clone() })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .vm
            .ok_or("vmmd answered without a VM")?;
        let status = VmStatus::try_from(vm.status).unwrap_or(VmStatus::Unspecified);
        match status {
            VmStatus::Running => return Ok(start.elapsed()),
            VmStatus::Failed | VmStatus::Stopped | VmStatus::Deleting => {
                return Err(format!(
                    "{name} is {status:?} before it was ready ({}); console:\n{}",
                    vm.error,
                    console(&mut vmm, &name).await
                ));
            }
            _ if start.elapsed() > limit => {
                return Err(format!(
                    "{name} not ready after {limit:?} (it is {status:?}); console:\n{}",
                    console(&mut vmm, &name).await
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The console of the current boot of `name`, as far as it goes.
async fn console(vmm: &mut VmmClient<Channel>, name: &str) -> String {
    let Ok(res) = vmm
        .stream_logs(StreamLogsRequest {
            name: name.to_string(),
            follow: false,
            previous: false,
        })
        .await
    else {
        return String::new();
    };
    let mut stream = res.into_inner();
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    text
}

/// A throwaway CA and one certificate it signed, for tests that need TLS.
pub struct Pki {
    /// The CA's certificate.
    pub ca: rcgen::Certificate,
    /// The certificate it signed.
    pub leaf: rcgen::Certificate,
    /// The leaf's private key.
    pub key: rcgen::KeyPair,
}

impl Pki {
    /// A CA named after `tag` and a certificate for `name` (a host name or an IP address).
    pub fn new(tag: &str, name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("volant test CA {tag}"));
        let ca = ca.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        Pki { ca, leaf, key }
    }

    /// Writes `<tag>-ca.pem`, `<tag>-cert.pem` and `<tag>-key.pem` under `dir`; returns their
    /// paths in that order.
    pub fn write(&self, dir: &Path, tag: &str) -> [String; 3] {
        let path = |name: &str| dir.join(format!("{tag}-{name}")).display().to_string();
        std::fs::write(path("ca.pem"), self.ca.pem()).expect("ca");
        std::fs::write(path("cert.pem"), self.leaf.pem()).expect("cert");
        std::fs::write(path("key.pem"), self.key.serialize_pem()).expect("key");
        [path("ca.pem"), path("cert.pem"), path("key.pem")]
    }
}
