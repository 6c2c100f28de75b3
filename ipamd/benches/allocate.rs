//! Durable `Allocate`+`Release` through gRPC over the Unix socket against the real ipamd binary,
//! with 1 and 64 concurrent clients, beside raw sled insert+flush / remove+flush in the same run.
//! Prints a table; a pair is one durable allocation and one durable release (for ListPools, one
//! call). `cargo bench -p ipamd` (set `BENCH_SECS` to change the 3 s per row).

use std::sync::Arc;
use std::time::{Duration, Instant};

use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::ipam::v1::{AllocateRequest, ReleaseRequest, release_request};
use volant_services::{Addr, dial};

struct Row {
    what: &'static str,
    clients: usize,
    pairs: usize,
    elapsed: Duration,
    /// Latency of the durable allocation (or insert+flush), and of the release.
    alloc: Vec<Duration>,
    release: Vec<Duration>,
}

fn pct(v: &mut [Duration], p: f64) -> String {
    v.sort_unstable();
    let d = v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn print(rows: &mut [Row]) {
    println!(
        "| {:<44} | {:>7} | {:>10} | {:>9} | {:>9} | {:>11} | {:>11} |",
        "what", "clients", "pairs/s", "alloc p50", "alloc p99", "release p50", "release p99"
    );
    println!(
        "|{:-<46}|{:->9}|{:->12}|{:->11}|{:->11}|{:->13}|{:->13}|",
        "", "", "", "", "", "", ""
    );
    for r in rows.iter_mut() {
        println!(
            "| {:<44} | {:>7} | {:>10.0} | {:>9} | {:>9} | {:>11} | {:>11} |",
            r.what,
            r.clients,
            r.pairs as f64 / r.elapsed.as_secs_f64(),
            pct(&mut r.alloc, 0.5),
            pct(&mut r.alloc, 0.99),
            pct(&mut r.release, 0.5),
            pct(&mut r.release, 0.99),
        );
    }
}

/// Raw sled: each thread inserts a key and flushes, then removes it and flushes.
fn raw_sled(clients: usize, secs: Duration) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("raw.sled"))
        .cache_capacity(16 << 20)
        .open()
        .unwrap();
    let start = Instant::now();
    let results: Vec<(usize, Vec<Duration>, Vec<Duration>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|t| {
                let db = db.clone();
                s.spawn(move || {
                    let (mut alloc, mut release) = (Vec::new(), Vec::new());
                    let mut n = 0;
                    while start.elapsed() < secs {
                        let key = format!("lease/raw/{t}/{n}");
                        let value = br#"{"pool":"volant0","ip":"192.168.127.100","vm":"vm"}"#;
                        let t0 = Instant::now();
                        db.insert(key.as_bytes(), &value[..]).unwrap();
                        db.flush().unwrap();
                        let t1 = Instant::now();
                        db.remove(key.as_bytes()).unwrap();
                        db.flush().unwrap();
                        alloc.push(t1 - t0);
                        release.push(t1.elapsed());
                        n += 1;
                    }
                    (n, alloc, release)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed();
    let mut row = Row {
        what: "raw sled insert+flush, remove+flush",
        clients,
        pairs: 0,
        elapsed,
        alloc: vec![],
        release: vec![],
    };
    for (n, a, r) in results {
        row.pairs += n;
        row.alloc.extend(a);
        row.release.extend(r);
    }
    row
}

/// ipamd: each client allocates an address for a fresh VM name, then releases it.
async fn ipamd(addr: &Addr, clients: usize, secs: Duration) -> Row {
    let start = Instant::now();
    let mut tasks = Vec::new();
    let go = Arc::new(tokio::sync::Barrier::new(clients));
    for t in 0..clients {
        let mut c = IpamClient::new(dial(addr).unwrap());
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let (mut alloc, mut release) = (Vec::new(), Vec::new());
            let mut n = 0;
            let begin = Instant::now();
            while begin.elapsed() < secs {
                let vm = format!("bench-{t}-{n}");
                let t0 = Instant::now();
                c.allocate(AllocateRequest {
                    pool: "volant0".into(),
                    vm: vm.clone(),
                    requested_ip: None,
                })
                .await
                .unwrap();
                let t1 = Instant::now();
                c.release(ReleaseRequest {
                    pool: "volant0".into(),
                    target: Some(release_request::Target::Vm(vm)),
                })
                .await
                .unwrap();
                alloc.push(t1 - t0);
                release.push(t1.elapsed());
                n += 1;
            }
            (n, alloc, release)
        }));
    }
    let mut row = Row {
        what: "ipamd Allocate+Release, gRPC over unix socket",
        clients,
        pairs: 0,
        elapsed: Duration::ZERO,
        alloc: vec![],
        release: vec![],
    };
    for t in tasks {
        let (n, a, r) = t.await.unwrap();
        row.pairs += n;
        row.alloc.extend(a);
        row.release.extend(r);
    }
    row.elapsed = start.elapsed();
    row
}

/// The cost of a call that writes nothing, for reference; its "pairs" are single calls.
async fn list(addr: &Addr, clients: usize, secs: Duration) -> Row {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut c = IpamClient::new(dial(addr).unwrap());
        tasks.push(tokio::spawn(async move {
            let mut v = vec![];
            while start.elapsed() < secs {
                let t0 = Instant::now();
                c.list_pools(volant_services::api::ipam::v1::ListPoolsRequest {})
                    .await
                    .unwrap();
                v.push(t0.elapsed());
            }
            v
        }));
    }
    let mut row = Row {
        what: "ipamd ListPools (no write: the gRPC floor)",
        clients,
        pairs: 0,
        elapsed: Duration::ZERO,
        alloc: vec![],
        release: vec![],
    };
    for t in tasks {
        let v = t.await.unwrap();
        row.pairs += v.len();
        row.alloc.extend(v.clone());
        row.release.extend(v);
    }
    row.elapsed = start.elapsed();
    row
}

fn main() {
    let secs = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ipamd"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(&run_dir)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start ipamd");
    let addr = Addr::Unix(run_dir.join("ipamd.sock"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !run_dir.join("ipamd.sock").exists() {
            assert!(Instant::now() < deadline, "ipamd did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Warm up connections and the store.
        ipamd(&addr, 4, Duration::from_millis(300)).await;
        for clients in [1, 64] {
            rows.push(raw_sled(clients, secs));
            rows.push(ipamd(&addr, clients, secs).await);
            rows.push(list(&addr, clients, secs).await);
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    print(&mut rows);
    let rate = |r: &Row| r.pairs as f64 / r.elapsed.as_secs_f64();
    for group in rows.chunks_exact(3) {
        println!(
            "{} client(s): {:.0} durable allocations/s (each followed by a durable release), \
             {:.2} of raw sled",
            group[1].clients,
            rate(&group[1]),
            rate(&group[1]) / rate(&group[0])
        );
    }
}
