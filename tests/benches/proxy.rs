//! The proxy route's whole user path against its last hop alone: `GET /api/v1/vms/b/proxy/`
//! through the real gateway (TCP, kept connections) → proxyd's ingress → hybrid vsock → kestrel
//! → the echo workload in a real guest under QEMU, against the same request sent straight to
//! proxyd's ingress socket. One client for latency, eight for throughput, the two paths
//! alternating over rounds; the CPU each request costs the gateway and proxyd.
//!
//! `cargo build --release --workspace --bins && cargo bench -p volant-tests --bench proxy` (as
//! root, after tests/run has built the guests; `VOLANT_BIN_DIR` measures other binaries).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use volant_services::api::vmm::v1::{CreateVmRequest, InstallPluginRequest};
use volant_tests::{ControlPlane, guest_dir, host_and_upstream, in_netns, ready};

const CLIENTS: usize = 8;
const ROUNDS: usize = 3;
const PATH: &str = "/api/v1/vms/b/proxy/";

/// Where a client connects.
#[derive(Clone)]
enum To {
    Gateway(String),
    Ingress(PathBuf),
}

async fn client(to: &To) -> SendRequest<Empty<Bytes>> {
    let io: Box<dyn volant_services::daemon::Io> = match to {
        To::Gateway(ns) => {
            let s = in_netns(ns, || {
                let s = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
                s.set_nonblocking(true).unwrap();
                s.set_nodelay(true).unwrap();
                s
            });
            Box::new(tokio::net::TcpStream::from_std(s).unwrap())
        }
        To::Ingress(path) => Box::new(tokio::net::UnixStream::connect(path).await.unwrap()),
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn once(c: &mut SendRequest<Empty<Bytes>>) {
    c.ready().await.unwrap();
    let req = hyper::Request::get(PATH)
        .header("host", "bench")
        .body(Empty::new())
        .unwrap();
    let res = c.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"echo from b\n");
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

#[derive(Default)]
struct Row {
    latencies: Vec<Duration>,
    requests: u64,
    secs: f64,
    gateway_cpu: f64,
    proxyd_cpu: f64,
    vmmd_cpu: f64,
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6
}

async fn round(to: &To, row: &mut Row, pids: (u32, u32, u32)) {
    let mut c = client(to).await;
    for _ in 0..50 {
        once(&mut c).await;
    }
    for _ in 0..500 {
        let t = Instant::now();
        once(&mut c).await;
        row.latencies.push(t.elapsed());
    }
    let before = (cpu(pids.0), cpu(pids.1), cpu(pids.2));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = client(to).await;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(2) {
                once(&mut c).await;
                n += 1;
            }
            n
        }));
    }
    for t in tasks {
        row.requests += t.await.unwrap();
    }
    row.secs += start.elapsed().as_secs_f64();
    row.gateway_cpu += cpu(pids.0) - before.0;
    row.proxyd_cpu += cpu(pids.1) - before.1;
    row.vmmd_cpu += cpu(pids.2) - before.2;
}

#[tokio::main]
async fn main() {
    let (host, up) = host_and_upstream();
    let env = [("RUST_LOG", "warn")];
    let cp = ControlPlane::start_with_config(
        host,
        up,
        &env,
        "  stop_timeout_secs: 0",
        "gateway:\n  requests_per_second: 1000000\n  burst: 1000000\n",
    )
    .await;
    let gateway = cp.gateway(&env).await;
    let dir = guest_dir();
    let manifest = serde_json::json!({
        "name": "echo", "version": "1.0.0",
        "boot": { "kernel": dir.join("vmlinux"), "initramfs": dir.join("echo.cpio.gz"),
                  "cmdline": "console=ttyS0 quiet panic=-1" },
        "resources": { "cpu_cores": 1, "memory_mb": 256 },
        "networking": { "mode": "vsock", "proxy": { "enabled": true, "port": 8080 } },
        "workload": { "entrypoint": ["/usr/bin/volant-echo", "3000"], "env": {},
                      "http": { "enabled": true, "port": 3000, "base_url": "http://localhost:3000" } }
    });
    let mut vmm = cp.vmm();
    vmm.install_plugin(InstallPluginRequest {
        manifest_json: manifest.to_string(),
    })
    .await
    .unwrap();
    vmm.create_vm(CreateVmRequest {
        name: "b".into(),
        plugin: "echo".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    ready(vmm.clone(), "b".into(), Duration::from_secs(90))
        .await
        .unwrap();
    let pids = (gateway.pid(), cp.proxyd.pid(), cp.vmmd.pid());
    let paths = [
        (
            "curl → gateway → proxyd → vsock → guest",
            To::Gateway(cp.host.name.clone()),
        ),
        (
            "curl → proxyd → vsock → guest",
            To::Ingress(cp.run_dir().join("proxyd-ingress.sock")),
        ),
    ];
    let mut rows: Vec<Row> = paths.iter().map(|_| Row::default()).collect();
    for _ in 0..ROUNDS {
        for (i, (_, to)) in paths.iter().enumerate() {
            round(to, &mut rows[i], pids).await;
        }
    }
    println!(
        "| path ({ROUNDS} alternating rounds) | p50 µs | p99 µs | req/s ({CLIENTS} clients) | gateway CPU µs/req | proxyd CPU µs/req | vmmd CPU µs/req |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut p50s = Vec::new();
    for ((what, _), r) in paths.iter().zip(rows.iter_mut()) {
        let n = r.requests as f64;
        let (p50, p99) = (pct(&mut r.latencies, 0.5), pct(&mut r.latencies, 0.99));
        println!(
            "| {what} | {p50:.0} | {p99:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            n / r.secs,
            r.gateway_cpu * 1e6 / n,
            r.proxyd_cpu * 1e6 / n,
            r.vmmd_cpu * 1e6 / n
        );
        p50s.push(p50);
    }
    let rate = |r: &Row| r.requests as f64 / r.secs;
    println!(
        "| the gateway's cost | +{:.0} µs p50 | | {:.2} of proxyd alone | | | |",
        p50s[0] - p50s[1],
        rate(&rows[0]) / rate(&rows[1])
    );
}
