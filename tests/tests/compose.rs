//! The compose stack, built and run the way a user without an image registry does: the base
//! image from Debian's mirror (`deploy/compose/base-image`), `volant:latest` over it from the
//! binaries built here (`deploy/compose/build-local`), then `docker-compose up` with the local
//! override. Docker runs in a network namespace of the test's own (its host networking is that
//! namespace), with no bridge and no rules of its own.
//!
//! Through the gateway inside the stack: a plugin installed, a bridge VM created, its page
//! reached through the proxy route; Prometheus (from Debian's package) scrapes every daemon and
//! counts the VM, and every query of the Grafana dashboard parses there; Jaeger shows the
//! create's trace when its image is present. `docker-compose down -v` then leaves no container,
//! bridge, TAP or rule, and forwarding as it was before `up`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volant_tests::{Netns, firewall_save, guest_dir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The observability images that exist only in registries: run when present, else named.
const REGISTRY_ONLY: [(&str, &str); 3] = [
    ("jaeger", "jaegertracing/all-in-one:1.64.0"),
    ("otel-collector", "otel/opentelemetry-collector:0.115.1"),
    ("grafana", "grafana/grafana:11.3.0"),
];

/// A Docker engine inside `ns`: its images kept in `target/compose/docker` between runs.
struct Docker {
    ns: Netns,
    sock: PathBuf,
    _exec: tempfile::TempDir,
    engine: Child,
}

impl Docker {
    fn start(ns: Netns) -> Docker {
        let exec = tempfile::Builder::new()
            .prefix("vdock")
            .tempdir_in("/run")
            .unwrap();
        let data = repo().join("target/compose/docker");
        std::fs::create_dir_all(&data).unwrap();
        let sock = exec.path().join("docker.sock");
        let log = std::fs::File::create(repo().join("target/compose/dockerd.log")).unwrap();
        // nsenter, not `ip netns exec`: that would mount a /sys without the cgroup hierarchies.
        let engine = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", ns.name))
            .arg("dockerd")
            .arg(format!("--host=unix://{}", sock.display()))
            .arg(format!("--data-root={}", data.display()))
            .arg(format!(
                "--exec-root={}",
                exec.path().join("exec").display()
            ))
            .arg(format!("--pidfile={}", exec.path().join("pid").display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-masq=false"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (tests/run installs docker.io)");
        let docker = Docker {
            ns,
            sock,
            _exec: exec,
            engine,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !docker
            .cmd("docker")
            .arg("info")
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        docker
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("DOCKER_HOST", format!("unix://{}", self.sock.display()));
        c
    }

    fn run(&self, mut c: Command) -> String {
        let out = c.stdin(Stdio::null()).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{c:?} failed:\n{text}");
        text
    }

    fn compose(&self, args: &[&str]) -> Command {
        let dir = repo().join("deploy/compose");
        let mut c = self.cmd("docker-compose");
        c.current_dir(&dir)
            .args(["-p", "volanttest", "-f", "docker-compose.yml"])
            .args(["-f", "docker-compose.local.yml"])
            .args(args)
            .env("VOLANT_KERNEL_DIR", guest_dir())
            .env("VOLANT_IMAGES_DIR", guest_dir());
        c
    }

    fn has_image(&self, image: &str) -> bool {
        self.cmd("docker")
            .args(["image", "inspect", image])
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-v", "-t", "20"]).output();
        unsafe { libc::kill(self.engine.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.engine.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.engine.kill();
                let _ = self.engine.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The rules, custom chains and nft tables of the namespace (the empty built-in chains
/// iptables leaves behind aside).
fn rules(ns: &Netns) -> Vec<String> {
    firewall_save(ns)
        .lines()
        .filter(|l| {
            l.starts_with("-A")
                || (l.starts_with(':') && l.contains(" - ["))
                || l.starts_with("table ")
        })
        .map(String::from)
        .collect()
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET http://addr/path` in the namespace, until `done` holds for the answer (at most `limit`).
fn until(
    ns: &Netns,
    addr: &str,
    path: &str,
    limit: Duration,
    done: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        match ns.http_get(addr, path) {
            Ok((code, body)) if done(code, &body) => return body,
            Ok((code, body)) => last = format!("{code} {body}"),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("GET {addr}{path}: never as wanted within {limit:?}; last: {last}");
}

fn curl(ns: &Netns, args: &str) -> String {
    ns.sh(&format!("curl -sS --max-time 300 {args}"))
}

#[test]
fn the_compose_stack_runs_a_vm_and_shows_it_then_leaves_nothing() {
    let ns = Netns::new("compose");
    ns.sh("ip link set lo up");
    let pristine = (ns.links(), rules(&ns));
    let docker = Docker::start(ns);
    let ns = &docker.ns;
    // Docker turns forwarding on as it starts, as on any host it runs on; that is the host's
    // state before the stack's first `up`.
    let forwarding = || {
        ns.sh("cat /proc/sys/net/ipv4/ip_forward")
            .trim()
            .to_string()
    };
    let forwarding_before = forwarding();

    let mut build = docker.cmd(
        &repo()
            .join("deploy/compose/build-local")
            .display()
            .to_string(),
    );
    build.args([
        "--bin-dir",
        &volant_tests::bin("vmmd")
            .parent()
            .unwrap()
            .display()
            .to_string(),
    ]);
    eprintln!("{}", docker.run(build));

    let mut services = vec!["ipamd", "netd", "proxyd", "vmmd", "gateway", "prometheus"];
    for (service, image) in REGISTRY_ONLY {
        if docker.has_image(image) {
            services.push(service);
        } else {
            eprintln!(
                "compose: {service} not run: {image} needs a registry and is not loaded here"
            );
        }
    }
    let mut up = vec!["up", "-d", "--no-build"];
    up.extend(&services);
    docker.run(docker.compose(&up));

    until(
        ns,
        "127.0.0.1:8080",
        "/api/v1/health",
        Duration::from_secs(120),
        |c, _| c == 200,
    );
    let manifest = repo().join("deploy/plugins/hello/manifest.json");
    let installed = curl(
        ns,
        &format!(
            "-X POST -H content-type:application/json --data-binary @{} http://127.0.0.1:8080/api/v1/plugins",
            manifest.display()
        ),
    );
    assert!(installed.contains("\"hello\""), "{installed}");
    let created = curl(
        ns,
        r#"-X POST -H content-type:application/json -d "{\"name\":\"demo\",\"plugin\":\"hello\"}" http://127.0.0.1:8080/api/v1/vms"#,
    );
    assert!(created.contains("\"demo\""), "{created}");
    until(
        ns,
        "127.0.0.1:8080",
        "/api/v1/vms/demo",
        Duration::from_secs(300),
        |_, b| {
            assert!(!b.contains("\"failed\""), "the VM failed: {b}");
            b.contains("\"running\"")
        },
    );
    // What `down` must take away is there, and `rules` sees it.
    let made = rules(ns);
    assert!(
        made.iter().any(|l| l.contains("VOLANT"))
            && made.iter().any(|l| l.starts_with("table bridge")),
        "{made:#?}"
    );
    assert!(ns.links().contains("volant0"));
    let page = until(
        ns,
        "127.0.0.1:8080",
        "/api/v1/vms/demo/proxy/",
        Duration::from_secs(30),
        |c, _| c == 200,
    );
    assert!(page.contains("Hello from Volant"), "{page}");

    // Prometheus scrapes every daemon and counts the VM.
    let query = |q: &str| format!("/api/v1/query?query={}", percent_encode(q));
    until(
        ns,
        "127.0.0.1:9090",
        &query(r#"volant_vms{volant_vm_state="running"}"#),
        Duration::from_secs(60),
        |c, b| c == 200 && b.contains(r#""1"]"#),
    );
    let up_targets = until(
        ns,
        "127.0.0.1:9090",
        &query("sum(up)"),
        Duration::from_secs(30),
        |c, b| c == 200 && b.contains(r#""5"]"#),
    );
    assert!(up_targets.contains("success"), "{up_targets}");
    // Every query of the dashboard parses and runs there.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/compose/grafana/dashboards/volant.json"))
            .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    for e in &exprs {
        let (code, body) = ns.http_get("127.0.0.1:9090", &query(e)).unwrap();
        assert!(
            code == 200 && body.contains("\"success\""),
            "{e}: {code} {body}"
        );
    }

    if services.contains(&"jaeger") && services.contains(&"otel-collector") {
        until(
            ns,
            "127.0.0.1:16686",
            "/api/traces?service=gateway&limit=50",
            Duration::from_secs(60),
            |c, b| c == 200 && b.contains("POST /api/v1/vms"),
        );
    }

    docker.run(docker.compose(&["down", "-v", "-t", "30"]));
    let left = docker.run({
        let mut c = docker.cmd("docker");
        c.args(["ps", "-aq"]);
        c
    });
    assert!(left.trim().is_empty(), "containers left: {left}");
    assert_eq!(
        (ns.links(), rules(ns)),
        pristine,
        "down left something behind"
    );
    assert_eq!(forwarding(), forwarding_before);
}
