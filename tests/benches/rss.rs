//! Idle resident memory of each daemon and of the whole control plane: the five release
//! binaries started as in production (their own processes, Unix sockets), measured once they
//! serve and again after a VM was created and deleted through the gateway (warm, idle).
//! `cargo build --release --workspace --bins && cargo bench -p volant-tests --bench rss`.

use std::time::Duration;

use volant_services::api::vmm::v1::{CreateVmRequest, DeleteVmRequest, InstallPluginRequest};
use volant_tests::{ControlPlane, Daemon, hello_manifest, host_and_upstream};

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn table(daemons: &[&Daemon]) -> Vec<u64> {
    daemons.iter().map(|d| rss_kib(d.pid())).collect()
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
    vmm.install_plugin(InstallPluginRequest {
        manifest_json: hello_manifest(),
    })
    .await
    .unwrap();
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
    println!("| daemon | idle RSS after start (MiB) | idle RSS after a VM came and went (MiB) |");
    println!("|---|---:|---:|");
    let names = ["ipamd", "netd", "proxyd", "vmmd", "gateway"];
    for ((name, c), w) in names.iter().zip(&cold).zip(&warm) {
        println!(
            "| {name} | {:.1} | {:.1} |",
            *c as f64 / 1024.0,
            *w as f64 / 1024.0
        );
    }
    println!(
        "| the control plane | {:.1} | {:.1} |",
        cold.iter().sum::<u64>() as f64 / 1024.0,
        warm.iter().sum::<u64>() as f64 / 1024.0
    );
}
