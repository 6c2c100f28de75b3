//! The gateway's cost: `GET /api/v1/vms` (100 VMs recorded) and `GET /api/v1/health` through the
//! real gateway, against a direct gRPC `ListVms` (and health check) to vmmd, in one run, with the
//! same number of concurrent keep-alive clients. The load generator shares the 2 cores.
//!
//! `cargo build --release --workspace --bins && cargo bench -p volant-tests --bench gateway`
//! (as root, after tests/run has built the guest). `BENCH_SECS` sets the 3 s per row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use volant_services::api::vmm::v1::vmm_client::VmmClient;
use volant_services::api::vmm::v1::{CreateVmRequest, ListVmsRequest, StopVmRequest};
use volant_tests::{ControlPlane, host_and_upstream, in_netns};

const VMS: usize = 100;
const CLIENTS: usize = 16;
const ROUNDS: usize = 3;

struct Row {
    what: &'static str,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
}

fn rate(r: &Row) -> f64 {
    r.latencies.len() as f64 / r.elapsed.as_secs_f64()
}

/// `CLIENTS` tasks, each running `one` in a loop for `secs`.
async fn load<F, Fut>(what: &'static str, secs: Duration, make: impl Fn() -> F) -> Row
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let go = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut one = make();
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let begin = Instant::now();
            let mut lat = Vec::new();
            while begin.elapsed() < secs {
                let t0 = Instant::now();
                one().await;
                lat.push(t0.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    Row {
        what,
        latencies,
        elapsed: start.elapsed(),
    }
}

/// A keep-alive HTTP/1.1 connection made inside the namespace `ns`.
async fn http(
    ns: &str,
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let s = in_netns(ns, move || {
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s.set_nodelay(true).unwrap();
        s
    });
    let stream = tokio::net::TcpStream::from_std(s).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(path)
        .header(hyper::header::HOST, "127.0.0.1")
        .body(Empty::new())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let secs = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let (host, up) = host_and_upstream();
    let env = [("RUST_LOG", "warn")];
    // One client address for every connection: the per-client rate limit must not be measured.
    let cp = ControlPlane::start_with_config(
        host,
        up,
        &env,
        "  stop_timeout_secs: 0",
        "gateway:\n  requests_per_second: 1000000\n  burst: 1000000\n",
    )
    .await;
    let _gateway = cp.gateway(&env).await;
    let mut vmm = cp.vmm();
    cp.install_hello().await;
    // 100 real VMs, each stopped at once so that QEMU's memory is not held a hundred times.
    for i in 0..VMS {
        let name = format!("vm{i}");
        vmm.create_vm(CreateVmRequest {
            name: name.clone(),
            plugin: "hello".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        vmm.stop_vm(StopVmRequest { name }).await.unwrap();
    }
    let listed = vmm
        .list_vms(ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(listed.len(), VMS);

    let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let ns = cp.host.name.clone();
    // `CLIENTS` fresh keep-alive connections, one per load task, for a request of `path`.
    let http_load = async |path: &'static str| {
        let mut conns = Vec::new();
        for _ in 0..CLIENTS {
            conns.push(http(&ns, addr).await);
        }
        let pool = std::sync::Mutex::new(conns);
        move || {
            let mut sender = pool.lock().unwrap().pop().unwrap();
            move || {
                let req = get(path);
                let fut = sender.send_request(req);
                async move {
                    let res = fut.await.unwrap();
                    assert!(res.status().is_success(), "{}", res.status());
                    res.into_body().collect().await.unwrap();
                }
            }
        }
    };
    // Warm up.
    let warm = load("warm-up", Duration::from_millis(300), || {
        let mut c = VmmClient::new(cp.vmmd.channel());
        move || {
            let mut c2 = c.clone();
            let _ = &mut c;
            async move {
                c2.list_vms(ListVmsRequest {}).await.unwrap();
            }
        }
    })
    .await;
    drop(warm);
    // The rows alternate over several rounds so that a slow moment of the machine does not land
    // on one side of the comparison only.
    let mut rows: Vec<Row> = Vec::new();
    for _ in 0..ROUNDS {
        let round = [
            load("gRPC ListVms, direct to vmmd", secs, || {
                let c = VmmClient::new(cp.vmmd.channel());
                move || {
                    let mut c = c.clone();
                    async move {
                        c.list_vms(ListVmsRequest {}).await.unwrap();
                    }
                }
            })
            .await,
            load(
                "GET /api/v1/vms through the gateway",
                secs,
                http_load("/api/v1/vms").await,
            )
            .await,
            load("gRPC Health/Check, direct to vmmd", secs, || {
                let c = HealthClient::new(cp.vmmd.channel());
                move || {
                    let mut c = c.clone();
                    async move {
                        c.check(HealthCheckRequest::default()).await.unwrap();
                    }
                }
            })
            .await,
            load(
                "GET /api/v1/health through the gateway",
                secs,
                http_load("/api/v1/health").await,
            )
            .await,
        ];
        if rows.is_empty() {
            rows.extend(round);
        } else {
            for (row, more) in rows.iter_mut().zip(round) {
                row.latencies.extend(more.latencies);
                row.elapsed += more.elapsed;
            }
        }
    }

    println!(
        "| what ({CLIENTS} concurrent clients, {VMS} VMs recorded, {ROUNDS} alternating rounds) | req/s | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|");
    for r in rows.iter_mut() {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            r.what,
            rate(r),
            pct(&mut r.latencies, 0.5),
            pct(&mut r.latencies, 0.99)
        );
    }
    let cost = 1.0 - rate(&rows[1]) / rate(&rows[0]);
    println!(
        "gateway translation of GET /api/v1/vms costs {:.0}% of the direct gRPC throughput",
        cost * 100.0
    );
}
