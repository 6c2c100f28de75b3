//! Ingress cost: the real proxyd binary in front of a host-side hybrid-vsock endpoint (it
//! speaks `CONNECT`/`OK` and then echoes HTTP/1.1 bodies, so proxyd's own cost is isolated from
//! a guest's), against the same endpoint reached directly with the same handshake, through
//! a bare relay (this same binary re-run as a single-threaded tokio process that copies bytes
//! both ways and understands nothing, the cheapest extra hop there is and so the floor for any
//! proxy on this machine), and through nginx, a real peer on the same hop: a reverse proxy with
//! one worker (proxyd's ingress has one thread by default), keep-alive connections upstream,
//! answers unbuffered and request bodies read whole in memory first (unbuffered, nginx does not
//! read an answer while it still sends the body, and an echo deadlocks), in front of the same
//! endpoint in its plain-HTTP form (nginx cannot do the hybrid-vsock handshake, so it is spared
//! it; proxyd does it once per pooled connection). One
//! client for latency, eight for throughput; bodies of 1 KiB and 1 MiB go up and come back.
//! Last, 1 KiB requests each on a connection of its own, as the gateway sends them.
//! `cargo bench -p proxyd --bench ingress` (as root, with nginx installed: `apt-get install
//! nginx-light`; no namespace needed); under `taskset -c 0` everything shares one CPU, which
//! takes wake-ups across CPUs out of the latency. `VOLANT_PROXYD=<binary>` measures another
//! build of proxyd (the previous commit's, say) in the same rows.

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
/// Rounds over which the rows alternate.
const ROUNDS: usize = 3;
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

/// nginx as a reverse proxy at `<dir>/nginx.sock` in front of the plain endpoint `plain`,
/// killed when dropped.
struct Nginx(Child);

impl Nginx {
    async fn start(dir: &Path, plain: &Path) -> Nginx {
        let d = dir.display();
        let conf = format!(
            "user root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             upstream endpoint {{ server unix:{}; keepalive 32; keepalive_requests 10000000; }}\n  \
             server {{\n    listen unix:{d}/nginx.sock;\n    client_max_body_size 0;\n    \
             keepalive_requests 10000000;\n    keepalive_timeout 300s;\n    \
             location /api/v1/vms/bench/proxy/ {{\n      proxy_pass http://endpoint/;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
             client_body_buffer_size 2m;\n      proxy_buffering off;\n    }}\n  }}\n}}\n",
            plain.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-p"])
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        while !dir.join("nginx.sock").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Nginx(child)
    }

    /// Its worker's pid: the process that does the work.
    fn worker(&self) -> String {
        let master = self.0.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"));
        children
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The worker outlives a killed master: ask the master to stop both.
        // SAFETY: kill(2) on the master this bench started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
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

/// The times of `n` sequential requests, on one connection or (`fresh`) each on a new one (its
/// connecting and handshake included).
async fn latency(
    path: &Path,
    handshake: bool,
    uri: &str,
    body: &Bytes,
    n: usize,
    fresh: bool,
) -> Vec<Duration> {
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
    lat
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 11 and 12 after the name, in ticks.
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// What `CLIENTS` connections did for a while: requests, time, and the CPU seconds the bench
/// process (clients and endpoint) and the process in between (`hop`) spent.
#[derive(Default)]
struct Load {
    requests: u64,
    secs: f64,
    ours: f64,
    theirs: f64,
}

impl Load {
    fn add(&mut self, o: Load) {
        self.requests += o.requests;
        self.secs += o.secs;
        self.ours += o.ours;
        self.theirs += o.theirs;
    }

    fn rate(&self) -> f64 {
        self.requests as f64 / self.secs
    }

    /// CPU µs per request: (ours, the hop's).
    fn per_request(&self) -> (f64, f64) {
        let n = self.requests as f64;
        (self.ours * 1e6 / n, self.theirs * 1e6 / n)
    }
}

/// `CLIENTS` connections sending requests for `secs`.
async fn throughput(
    path: &Path,
    handshake: bool,
    uri: &'static str,
    body: &Bytes,
    secs: Duration,
    hop: Option<&str>,
) -> Load {
    let before = (cpu("self"), hop.map_or(0.0, cpu));
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
    let mut requests = 0;
    for t in tasks {
        requests += t.await.unwrap();
    }
    Load {
        requests,
        secs: start.elapsed().as_secs_f64(),
        ours: cpu("self") - before.0,
        theirs: hop.map_or(0.0, cpu) - before.1,
    }
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
    let plain = run.join("plain.sock");
    endpoint(plain.clone(), Mode::Plain);
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir).unwrap();
    let nginx = Nginx::start(&nginx_dir, &plain).await;
    let nginx_sock = nginx_dir.join("nginx.sock");
    let secs = Duration::from_secs(1);
    let (proxyd, relayd, nginxd) = (
        px.pid().to_string(),
        relay.0.id().to_string(),
        nginx.worker(),
    );
    println!(
        "| body | path | p50 µs | p99 µs | req/s ({CLIENTS} clients) | MB/s each way | CPU µs/req: clients + endpoint | CPU µs/req: the hop |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let uri = "/api/v1/vms/bench/proxy/whole";
    let rows = [
        (
            "direct to the hybrid-vsock endpoint",
            hybrid.as_path(),
            true,
            "/whole",
            None,
        ),
        (
            "through a bare relay",
            bare.as_path(),
            true,
            "/whole",
            Some(relayd.as_str()),
        ),
        (
            "through nginx (1 worker, upstream keep-alive)",
            nginx_sock.as_path(),
            false,
            uri,
            Some(nginxd.as_str()),
        ),
        (
            "through proxyd's ingress (1 thread)",
            ingress.as_path(),
            false,
            uri,
            Some(proxyd.as_str()),
        ),
    ];
    for (label, size, n) in [("1 KiB", 1024usize, 1500usize), ("1 MiB", 1 << 20, 100)] {
        let body = Bytes::from(vec![7u8; size]);
        let mut lats: Vec<Vec<Duration>> = vec![Vec::new(); rows.len()];
        let mut loads: Vec<Load> = (0..rows.len()).map(|_| Load::default()).collect();
        // The rows alternate over rounds, so that a slow moment of the machine does not land on
        // one of them only.
        for _ in 0..ROUNDS {
            for (i, (_, path, handshake, uri, hop)) in rows.iter().enumerate() {
                lats[i].extend(latency(path, *handshake, uri, &body, n, false).await);
                loads[i].add(throughput(path, *handshake, uri, &body, secs, *hop).await);
            }
        }
        let mut p50s = Vec::new();
        for (i, (what, ..)) in rows.iter().enumerate() {
            let (p50, p99) = (pct(&mut lats[i], 0.5), pct(&mut lats[i], 0.99));
            let (ours, theirs) = loads[i].per_request();
            let rate = loads[i].rate();
            println!(
                "| {label} | {what} | {p50:.0} | {p99:.0} | {rate:.0} | {:.1} | {ours:.1} | {theirs:.1} |",
                rate * size as f64 / 1e6
            );
            p50s.push(p50);
        }
        for (what, i) in [
            ("a bare relay's cost", 1),
            ("nginx's cost", 2),
            ("proxyd's cost", 3),
        ] {
            println!(
                "| {label} | {what} | +{:.0} µs p50 | | {:.2} of direct | | | |",
                p50s[i] - p50s[0],
                loads[i].rate() / loads[0].rate()
            );
        }
        println!(
            "| {label} | proxyd against nginx | added p50 {:.2}× nginx's | | {:.2}× nginx's req/s | | | {:.2}× nginx's CPU |",
            (p50s[3] - p50s[0]) / (p50s[2] - p50s[0]),
            loads[3].rate() / loads[2].rate(),
            loads[3].per_request().1 / loads[2].per_request().1
        );
    }
    let body = Bytes::from(vec![7u8; 1024]);
    let mut p50s = Vec::new();
    for (what, path, handshake, uri, hop) in [
        (
            "direct, a connection per request",
            hybrid.as_path(),
            true,
            "/whole",
            None,
        ),
        (
            "through nginx, a connection per request",
            nginx_sock.as_path(),
            false,
            uri,
            Some(nginxd.as_str()),
        ),
        (
            "through proxyd's ingress, a connection per request",
            ingress.as_path(),
            false,
            uri,
            Some(proxyd.as_str()),
        ),
    ] {
        let (n, before) = (2000, hop.map_or(0.0, cpu));
        let mut lat = latency(path, handshake, uri, &body, n, true).await;
        let theirs = hop.map_or(0.0, |h| (cpu(h) - before) * 1e6 / (n + n / 10) as f64);
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        println!("| 1 KiB | {what} | {p50:.0} | {p99:.0} | | | | {theirs:.1} |");
        p50s.push(p50);
    }
    for (what, i) in [("nginx's", 1), ("proxyd's", 2)] {
        println!(
            "| 1 KiB | {what} cost, a connection per request | +{:.0} µs p50 | | | | | |",
            p50s[i] - p50s[0]
        );
    }
}
