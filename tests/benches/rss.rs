//! Idle resident memory of each daemon and of the whole control plane: the five release
//! binaries started as in production (their own processes, Unix sockets), measured once they
//! serve and again after a VM was created and deleted through the gateway (warm, idle).
//! `cargo build --release --workspace --bins && cargo bench -p volant-tests --bench rss`.

use std::time::Duration;

use volant_services::api::vmm::v1::{CreateVmRequest, DeleteVmRequest};
use volant_tests::{ControlPlane, Daemon, host_and_upstream};

/// `field` (in KiB) of `pid`'s memory summary: `Rss`, or `Pss` (shared pages divided among the
/// processes that map them, so the daemons' sum counts libc once).
fn kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (RSS, PSS) of each daemon, in KiB.
fn table(daemons: &[&Daemon]) -> Vec<(u64, u64)> {
    daemons
        .iter()
        .map(|d| (kib(d.pid(), "Rss"), kib(d.pid(), "Pss")))
        .collect()
}

#[tokio::main]
async fn main() {
    let (host, up) = host_and_upstream();
    let env = [("RUST_LOG", "warn")];
    let cp = ControlPlane::start_in(host, up, &env, "").await;
    let gateway = cp.gateway(&env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let daemons = [&cp.ipamd, &cp.netd, &cp.proxyd, &cp.vmmd, &gateway];
    let cold = table(&daemons);
    let mut vmm = cp.vmm();
    cp.install_hello().await;
    vmm.create_vm(CreateVmRequest {
        name: "rss".into(),
        plugin: "hello".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    vmm.delete_vm(DeleteVmRequest {
        name: "rss".into(),
        force: true,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let warm = table(&daemons);
    println!(
        "| daemon | RSS after start (MiB) | RSS after a VM came and went | PSS after start | PSS after a VM |"
    );
    println!("|---|---:|---:|---:|---:|");
    let names = ["ipamd", "netd", "proxyd", "vmmd", "gateway"];
    let mib = |k: u64| k as f64 / 1024.0;
    for ((name, c), w) in names.iter().zip(&cold).zip(&warm) {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            mib(c.0),
            mib(w.0),
            mib(c.1),
            mib(w.1)
        );
    }
    let sum =
        |v: &[(u64, u64)], pss: bool| mib(v.iter().map(|x| if pss { x.1 } else { x.0 }).sum());
    println!(
        "| the control plane | {:.1} | {:.1} | {:.1} | {:.1} |",
        sum(&cold, false),
        sum(&warm, false),
        sum(&cold, true),
        sum(&warm, true)
    );
}
