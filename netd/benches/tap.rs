//! `CreateTap`+`DeleteTap` cycles through gRPC against the real netd binary in a throwaway
//! network namespace, beside the raw cost of the same kernel work (TUNSETIFF + TUNSETPERSIST,
//! one netlink message to enslave and set up, one to delete) in the same namespace and run.
//! "of raw" compares with the one-by-one raw row.
//! Prints a table. `cargo bench -p netd` (as root; `BENCH_SECS` sets the 3 s per row).

use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netd::links::Links;
use netd::tap;
use volant_services::api::net::v1::net_client::NetClient;
use volant_services::api::net::v1::{CreateTapRequest, DeleteTapRequest};
use volant_services::{Addr, dial};

struct Row {
    what: &'static str,
    clients: usize,
    cycles: Vec<Duration>,
    elapsed: Duration,
}

fn pct(v: &mut [Duration], p: f64) -> String {
    v.sort_unstable();
    let d = v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn rate(r: &Row) -> f64 {
    r.cycles.len() as f64 / r.elapsed.as_secs_f64()
}

/// The kernel work alone, on a thread inside the namespace: TAPs deleted one by one, and
/// deleted sixteen at a time as netd's reaper does under load.
fn raw(netns: &str, secs: Duration) -> Vec<Row> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let links = Links::connect().unwrap();
            links
                .add_bridge("rawbr0", &[2, 0, 0, 0, 0, 1])
                .await
                .unwrap();
            let bridge = links.get("rawbr0").await.unwrap().unwrap().index;
            let mut rows = Vec::new();
            for batch in [1, 16] {
                let mut cycles = Vec::new();
                let start = Instant::now();
                while start.elapsed() < secs {
                    let t0 = Instant::now();
                    let mut made = Vec::new();
                    for i in 0..batch {
                        let name = format!("vmtap-raw{i}");
                        tap::create(&name, None).unwrap();
                        let c = CString::new(name).unwrap();
                        // SAFETY: a NUL-terminated name that outlives the call.
                        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
                        links.attach(index, bridge).await.unwrap();
                        made.push(index);
                    }
                    if batch == 1 {
                        links.delete(made[0]).await.unwrap();
                    } else {
                        for index in &made {
                            links.set_group(*index, 7).await.unwrap();
                        }
                        links.delete_group(7).await.unwrap();
                    }
                    // Every TAP of the batch lived for the whole batch.
                    cycles.extend(std::iter::repeat_n(t0.elapsed(), batch));
                }
                rows.push(Row {
                    what: if batch == 1 {
                        "raw ioctl + netlink, one by one"
                    } else {
                        "raw, deletes batched by 16"
                    },
                    clients: 1,
                    elapsed: start.elapsed(),
                    cycles,
                });
            }
            links.delete(bridge).await.unwrap();
            rows
        })
    })
    .join()
    .unwrap()
}

async fn grpc(addr: &Addr, clients: usize, secs: Duration) -> Row {
    let go = Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..clients {
        let mut client = NetClient::new(dial(addr).unwrap());
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let mut cycles = Vec::new();
            let begin = Instant::now();
            for i in 0.. {
                if begin.elapsed() >= secs {
                    break;
                }
                // A fresh VM name every cycle: every CreateTap makes a new device.
                let vm = format!("b{c}-{i}");
                let t0 = Instant::now();
                let req = CreateTapRequest {
                    network: "volant0".into(),
                    vm: vm.clone(),
                    ip: format!("192.168.{}.{}", 127 + c / 250, 2 + c % 250),
                    owner_uid: 0,
                };
                client.create_tap(req).await.unwrap();
                client.delete_tap(DeleteTapRequest { vm }).await.unwrap();
                cycles.push(t0.elapsed());
            }
            cycles
        }));
    }
    let mut cycles = Vec::new();
    for t in tasks {
        cycles.extend(t.await.unwrap());
    }
    Row {
        what: "netd CreateTap+DeleteTap, gRPC",
        clients,
        elapsed: start.elapsed(),
        cycles,
    }
}

/// The namespace and the netd in it, removed even when the benchmark panics.
struct Lab {
    netns: String,
    netd: std::process::Child,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.netd.kill();
        let _ = self.netd.wait();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn main() {
    let secs = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let netns = format!("netd-bench-{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "creating a network namespace needs root");
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let netd = std::process::Command::new("ip")
        .args(["netns", "exec", &netns, env!("CARGO_BIN_EXE_netd")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(&run_dir)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start netd");
    let lab = Lab { netns, netd };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = Addr::Unix(run_dir.join("netd.sock"));
    let mut rows = Vec::new();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !run_dir.join("netd.sock").exists() {
            assert!(Instant::now() < deadline, "netd did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        grpc(&addr, 2, Duration::from_millis(300)).await;
        rows.extend(raw(&lab.netns, secs));
        for clients in [1, 16] {
            rows.push(grpc(&addr, clients, secs).await);
        }
    });
    drop(lab);
    println!(
        "| {:<32} | {:>7} | {:>9} | {:>9} | {:>9} | {:>6} |",
        "what", "clients", "cycles/s", "p50", "p99", "of raw"
    );
    println!(
        "|{:-<34}|{:->9}|{:->11}|{:->11}|{:->11}|{:->8}|",
        "", "", "", "", "", ""
    );
    let raw_rate = rate(&rows[0]);
    for r in rows.iter_mut() {
        println!(
            "| {:<32} | {:>7} | {:>9.0} | {:>9} | {:>9} | {:>6.2} |",
            r.what,
            r.clients,
            rate(r),
            pct(&mut r.cycles, 0.5),
            pct(&mut r.cycles, 0.99),
            rate(r) / raw_rate
        );
    }
}
