//! Egress CONNECT throughput: the real proxyd binary against tinyproxy (Debian) with an
//! equivalent filter (one allowed destination), in a throwaway network namespace where an HTTPS
//! server listens on 203.0.113.10:443. Clients reach proxyd at a VM's egress socket (a Unix
//! socket, as vhost-device-vsock does) and tinyproxy on 127.0.0.1:8888; each opens a tunnel, does
//! TLS end to end with the server and downloads. Needs root and tinyproxy
//! (`apt-get install tinyproxy`). `cargo bench -p proxyd --bench egress`.

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use volant_services::api::proxy::v1::EgressPolicy;
use volant_services::daemon::Io;

#[path = "../tests/common/mod.rs"]
mod common;
use common::Proxyd;

const SERVER: &str = "203.0.113.10";
const DOWNLOAD: usize = 64 << 20;
const TUNNELS: usize = 4;

/// The namespace, removed when dropped (also on a panic).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(script: &str) {
    let ok = Command::new("sh")
        .args(["-ec", script])
        .status()
        .unwrap()
        .success();
    assert!(ok, "{script}");
}

/// Moves this thread (and so every thread and process it starts) into a new namespace.
fn enter_netns() -> Netns {
    let name = format!("vbench-egress-{}", std::process::id());
    sh(&format!("ip netns add {name}"));
    let ns = Netns(name.clone());
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns on a valid namespace descriptor.
    let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns");
    sh(&format!(
        "ip link set lo up && ip link add d0 type veth peer name d1 && ip addr add {SERVER}/32 dev d0 && ip link set d0 up && ip link set d1 up"
    ));
    ns
}

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn tls() -> Tls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["bench.example.test".into(), SERVER.into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

/// The HTTPS server: after any request line it sends the asked number of bytes.
async fn server(config: Arc<rustls::ServerConfig>) {
    let listener = tokio::net::TcpListener::bind((SERVER, 443)).await.unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut n = [0u8; 8];
            if tls.read_exact(&mut n).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(n) as usize;
            let chunk = vec![0x5au8; 64 * 1024];
            while left > 0 {
                let k = left.min(chunk.len());
                if tls.write_all(&chunk[..k]).await.is_err() {
                    return;
                }
                left -= k;
            }
            let _ = tls.shutdown().await;
        });
    }
}

/// One tunnel: CONNECT, TLS to `sni`, download `bytes`.
async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &str,
    sni: &str,
    client: Arc<rustls::ClientConfig>,
    bytes: usize,
) {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "the proxy closed");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, s)
        .await
        .unwrap();
    tls.write_all(&(bytes as u64).to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < bytes {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "short download");
        got += n;
    }
}

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

/// (MB/s of `TUNNELS` concurrent downloads, tunnels per second of sequential small ones)
async fn measure(p: Proxy, egress: &str, client: &Arc<rustls::ClientConfig>) -> (f64, f64) {
    let target = match p {
        Proxy::Proxyd => "bench.example.test:443",
        Proxy::Tinyproxy => "203.0.113.10:443",
    };
    let sni = "bench.example.test";
    tunnel(open(p, egress).await, target, sni, client.clone(), 1 << 20).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..TUNNELS {
        let s = open(p, egress).await;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            tunnel(s, target, sni, client, DOWNLOAD).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mbps = (TUNNELS * DOWNLOAD) as f64 / start.elapsed().as_secs_f64() / 1e6;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        tunnel(open(p, egress).await, target, sni, client.clone(), 1024).await;
        n += 1;
    }
    (mbps, n as f64 / start.elapsed().as_secs_f64())
}

fn start(cmd: &mut Command) -> Child {
    cmd.spawn().unwrap()
}

fn main() {
    let _ns = enter_netns();
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
    let mut tiny = start(Command::new("tinyproxy").args(["-d", "-c", tiny_conf.to_str().unwrap()]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = tls();
        tokio::spawn(server(t.server.clone()));
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
    let _ = tiny.kill();
    let _ = tiny.wait();
}
