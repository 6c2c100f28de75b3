//! Egress CONNECT throughput: the real proxyd binary against tinyproxy (Debian) with an
//! equivalent filter (one allowed destination), in a throwaway network namespace where an HTTPS
//! server listens on 203.0.113.10:443. Clients reach proxyd at a VM's egress socket (a Unix
//! socket, as vhost-device-vsock does) and tinyproxy on 127.0.0.1:8888; each opens a tunnel, does
//! TLS end to end with the server and downloads. Needs root and tinyproxy
//! (`apt-get install tinyproxy`). `cargo bench -p proxyd --bench egress`.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;
use volant_services::api::proxy::v1::EgressPolicy;
use volant_services::daemon::Io;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{Netns, Proxyd, Tls, download, https_server};

const SERVER: &str = "203.0.113.10";
const DOWNLOAD: usize = 64 << 20;
const TUNNELS: usize = 4;

#[derive(Clone, Copy)]
enum Proxy {
    Proxyd,
    Tinyproxy,
}

async fn open(p: Proxy, egress: &str) -> Box<dyn Io> {
    match p {
        Proxy::Proxyd => Box::new(tokio::net::UnixStream::connect(egress).await.unwrap()),
        Proxy::Tinyproxy => {
            let s = tokio::net::TcpStream::connect("127.0.0.1:8888")
                .await
                .unwrap();
            s.set_nodelay(true).unwrap();
            Box::new(s)
        }
    }
}

/// One tunnel to `target` that downloads `bytes`, all of which must arrive.
async fn tunnel(
    s: Box<dyn Io>,
    target: &'static str,
    client: Arc<rustls::ClientConfig>,
    bytes: usize,
) {
    let got = download(s, target, "bench.example.test", client, (bytes, 0), false).await;
    assert_eq!(got.unwrap(), bytes, "a whole download");
}

/// (MB/s of `TUNNELS` concurrent downloads, tunnels per second of sequential small ones)
async fn measure(p: Proxy, egress: &str, client: &Arc<rustls::ClientConfig>) -> (f64, f64) {
    let target = match p {
        Proxy::Proxyd => "bench.example.test:443",
        Proxy::Tinyproxy => "203.0.113.10:443",
    };
    tunnel(open(p, egress).await, target, client.clone(), 1 << 20).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TUNNELS {
        let s = open(p, egress).await;
        tasks.push(tokio::spawn(tunnel(s, target, client.clone(), DOWNLOAD)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mbps = (TUNNELS * DOWNLOAD) as f64 / start.elapsed().as_secs_f64() / 1e6;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        tunnel(open(p, egress).await, target, client.clone(), 1024).await;
        n += 1;
    }
    (mbps, n as f64 / start.elapsed().as_secs_f64())
}

/// A child process, killed when dropped (also when the bench panics).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let _ns = Netns::enter("egress", SERVER);
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "proxyd:\n  requests_per_second: 1000000\n  burst: 1000000\n  bytes_per_second: 100000000000\n  \
         resolver:\n    static:\n      bench.example.test: {SERVER}\n"
    );
    let filter = dir.path().join("filter");
    std::fs::write(&filter, "^203\\.0\\.113\\.10$\n").unwrap();
    let tiny_conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &tiny_conf,
        format!(
            "Port 8888\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nConnectPort 443\nFilter \"{}\"\n\
             FilterDefaultDeny Yes\nLogLevel Critical\n",
            filter.display()
        ),
    )
    .unwrap();
    let _tiny = Killed(
        Command::new("tinyproxy")
            .args(["-d", "-c", tiny_conf.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = Tls::new(&["bench.example.test", SERVER]);
        https_server(SERVER, t.server.clone()).await;
        let px = Proxyd::start(dir.path(), &yaml).await;
        let policy = EgressPolicy {
            allow_outbound: true,
            allowed_domains: vec!["bench.example.test".into()],
            ..Default::default()
        };
        let egress = px.register("bench", 3, &px.run.join("vsock-3.sock"), policy).await.egress_socket;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect("127.0.0.1:8888").await.is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("| proxy ({TUNNELS} tunnels × {} MiB, TLS end to end) | download MB/s | tunnels/s (sequential, CONNECT + TLS + 1 KiB) |", DOWNLOAD >> 20);
        println!("|---|---:|---:|");
        let (pd, pt) = measure(Proxy::Proxyd, &egress, &t.client).await;
        let (td, tt) = measure(Proxy::Tinyproxy, &egress, &t.client).await;
        println!("| proxyd (allowlist, resolve, address check, SNI check) | {pd:.0} | {pt:.0} |");
        println!("| tinyproxy 1.11 (Filter, ConnectPort 443) | {td:.0} | {tt:.0} |");
        println!("| proxyd / tinyproxy | {:.2}× | {:.2}× |", pd / td, pt / tt);
    });
}
