//! Ingress cost: the real proxyd binary in front of a host-side hybrid-vsock endpoint (it
//! speaks `CONNECT`/`OK` and then echoes HTTP/1.1 bodies, so proxyd's own cost is isolated from
//! a guest's), against the same endpoint reached directly with the same handshake, and through
//! a bare relay: this same binary re-run as a single-threaded tokio process that copies bytes
//! both ways and understands nothing, the cheapest extra hop there is and so the floor for any
//! proxy on this machine. One client for latency, eight for throughput; bodies of 1 KiB and
//! 1 MiB go up and come back. Last, 1 KiB requests each on a connection of its own, as the
//! gateway sends them. `cargo bench -p proxyd --bench ingress` (as root or not; no
//! namespace needed); under `taskset -c 0` everything shares one CPU, which takes wake-ups across
//! CPUs out of the latency.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use volant_services::api::proxy::v1::EgressPolicy;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Mode, Proxyd, endpoint};

const CLIENTS: usize = 8;
/// Set (to `<listen path>:<target path>`) in the relay's environment.
const RELAY: &str = "VOLANT_BENCH_RELAY";

/// The bare relay: accepts on `listen`, and copies bytes both ways between each client and a
/// fresh connection to `target`.
fn relay(listen: PathBuf, target: PathBuf) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::UnixListener::bind(&listen).unwrap();
        loop {
            let (mut c, _) = l.accept().await.unwrap();
            let target = target.clone();
            tokio::spawn(async move {
                let mut u = UnixStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional_with_sizes(&mut c, &mut u, 1 << 16, 1 << 16)
                    .await;
            });
        }
    });
}

/// The relay process, killed when dropped.
struct Relay(Child);

impl Relay {
    async fn start(listen: &Path, target: &Path) -> Relay {
        let spec = format!("{}:{}", listen.display(), target.display());
        let child = Command::new(std::env::current_exe().unwrap())
            .env(RELAY, spec)
            .spawn()
            .unwrap();
        while !listen.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Relay(child)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn client(path: &Path, handshake: bool) -> SendRequest<Full<Bytes>> {
    let mut s = UnixStream::connect(path).await.unwrap();
    if handshake {
        s.write_all(b"CONNECT 8080\n").await.unwrap();
        let mut b = [0u8; 1];
        while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {}
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn once(c: &mut SendRequest<Full<Bytes>>, uri: &str, body: &Bytes) {
    c.ready().await.unwrap();
    let res = c
        .send_request(
            hyper::Request::post(uri)
                .header("host", "bench")
                .body(Full::new(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), body.len());
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e6
}

/// p50 and p99 in µs of `n` sequential requests, on one connection or (`fresh`) each on a new
/// one (its connecting and handshake included).
async fn latency(
    path: &Path,
    handshake: bool,
    uri: &str,
    body: &Bytes,
    n: usize,
    fresh: bool,
) -> (f64, f64) {
    let mut c = client(path, handshake).await;
    for _ in 0..n / 10 {
        once(&mut c, uri, body).await;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        if fresh {
            c = client(path, handshake).await;
        }
        once(&mut c, uri, body).await;
        lat.push(t.elapsed());
    }
    (pct(&mut lat, 0.5), pct(&mut lat, 0.99))
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 11 and 12 after the name, in ticks.
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Requests per second with `CLIENTS` connections for `secs`, and the CPU µs each request cost
/// the bench process (clients and endpoint) and the process in between (`hop`).
async fn throughput(
    path: &Path,
    handshake: bool,
    uri: &'static str,
    body: &Bytes,
    secs: Duration,
    hop: &str,
) -> (f64, f64, f64) {
    let before = (cpu("self"), cpu(hop));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = client(path, handshake).await;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < secs {
                once(&mut c, uri, &body).await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    let per = |a: f64, b: f64| (b - a) * 1e6 / total as f64;
    (rate, per(before.0, cpu("self")), per(before.1, cpu(hop)))
}

fn main() {
    if let Ok(spec) = std::env::var(RELAY) {
        let (listen, target) = spec.split_once(':').unwrap();
        return relay(listen.into(), target.into());
    }
    tokio::runtime::Runtime::new().unwrap().block_on(bench());
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let px = Proxyd::start(dir.path(), "").await;
    let run = px.run.clone();
    let hybrid = run.join("vsock-3.sock");
    endpoint(hybrid.clone(), Mode::Serve);
    px.register("bench", 3, &hybrid, EgressPolicy::default())
        .await;
    let ingress = run.join("proxyd-ingress.sock");
    let bare = run.join("relay.sock");
    let relay = Relay::start(&bare, &hybrid).await;
    let secs = Duration::from_secs(3);
    let (proxyd, relayd) = (px.pid().to_string(), relay.0.id().to_string());
    println!(
        "| body | path | p50 µs | p99 µs | req/s ({CLIENTS} clients) | MB/s each way | CPU µs/req: clients + endpoint | CPU µs/req: the hop |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (label, size, n) in [("1 KiB", 1024usize, 4000usize), ("1 MiB", 1 << 20, 300)] {
        let body = Bytes::from(vec![7u8; size]);
        let rows = [
            (
                "direct to the hybrid-vsock endpoint",
                hybrid.as_path(),
                true,
                "/echo",
                "",
            ),
            (
                "through a bare relay",
                bare.as_path(),
                true,
                "/echo",
                relayd.as_str(),
            ),
            (
                "through proxyd's ingress",
                ingress.as_path(),
                false,
                "/api/v1/vms/bench/proxy/echo",
                proxyd.as_str(),
            ),
        ];
        let mut p50s = Vec::new();
        let mut rates = Vec::new();
        for (what, path, handshake, uri, hop) in rows {
            let (p50, p99) = latency(path, handshake, uri, &body, n, false).await;
            let hop = if hop.is_empty() { "self" } else { hop };
            let (rate, ours, mut theirs) = throughput(path, handshake, uri, &body, secs, hop).await;
            if hop == "self" {
                theirs = 0.0;
            }
            println!(
                "| {label} | {what} | {p50:.0} | {p99:.0} | {rate:.0} | {:.1} | {ours:.1} | {theirs:.1} |",
                rate * size as f64 / 1e6
            );
            p50s.push(p50);
            rates.push(rate);
        }
        for (what, i) in [("a bare relay's cost", 1), ("proxyd's cost", 2)] {
            println!(
                "| {label} | {what} | +{:.0} µs p50 | | {:.2} of direct | | | |",
                p50s[i] - p50s[0],
                rates[i] / rates[0]
            );
        }
    }
    let body = Bytes::from(vec![7u8; 1024]);
    let mut p50s = Vec::new();
    for (what, path, handshake, uri, hop) in [
        (
            "direct, a connection per request",
            hybrid.as_path(),
            true,
            "/echo",
            "self",
        ),
        (
            "through proxyd's ingress, a connection per request",
            ingress.as_path(),
            false,
            "/api/v1/vms/bench/proxy/echo",
            proxyd.as_str(),
        ),
    ] {
        let (n, before) = (2000, cpu(hop));
        let (p50, p99) = latency(path, handshake, uri, &body, n, true).await;
        let theirs = if hop == "self" {
            0.0
        } else {
            (cpu(hop) - before) * 1e6 / (n + n / 10) as f64
        };
        println!("| 1 KiB | {what} | {p50:.0} | {p99:.0} | | | | {theirs:.1} |");
        p50s.push(p50);
    }
    println!(
        "| 1 KiB | proxyd's cost, a connection per request | +{:.0} µs p50 | | | | | |",
        p50s[1] - p50s[0]
    );
}
