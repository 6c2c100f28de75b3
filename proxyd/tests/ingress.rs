//! proxyd on its own: the real binary in front of host-side hybrid-vsock endpoints. Routing,
//! keep-alive reuse, hop-by-hop headers, the errors it answers itself, bad registrations, and a
//! `kill -9` followed by a restart (routes and egress listeners come back from its store), and an
//! upgraded connection that lives while either side talks.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::{Mode, Proxyd, endpoint};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use volant_services::api::proxy::v1::{
    EgressPolicy, ListRoutesRequest, RegisterVmRequest, Route, UnregisterVmRequest,
};

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client(ingress: &Path) -> Sender {
    let s = tokio::net::UnixStream::connect(ingress).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(c: &mut Sender, req: hyper::Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, String) {
    c.ready().await.unwrap();
    let res = c.send_request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).to_string(),
    )
}

fn get(path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(path)
        .header("host", "x")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_routes_reuses_refuses_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut px = Proxyd::start(
        dir.path(),
        "proxyd:\n  max_body_bytes: 1048576\n  ingress_threads: 2\n",
    )
    .await;
    let good = px.run.join("vsock-3.sock");
    let dead = px.run.join("vsock-4.sock");
    let connections = endpoint(good.clone(), Mode::Serve);
    endpoint(dead.clone(), Mode::Refuse);
    let web = px.register("web", 3, &good, EgressPolicy::default()).await;
    assert_eq!(web.egress_socket, format!("{}_3128", good.display()));
    assert!(Path::new(&web.egress_socket).exists());
    px.register("dead", 4, &dead, EgressPolicy::default()).await;
    let ingress = px.run.join("proxyd-ingress.sock");

    // Routing and keep-alive: ten requests, one vsock connection.
    let mut c = client(&ingress).await;
    for _ in 0..10 {
        let (code, headers, _) = send(&mut c, get("/api/v1/vms/web/proxy/hello?x=1")).await;
        assert_eq!(code, 200);
        assert_eq!(headers["x-seen-path"], "/hello?x=1");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "idle connections are reused"
    );

    // Hop-by-hop headers and proxy credentials stay on this hop; others pass.
    let req = hyper::Request::post("/api/v1/vms/web/proxy/echo")
        .header("host", "x")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("keep-alive", "timeout=5")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let (code, headers, body) = send(&mut c, req).await;
    assert_eq!((code, body.as_str()), (200, "ping"));
    assert_eq!(headers["x-seen-proxy-authorization"], "false");
    assert_eq!(headers["x-seen-keep-alive"], "false");
    assert_eq!(headers["x-seen-custom"], "kept");

    // Heads far larger than one read pass both ways, up to the limits.
    let big = "v".repeat(40 * 1024);
    let req = hyper::Request::get("/api/v1/vms/web/proxy/big")
        .header("host", "x")
        .header("x-custom", big.as_str())
        .header("x-pad", "p".repeat(150 * 1024))
        .body(Full::default())
        .unwrap();
    let (code, headers, _) = send(&mut c, req).await;
    assert_eq!(code, 200);
    assert_eq!(headers["x-seen-custom"], big.as_str());
    let mut raw = tokio::net::UnixStream::connect(&ingress).await.unwrap();
    let huge = format!(
        "GET /api/v1/vms/web/proxy/ HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n",
        "p".repeat(300 * 1024)
    );
    let (mut rd, mut wr) = raw.split();
    let (_, answer) = tokio::join!(wr.write_all(huge.as_bytes()), async {
        let mut answer = vec![0u8; 12];
        rd.read_exact(&mut answer).await.map(|_| answer)
    });
    assert_eq!(&answer.unwrap(), b"HTTP/1.1 431");

    // The errors proxyd answers itself.
    let (code, _, body) = send(&mut c, get("/api/v1/vms/dead/proxy/")).await;
    assert_eq!(code, 502, "{body}");
    assert!(
        body.contains("nothing listens on vsock port 8080"),
        "{body}"
    );
    let (code, _, body) = send(&mut c, get("/api/v1/vms/ghost/proxy/")).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("\"error\"") && body.contains("ghost"),
        "{body}"
    );
    let (code, _, body) = send(&mut c, get("/elsewhere")).await;
    assert_eq!(code, 404, "{body}");
    // A body announced over the limit is refused before it is sent (the head alone goes out).
    let mut raw = tokio::net::UnixStream::connect(&ingress).await.unwrap();
    raw.write_all(
        b"POST /api/v1/vms/web/proxy/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1048577\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 12];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");

    // A VM whose plugin turns ingress off: refused here, nothing reaches its guest.
    let mut api = px.api();
    let closed = Route {
        vm: "closed".into(),
        cid: 11,
        socket: px.run.join("vsock-11.sock").display().to_string(),
        ingress_port: 8080,
        egress: Some(EgressPolicy::default()),
        egress_socket: String::new(),
        ingress_disabled: true,
    };
    api.register_vm(RegisterVmRequest {
        route: Some(closed),
    })
    .await
    .unwrap();
    let (code, _, body) = send(&mut c, get("/api/v1/vms/closed/proxy/")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("networking.proxy.enabled"), "{body}");
    api.unregister_vm(UnregisterVmRequest {
        vm: "closed".into(),
    })
    .await
    .unwrap();

    // Bad registrations change nothing.
    let bad = |vm: &str, cid: u32, socket: &str, domains: &[&str]| RegisterVmRequest {
        route: Some(Route {
            vm: vm.into(),
            cid,
            socket: socket.into(),
            ingress_port: 8080,
            egress: Some(EgressPolicy {
                allowed_domains: domains.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            }),
            egress_socket: String::new(),
            ingress_disabled: false,
        }),
    };
    let sock = px.run.join("vsock-9.sock").display().to_string();
    for (req, code, want) in [
        (
            bad("Bad_Name", 9, &sock, &[]),
            Code::InvalidArgument,
            "lower-case",
        ),
        (bad("x", 2, &sock, &[]), Code::InvalidArgument, "start at 3"),
        (
            bad("x", 9, "relative.sock", &[]),
            Code::InvalidArgument,
            "absolute path",
        ),
        (
            bad("x", 9, &sock, &["not a name"]),
            Code::InvalidArgument,
            "allowed_domains",
        ),
        (
            bad("x", 3, &sock, &[]),
            Code::AlreadyExists,
            "belong to vm \"web\"",
        ),
    ] {
        let e = api.register_vm(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(want), "{}", e.message());
    }
    let routes = api
        .list_routes(ListRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(routes.len(), 2);

    // kill -9 and restart: the routes and egress listeners come back.
    px.crash_and_restart().await;
    let routes = px
        .api()
        .list_routes(ListRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert_eq!(
        routes.iter().map(|r| r.vm.as_str()).collect::<Vec<_>>(),
        ["dead", "web"]
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&web.egress_socket).is_ok(),
        "egress listens again"
    );
    let (code, _, _) = send(&mut client(&ingress).await, get("/api/v1/vms/web/proxy/")).await;
    assert_eq!(code, 200);

    // Unregistering is exact and idempotent.
    let mut api = px.api();
    let gone = api
        .unregister_vm(UnregisterVmRequest { vm: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(gone.existed);
    assert!(!Path::new(&web.egress_socket).exists());
    let again = api
        .unregister_vm(UnregisterVmRequest { vm: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
    let (code, _, _) = send(&mut client(&ingress).await, get("/api/v1/vms/web/proxy/")).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn an_upgraded_connection_lives_while_either_side_talks() {
    let dir = tempfile::tempdir().unwrap();
    let px = Proxyd::start(dir.path(), "proxyd:\n  idle_timeout_secs: 1\n").await;
    let socket = px.run.join("vsock-3.sock");
    endpoint(socket.clone(), Mode::Serve);
    px.register("ws", 3, &socket, EgressPolicy::default()).await;
    let mut s = tokio::net::UnixStream::connect(px.run.join("proxyd-ingress.sock"))
        .await
        .unwrap();
    s.write_all(
        b"GET /api/v1/vms/ws/proxy/feed HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: ticks\r\n\r\n",
    )
    .await
    .unwrap();
    // The client says nothing more; the workload talks every 400 ms for 2.4 s, longer than the
    // 1 s idle timeout, so the connection is never idle and carries every tick.
    let mut all = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.1 101"), "{all}");
    assert_eq!(all.matches("tick\n").count(), 6, "{all}");
}

#[test]
fn an_ingress_without_threads_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("volant.yaml");
    std::fs::write(&config, "proxyd:\n  ingress_threads: 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxyd"))
        .arg("--config")
        .arg(&config)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("proxyd.ingress_threads is 0"), "{err}");
    assert!(!dir.path().join("run/proxyd-ingress.sock").exists());
}
