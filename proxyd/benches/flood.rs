//! One VM floods its egress socket with 14,000 idle connections while another VM fetches through
//! its own: proxyd's resident memory and the other VM's latency, with the default connection cap
//! per VM and with the cap lifted (how proxyd behaved before it had one), in the same run.
//! Needs root (a network namespace of its own). `cargo bench -p proxyd --bench flood`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use volant_services::api::proxy::v1::EgressPolicy;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Netns, Proxyd, http_origin};

const SERVER: &str = "203.0.113.40";
const FLOOD: usize = 14_000;

fn policy() -> EgressPolicy {
    EgressPolicy {
        allow_outbound: true,
        allowed_domains: vec!["calm.example.test".into()],
        requests_per_second: 100_000,
        burst: 100_000,
        ..Default::default()
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// 300 GETs on new connections through `egress`: (p50, p99) in ms.
async fn latency(egress: &str) -> (f64, f64) {
    let mut took = Vec::new();
    for _ in 0..300 {
        let started = Instant::now();
        let mut s = UnixStream::connect(egress).await.unwrap();
        s.write_all(
            b"GET http://calm.example.test/x HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        took.push(started.elapsed().as_secs_f64() * 1e3);
    }
    took.sort_by(f64::total_cmp);
    (took[took.len() / 2], took[took.len() * 99 / 100])
}

/// proxyd with `max_connections`; one row of the table per phase.
async fn run(label: &str, max_connections: u32) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "proxyd:\n  max_connections: {max_connections}\n  resolver:\n    static:\n      \
         calm.example.test: {SERVER}\n"
    );
    let px = Proxyd::start(dir.path(), &yaml).await;
    let flood = px
        .register("flood", 3, &px.run.join("vsock-3.sock"), policy())
        .await
        .egress_socket;
    let calm = px
        .register("calm", 4, &px.run.join("vsock-4.sock"), policy())
        .await
        .egress_socket;
    let (p50, p99) = latency(&calm).await;
    println!(
        "| {label} | idle | {:.1} | {p50:.2} | {p99:.2} | – |",
        rss_mib(px.pid())
    );
    let mut held = Vec::new();
    while held.len() < FLOOD {
        match UnixStream::connect(&flood).await {
            Ok(s) => held.push(s),
            // The listen backlog is full: proxyd has not accepted yet.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Err(e) => panic!("connection {}: {e}", held.len()),
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (p50, p99) = latency(&calm).await;
    // Those proxyd closed read the end of the stream (after a 429) at once.
    let mut open = 0;
    for s in &mut held {
        let mut b = [0u8; 512];
        if let Err(e) = s.try_read(&mut b)
            && e.kind() == std::io::ErrorKind::WouldBlock
        {
            open += 1;
        }
    }
    println!(
        "| {label} | {FLOOD} connections from one VM | {:.1} | {p50:.2} | {p99:.2} | {open} |",
        rss_mib(px.pid())
    );
}

fn main() {
    let _ns = Netns::enter("flood", SERVER);
    volant_services::daemon::raise_file_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        http_origin(SERVER, 80).await;
        println!(
            "| proxyd | phase | RSS MiB | other VM GET p50 ms | p99 ms | flood connections kept open |"
        );
        println!("|---|---|---:|---:|---:|---:|");
        run("max_connections 256 (default)", 256).await;
        run("no cap (max_connections 1000000)", 1_000_000).await;
    });
}
