//! proxyd's egress under attack, against the real binary: a guest talks to its VM's egress
//! socket directly (as kestrel forwards it), upstreams inside the test's own network namespace
//! count every TCP connection they accept. A policy change reaches connections already open;
//! absolute-form requests are paced, timed out and capped like tunnels; nothing is dialled
//! before it is allowed; ports are policy; parsing is strict; a flood of connections is capped.
//! Needs root.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_rustls::rustls;
use volant_services::api::proxy::v1::{EgressPolicy, GetStatsRequest, UnregisterVmRequest};

mod common;
use common::{Netns, Proxyd, Tls, download, http_origin, https_server};

const SERVER: &str = "203.0.113.30";
const API: &str = "api.example.test";
const OTHER: &str = "other.example.test";

/// The config: both names resolve to the server; `extra` adds proxyd keys.
fn config(extra: &str) -> String {
    format!(
        "proxyd:\n{extra}  resolver:\n    static:\n      {API}: {SERVER}\n      {OTHER}: {SERVER}\n"
    )
}

fn policy(domains: &[&str]) -> EgressPolicy {
    EgressPolicy {
        allow_outbound: true,
        allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
        requests_per_second: 1000,
        burst: 1000,
        ..Default::default()
    }
}

/// proxyd with `extra` config keys, upstreams on SERVER that count their connections (HTTPS on
/// 443 for both names, HTTP on 80), and VM `a` (cid 3) registered to reach API.
struct Lab {
    px: Proxyd,
    tls: Tls,
    tls_accepted: Arc<AtomicUsize>,
    http_accepted: Arc<AtomicUsize>,
    socket: PathBuf,
    egress: String,
    _dir: tempfile::TempDir,
}

async fn lab(extra: &str) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let tls = Tls::new(&[API, OTHER]);
    let tls_accepted = https_server(SERVER, tls.server.clone()).await;
    let http_accepted = http_origin(SERVER, 80).await;
    let px = Proxyd::start(dir.path(), &config(extra)).await;
    let socket = px.run.join("vsock-3.sock");
    let egress = px
        .register("a", 3, &socket, policy(&[API]))
        .await
        .egress_socket;
    Lab {
        px,
        tls,
        tls_accepted,
        http_accepted,
        socket,
        egress,
        _dir: dir,
    }
}

/// Runs `test` in a network namespace of its own, against a new [`lab`] with `extra` keys.
fn run<F: std::future::Future<Output = ()>>(tag: &str, extra: &str, test: impl FnOnce(Lab) -> F) {
    let _ns = Netns::enter(tag, SERVER);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async { test(lab(extra).await).await });
}

/// A guest's connection to its VM's egress socket.
struct Guest(UnixStream);

/// An answer: status, head and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    #[allow(dead_code)]
    head: String,
    body: Vec<u8>,
}

impl Guest {
    async fn new(socket: &str) -> Guest {
        Guest(UnixStream::connect(socket).await.unwrap())
    }

    async fn send(&mut self, text: &[u8]) -> std::io::Result<()> {
        self.0.write_all(text).await
    }

    /// One answer, its body delimited by `content-length`.
    async fn answer(&mut self) -> std::io::Result<Answer> {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if self.0.read(&mut b).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        self.0.read_exact(&mut body).await?;
        Ok(Answer { status, head, body })
    }

    /// `GET url` on this connection, kept alive.
    async fn get(&mut self, url: &str) -> std::io::Result<Answer> {
        self.send(format!("GET {url} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await?;
        self.answer().await
    }

    /// Whether proxyd closes the connection within `d` (anything read before the end is
    /// dropped).
    async fn closed_within(&mut self, d: Duration) -> bool {
        let mut sink = Vec::new();
        matches!(
            tokio::time::timeout(d, self.0.read_to_end(&mut sink)).await,
            Ok(Ok(_)) | Ok(Err(_))
        )
    }
}

async fn stats(px: &Proxyd, vm: &str) -> volant_services::api::proxy::v1::VmStats {
    px.api()
        .get_stats(GetStatsRequest { vm: vm.into() })
        .await
        .unwrap()
        .into_inner()
        .vms
        .remove(0)
}

/// A tunnel to `API:443` on a new connection to `egress` that downloads `ask` (bytes, and the
/// pause between 64 KiB chunks in ms); its task.
fn tunnel(
    egress: &str,
    client: Arc<rustls::ClientConfig>,
    ask: (usize, u64),
) -> tokio::task::JoinHandle<std::io::Result<usize>> {
    let egress = egress.to_string();
    tokio::spawn(async move {
        let s = UnixStream::connect(&egress).await.unwrap();
        download(s, &format!("{API}:443"), API, client, ask, false).await
    })
}

/// A tunnel that downloads 64 KiB every 200 ms for 20 s.
fn slow_tunnel(
    egress: &str,
    client: Arc<rustls::ClientConfig>,
) -> tokio::task::JoinHandle<std::io::Result<usize>> {
    tunnel(egress, client, (100 << 16, 200))
}

#[test]
fn a_policy_change_reaches_connections_already_open() {
    run("live", "", |l| async move {
        let Lab {
            px,
            tls,
            socket,
            egress,
            ..
        } = &l;
        let url = format!("http://{API}/x");

        // Narrowed: the kept connection's next request is refused, the open tunnel closed.
        let mut kept = Guest::new(egress).await;
        assert_eq!(kept.get(&url).await.unwrap().status, 200);
        let tunnel = slow_tunnel(egress, tls.client.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        px.register("a", 3, socket, policy(&[OTHER])).await;
        let ended = tokio::time::timeout(Duration::from_secs(3), tunnel).await;
        assert!(
            matches!(ended, Ok(Ok(Err(_)))),
            "a tunnel to a host no longer allowed goes on: {ended:?}"
        );
        let a = kept.get(&url).await.unwrap();
        assert_eq!(a.status, 403, "{a:?}");
        assert!(kept.closed_within(Duration::from_secs(2)).await);

        // Outbound switched off in place: the same.
        let mut kept = Guest::new(egress).await;
        assert_eq!(
            kept.get(&format!("http://{OTHER}/x")).await.unwrap().status,
            200
        );
        let mut off = policy(&[OTHER]);
        off.allow_outbound = false;
        px.register("a", 3, socket, off).await;
        let a = kept.get(&format!("http://{OTHER}/x")).await.unwrap();
        assert_eq!(a.status, 403, "{a:?}");

        // A policy that still allows the tunnel's host leaves it alone.
        px.register("a", 3, socket, policy(&[API])).await;
        let tunnel = slow_tunnel(egress, tls.client.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        px.register("a", 3, socket, policy(&[API, OTHER])).await;
        let ended = tokio::time::timeout(Duration::from_millis(1500), tunnel).await;
        assert!(
            ended.is_err(),
            "a tunnel still allowed was closed: {ended:?}"
        );

        // Unregistered: every connection and tunnel of the VM closes at once.
        let mut kept = Guest::new(egress).await;
        assert_eq!(kept.get(&url).await.unwrap().status, 200);
        let tunnel = slow_tunnel(egress, tls.client.clone());
        tokio::time::sleep(Duration::from_millis(700)).await;
        let idle = Guest::new(egress).await;
        px.api()
            .unregister_vm(UnregisterVmRequest { vm: "a".into() })
            .await
            .unwrap();
        assert!(
            kept.closed_within(Duration::from_secs(2)).await,
            "a kept connection outlives its VM's route"
        );
        let mut idle = idle;
        assert!(idle.closed_within(Duration::from_secs(2)).await);
        let ended = tokio::time::timeout(Duration::from_secs(3), tunnel).await;
        assert!(matches!(ended, Ok(Ok(Err(_)))), "{ended:?}");

        // Its decisions are still counted.
        let s = stats(px, "a").await;
        assert!(s.egress_allowed >= 4 && s.egress_denied >= 2, "{s:?}");
        assert!(!s.registered, "{s:?}");
    });
}

#[test]
fn absolute_form_requests_are_paced_and_timed_out_like_tunnels() {
    run("paced", "  idle_timeout_secs: 1\n", |l| async move {
        let Lab {
            px, socket, egress, ..
        } = &l;
        let mut p = policy(&[API]);
        p.bytes_per_second = 1 << 20;
        px.register("a", 3, socket, p).await;

        // 3 MiB down at 1 MiB/s with 1 MiB of burst: two seconds at the least.
        let mut g = Guest::new(egress).await;
        let started = Instant::now();
        let a = g
            .get(&format!("http://{API}/bytes/{}", 3 << 20))
            .await
            .unwrap();
        assert_eq!(a.body.len(), 3 << 20);
        let took = started.elapsed();
        assert!(took > Duration::from_millis(1500), "3 MiB GET in {took:?}");

        // 3 MiB up: paced and counted (once the budget the GET spent has come back: a request
        // made while it is in debt is answered 429; and on a new connection, as a kept one
        // idle for longer than the idle timeout is closed).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut g = Guest::new(egress).await;
        let before = stats(px, "a").await.egress_bytes_out;
        let started = Instant::now();
        let head = format!(
            "POST http://{API}/up HTTP/1.1\r\nhost: {API}\r\ncontent-length: {}\r\n\r\n",
            3 << 20
        );
        g.send(head.as_bytes()).await.unwrap();
        g.send(&vec![7u8; 3 << 20]).await.unwrap();
        let a = g.answer().await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            format!("POST /up {} host={API}", 3 << 20)
        );
        let took = started.elapsed();
        assert!(took > Duration::from_millis(1500), "3 MiB POST in {took:?}");
        let out = stats(px, "a").await.egress_bytes_out - before;
        assert!(out >= 3 << 20, "{out} bytes counted out");

        // An upstream that never answers: 504 after the idle timeout (another VM: this one's
        // byte budget is spent).
        let egress = px
            .register("b", 4, &px.run.join("vsock-4.sock"), policy(&[API]))
            .await
            .egress_socket;
        let mut g = Guest::new(&egress).await;
        let started = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(8), g.get(&format!("http://{API}/hang")))
            .await
            .expect("a request to a silent upstream outlives the idle timeout")
            .unwrap();
        assert_eq!(a.status, 504, "{a:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
    });
}

#[test]
fn one_cap_counts_tunnels_and_requests_and_is_taken_before_dialling() {
    run("cap", "  max_upstreams: 4\n", |l| async move {
        let Lab {
            tls,
            tls_accepted,
            http_accepted,
            egress,
            ..
        } = &l;

        // 40 tunnels at once against a cap of 4: at most 4 are dialled.
        let mut tunnels = Vec::new();
        for _ in 0..40 {
            tunnels.push(tunnel(egress, tls.client.clone(), (2 << 16, 1500)));
        }
        let mut done = 0;
        for t in tunnels {
            done += usize::from(t.await.unwrap().is_ok());
        }
        assert!(
            (1..=4).contains(&done),
            "{done} tunnels of 40 with a cap of 4"
        );
        let dialled = tls_accepted.load(SeqCst);
        assert!(
            dialled <= 4,
            "{dialled} upstream connections with a cap of 4"
        );

        // Requests that hang hold the same cap: 4 held, then neither a request nor a tunnel.
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut g = Guest::new(egress).await;
            g.send(format!("GET http://{API}/hang HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            held.push(g);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while http_accepted.load(SeqCst) < 4 {
            assert!(
                Instant::now() < deadline,
                "the held requests were not dialled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut g = Guest::new(egress).await;
        let a = g.get(&format!("http://{API}/x")).await.unwrap();
        assert_eq!(a.status, 429, "{a:?}");
        let t = tunnel(egress, tls.client.clone(), (1, 0)).await.unwrap();
        assert!(t.is_err(), "a tunnel past the cap: {t:?}");
        assert_eq!(http_accepted.load(SeqCst), 4);
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = Guest::new(egress)
            .await
            .get(&format!("http://{API}/x"))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
    });
}

/// Opens a CONNECT to `API:443` on `egress`, answered 200, then sends `first`.
async fn connect_then(egress: &str, first: &[u8]) -> Guest {
    let mut g = Guest::new(egress).await;
    g.send(format!("CONNECT {API}:443 HTTP/1.1\r\nhost: {API}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let a = g.answer().await.unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    g.send(first).await.unwrap();
    g
}

/// A ClientHello as rustls sends it to `name` (no SNI for an address).
fn client_hello(name: rustls::pki_types::ServerName<'static>) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

#[test]
fn nothing_is_dialled_before_the_client_hello_passes() {
    run("hello", "", |l| async move {
        let Lab {
            px,
            tls,
            tls_accepted: accepted,
            egress,
            ..
        } = &l;
        let other = rustls::pki_types::ServerName::try_from(OTHER).unwrap();
        let address = rustls::pki_types::ServerName::IpAddress(
            SERVER.parse::<std::net::IpAddr>().unwrap().into(),
        );
        for (what, first) in [
            ("another host's SNI", client_hello(other)),
            ("no SNI", client_hello(address)),
            ("a fake TLS record", b"\x16\x03\x01\x00\x05hello".to_vec()),
            ("plain HTTP", b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
        ] {
            let mut g = connect_then(egress, &first).await;
            assert!(g.closed_within(Duration::from_secs(12)).await, "{what}");
            assert_eq!(accepted.load(SeqCst), 0, "{what} was dialled");
        }
        // The real thing is.
        let got = tunnel(egress, tls.client.clone(), (1000, 0)).await.unwrap();
        assert_eq!(got.unwrap(), 1000);
        assert_eq!(accepted.load(SeqCst), 1);
        let s = stats(px, "a").await;
        assert!(s.reasons["not TLS"] >= 2, "{s:?}");
        assert!(s.reasons["SNI differs from CONNECT host"] >= 2, "{s:?}");
    });
}

#[test]
fn ports_are_policy() {
    run("ports", "", |l| async move {
        let Lab {
            px, socket, egress, ..
        } = &l;
        let ssh = http_origin(SERVER, 22).await;
        let alt = http_origin(SERVER, 8080).await;

        // The default: 80 and 443 only.
        let mut g = Guest::new(egress).await;
        g.send(format!("CONNECT {API}:22 HTTP/1.1\r\nhost: {API}:22\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let a = g.answer().await.unwrap();
        assert_eq!(a.status, 403, "{a:?}");
        assert!(
            String::from_utf8_lossy(&a.body).contains("port 22"),
            "{a:?}"
        );
        for url in [format!("http://{API}:22/"), format!("http://{API}:8080/")] {
            let a = Guest::new(egress).await.get(&url).await.unwrap();
            assert_eq!(a.status, 403, "{url}: {a:?}");
        }
        let a = Guest::new(egress)
            .await
            .get(&format!("http://{API}/"))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!((ssh.load(SeqCst), alt.load(SeqCst)), (0, 0));
        assert!(
            stats(px, "a")
                .await
                .reasons
                .contains_key("port not allowed")
        );

        // A policy that names its ports.
        let mut p = policy(&[API]);
        p.allowed_ports = vec![8080];
        px.register("a", 3, socket, p).await;
        let a = Guest::new(egress)
            .await
            .get(&format!("http://{API}:8080/"))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        let a = Guest::new(egress)
            .await
            .get(&format!("http://{API}/"))
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{a:?}");
        assert_eq!(alt.load(SeqCst), 1);

        // A port that is not one is refused at registration.
        let mut p = policy(&[API]);
        p.allowed_ports = vec![443, 70000];
        let refused = px
            .api()
            .register_vm(volant_services::api::proxy::v1::RegisterVmRequest {
                route: Some(volant_services::api::proxy::v1::Route {
                    vm: "a".into(),
                    cid: 3,
                    socket: socket.display().to_string(),
                    ingress_port: 8080,
                    egress: Some(p),
                    egress_socket: String::new(),
                    ingress_disabled: false,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("70000"), "{refused:?}");
    });
}

#[test]
fn parsing_is_strict() {
    run("strict", "", |l| async move {
        let Lab {
            tls_accepted,
            http_accepted,
            egress,
            ..
        } = &l;
        for head in [
            format!("CONNECT {API}:+443 HTTP/1.1\r\n\r\n"),
            format!("CONNECT {API}:0443x HTTP/1.1\r\n\r\n"),
            format!("CONNECT {API}:443 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"),
            format!("CONNECT {API}:0 HTTP/1.1\r\n\r\n"),
            format!("CONNECT {API}:65536 HTTP/1.1\r\n\r\n"),
            format!("CONNECT {API}:000443 HTTP/1.1\r\n\r\n"),
            format!("CONNECT {API} HTTP/1.1\r\n\r\n"),
            format!("CONNECT http://{API}:443 HTTP/1.1\r\n\r\n"),
            format!("CONNECT user@{API}:443 HTTP/1.1\r\n\r\n"),
            format!("GET http://{API}:+80/ HTTP/1.1\r\n\r\n"),
            format!("GET http://{API}:/ HTTP/1.1\r\n\r\n"),
            format!("GET http://user:pw@{API}/ HTTP/1.1\r\n\r\n"),
            format!("GET http://{API}/#frag HTTP/1.1\r\n\r\n"),
            "GET /origin-form HTTP/1.1\r\nhost: api.example.test\r\n\r\n".to_string(),
            format!("GET ftp://{API}/ HTTP/1.1\r\n\r\n"),
            format!(
                "POST http://{API}/ HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            format!(
                "POST http://{API}/ HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd"
            ),
            format!("POST http://{API}/ HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
        ] {
            let mut g = Guest::new(egress).await;
            g.send(head.as_bytes()).await.unwrap();
            let a = g.answer().await.unwrap();
            assert_eq!(a.status, 400, "{head:?}: {a:?}");
            assert!(g.closed_within(Duration::from_secs(2)).await, "{head:?}");
        }
        assert_eq!(
            (tls_accepted.load(SeqCst), http_accepted.load(SeqCst)),
            (0, 0)
        );
        // What is well formed passes: a chunked POST, upper-case scheme and host.
        let mut g = Guest::new(egress).await;
        g.send(
            b"POST HTTP://API.example.test/c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let a = g.answer().await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            format!("POST /c 5 host={API}"),
            "{a:?}"
        );
    });
}

/// proxyd's resident set in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_flood_of_connections_is_capped_and_other_vms_are_served() {
    run("flood", "  max_connections: 32\n", |l| async move {
        let Lab {
            px, egress: flood, ..
        } = &l;
        let calm = px
            .register("calm", 4, &px.run.join("vsock-4.sock"), policy(&[API]))
            .await
            .egress_socket;
        let mut open = Vec::new();
        for _ in 0..600 {
            if let Ok(s) = UnixStream::connect(&flood).await {
                open.push(Guest(s));
            }
        }
        // Past the cap, a connection is answered 429 and closed at once.
        let mut refused = 0;
        for g in &mut open[100..] {
            if let Ok(Ok(a)) = tokio::time::timeout(Duration::from_secs(2), g.answer()).await {
                assert_eq!(a.status, 429, "{a:?}");
                refused += 1;
            }
        }
        assert_eq!(refused, 500, "connections past the cap of 32 were kept");
        let a = Guest::new(&calm)
            .await
            .get(&format!("http://{API}/x"))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        assert!(rss_kib(px.pid()) < 64 << 10);
        let s = stats(px, "a").await;
        assert!(s.reasons["too many connections"] >= 500, "{s:?}");
        drop(open);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = Guest::new(flood)
            .await
            .get(&format!("http://{API}/x"))
            .await
            .unwrap();
        assert_eq!(
            a.status, 200,
            "once the flood is gone the VM is served: {a:?}"
        );
    });
}
