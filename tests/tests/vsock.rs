//! vsock mode end to end: real guests under QEMU with vhost-device-vsock, real kestrel, real
//! proxyd and gateway. The guests have no network device. The host reaches the workload only
//! through `/api/v1/vms/{name}/proxy/...`; the workload reaches the outside only through proxyd's
//! egress proxy, here an HTTPS server with a local CA in the upstream namespace.
//!
//! The egress checks start inside the guest: the test workload (tests/echo) answers
//! `GET /tunnel` with a raw splice to `HTTP_PROXY` (kestrel's forwarder on 127.0.0.1:3128), so the
//! test speaks to proxyd's egress exactly as a workload would, through kestrel and vsock.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;
use volant_services::api::proxy::v1::{GetStatsRequest, ListRoutesRequest};
use volant_services::api::vmm::v1::{
    CreateVmRequest, DeleteVmRequest, GetVmRequest, InstallPluginRequest, StopVmRequest, VmStatus,
};
use volant_tests::{
    ControlPlane, Pki, guest_dir, host_and_upstream, in_netns, ready, run_leftovers,
};

const UPSTREAM: &str = "203.0.113.10";
const GATEWAY: &str = "127.0.0.1:8080";
/// The gateway's API key: every request through it carries it, and no workload may see it.
const KEY: &str = "operator-key-for-vsock";

/// A vsock plugin over the echo image.
fn manifest(name: &str, allow_outbound: bool) -> String {
    let dir = guest_dir();
    serde_json::json!({
        "name": name, "version": "1.0.0",
        "boot": {
            "kernel": dir.join("vmlinux"),
            "initramfs": dir.join("echo.cpio.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1"
        },
        "resources": { "cpu_cores": 1, "memory_mb": 256 },
        "networking": { "mode": "vsock", "proxy": {
            "enabled": true, "port": 8080, "allow_outbound": allow_outbound,
            "allowed_domains": ["api.example.test", "internal.example.test"],
            "rate_limit": { "requests_per_second": 1, "burst": 8 }
        }},
        "workload": { "entrypoint": ["/usr/bin/volant-echo", "3000"], "env": {},
                      "http": { "enabled": true, "port": 3000, "base_url": "http://localhost:3000" } }
    })
    .to_string()
}

/// A local CA, and an HTTPS server for `api.example.test` signed by it, in the upstream
/// namespace at 203.0.113.10:443. Returns the CA's PEM.
fn https_upstream(up_ns: &str) -> (String, rustls::pki_types::CertificateDer<'static>) {
    let Pki {
        ca,
        leaf,
        key: leaf_key,
    } = Pki::new("upstream", "api.example.test");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = in_netns(up_ns, || {
        let l = std::net::TcpListener::bind((UPSTREAM, 443)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let body = "hello over tls";
                let _ = tls
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (ca.pem(), ca.der().clone())
}

/// A keep-alive HTTP/1.1 connection to the gateway, made inside the host namespace.
async fn gateway_conn(
    ns: &str,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
> {
    let s = in_netns(ns, || {
        let s = std::net::TcpStream::connect(GATEWAY).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    });
    let stream = tokio::net::TcpStream::from_std(s).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

fn empty() -> http_body_util::combinators::BoxBody<Bytes, std::io::Error> {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// GET through the gateway with the API key: status and body.
async fn get(ns: &str, path: &str) -> (u16, String) {
    get_with(ns, path, &[]).await
}

/// GET through the gateway with the API key and `extra` fields: status and body.
async fn get_with(ns: &str, path: &str, extra: &[(&str, &str)]) -> (u16, String) {
    let mut c = gateway_conn(ns).await;
    let mut req = hyper::Request::get(path)
        .header("host", "gw")
        .header("authorization", format!("Bearer {KEY}"));
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let res = c.send_request(req.body(empty()).unwrap()).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

/// An upgraded connection through the gateway to the VM's workload at `path`.
async fn upgrade(
    ns: &str,
    vm: &str,
    path: &str,
    protocol: &str,
    extra: &[(&str, &str)],
) -> (
    hyper::Response<hyper::body::Incoming>,
    TokioIo<hyper::upgrade::Upgraded>,
) {
    let mut c = gateway_conn(ns).await;
    let mut req = hyper::Request::get(format!("/api/v1/vms/{vm}/proxy{path}"))
        .header("host", "gw")
        .header("authorization", format!("Bearer {KEY}"))
        .header("connection", "upgrade")
        .header("upgrade", protocol);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let mut res = c.send_request(req.body(empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), 101, "upgrading {path} on {vm}");
    let io = hyper::upgrade::on(&mut res).await.unwrap();
    (res, TokioIo::new(io))
}

/// Reads an HTTP/1.1 answer's head: status, text and content-length.
async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> (u16, String, Option<usize>) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    (status, head, length)
}

/// Reads one HTTP/1.1 answer whose body has a content-length.
async fn read_answer<S: AsyncRead + Unpin>(io: &mut S) -> (u16, String) {
    let (status, head, length) = read_head(io).await;
    let mut body = vec![0u8; length.unwrap_or(0)];
    let _ = io.read_exact(&mut body).await;
    (status, format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// From inside `vm`: `CONNECT target` on the egress proxy; the answer and the tunnel.
async fn connect(
    ns: &str,
    vm: &str,
    target: &str,
) -> (u16, String, TokioIo<hyper::upgrade::Upgraded>) {
    let (_, mut io) = upgrade(ns, vm, "/tunnel", "tunnel", &[]).await;
    io.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, head, length) = read_head(&mut io).await;
    let mut text = head;
    if status != 200 {
        let mut rest = vec![0u8; length.unwrap_or(0)];
        let _ = io.read_exact(&mut rest).await;
        text.push_str(&String::from_utf8_lossy(&rest));
    }
    (status, text, io)
}

/// TLS over a tunnel, trusting the test CA, with `sni`; then `GET /`.
async fn tls_get<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    ca: &rustls::pki_types::CertificateDer<'static>,
    sni: &str,
) -> Result<(u16, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, io),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake: {e}"))?;
    tls.write_all(format!("GET / HTTP/1.1\r\nhost: {sni}\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok(read_answer(&mut tls).await)
}

/// A WebSocket frame from the client (masked).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend(mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

async fn ws_read<S: AsyncRead + Unpin>(io: &mut S) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    io.read_exact(&mut h).await.unwrap();
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        io.read_exact(&mut b).await.unwrap();
        len = u16::from_be_bytes(b).into();
    } else if len == 127 {
        let mut b = [0u8; 8];
        io.read_exact(&mut b).await.unwrap();
        len = u64::from_be_bytes(b);
    }
    assert_eq!(h[1] & 0x80, 0, "a server's frames are not masked");
    let mut p = vec![0u8; len as usize];
    io.read_exact(&mut p).await.unwrap();
    (h[0] & 0x0f, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsock_vms_reach_and_are_reached_only_through_the_proxies() {
    let (host, up) = host_and_upstream();
    host.sh("ip addr add 203.0.113.1/24 dev up0");
    up.sh(&format!("ip addr add {UPSTREAM}/24 dev eth0"));
    let (ca_pem, ca_der) = https_upstream(&up.name);
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), &ca_pem).unwrap();
    let hash = volant_tests::sh(&format!("printf %s {KEY} | sha256sum"));
    let proxyd_config = format!(
        "proxyd:\n  extra_ca: {}\n  resolver:\n    static:\n      api.example.test: {UPSTREAM}\n      \
         internal.example.test: 10.99.0.2\n      other.example.test: {UPSTREAM}\n\
         gateway:\n  api_key_hashes: [{}]\n",
        ca_file.path().display(),
        hash.split_whitespace().next().unwrap()
    );
    let cp = ControlPlane::start_with_config(host, up, &[], "", &proxyd_config).await;
    let _gateway = cp.gateway(&[]).await;
    let ns = cp.host.name.clone();
    let mut vmm = cp.vmm();
    for (name, outbound) in [("secure", true), ("closed", false)] {
        vmm.install_plugin(InstallPluginRequest {
            manifest_json: manifest(name, outbound),
        })
        .await
        .unwrap();
    }
    cp.install_hello().await;
    let (mut v1, mut v2, mut v3, mut v4) = (vmm.clone(), vmm.clone(), vmm.clone(), vmm.clone());
    let (a, b, c, d) = tokio::join!(
        v1.create_vm(CreateVmRequest {
            name: "sec".into(),
            plugin: "secure".into(),
            ..Default::default()
        }),
        v2.create_vm(CreateVmRequest {
            name: "shut".into(),
            plugin: "closed".into(),
            ..Default::default()
        }),
        // A bridge plugin asked for vsock: the request's mode wins over the manifest's.
        v3.create_vm(CreateVmRequest {
            name: "plain".into(),
            plugin: "hello".into(),
            network: "vsock".into(),
            ..Default::default()
        }),
        // The echo workload on the bridge, for what the proxy route passes in both modes.
        v4.create_vm(CreateVmRequest {
            name: "br".into(),
            plugin: "secure".into(),
            network: "bridge".into(),
            ..Default::default()
        }),
    );
    assert_eq!(d.unwrap().into_inner().vm.unwrap().network_mode, "bridge");
    let plain = c.unwrap().into_inner().vm.unwrap();
    assert_eq!(plain.network_mode, "vsock");
    let (sec, shut) = (
        a.unwrap().into_inner().vm.unwrap(),
        b.unwrap().into_inner().vm.unwrap(),
    );
    assert_eq!(
        (
            sec.network_mode.as_str(),
            sec.ip_address.as_str(),
            sec.tap_device.as_str()
        ),
        ("vsock", "", "")
    );
    let mut cids = [sec.vsock_cid, shut.vsock_cid, plain.vsock_cid];
    cids.sort_unstable();
    assert_eq!(
        cids,
        [3, 4, 5],
        "each VM its own context id, the lowest free"
    );
    assert!(
        sec.vsock_socket.ends_with("/vms/sec/vsock.sock"),
        "{}",
        sec.vsock_socket
    );
    let limit = Duration::from_secs(90);
    let (r1, r2, r3, r4) = tokio::join!(
        ready(vmm.clone(), "sec".into(), limit),
        ready(vmm.clone(), "shut".into(), limit),
        ready(vmm.clone(), "plain".into(), limit),
        ready(vmm.clone(), "br".into(), limit)
    );
    r1.unwrap();
    r2.unwrap();
    r3.unwrap();
    r4.unwrap();

    // The operator's key and the gateway origin's cookies reach no workload, in either mode;
    // what the client addressed to the workload does.
    for vm in ["sec", "br"] {
        let (code, seen) = get_with(
            &cp.host.name,
            &format!("/api/v1/vms/{vm}/proxy/headers"),
            &[
                ("cookie", "session=operator"),
                ("x-volant-workload-authorization", "Bearer for-the-workload"),
                ("x-volant-workload-cookie", "app=1"),
            ],
        )
        .await;
        assert_eq!(code, 200, "{vm}: {seen}");
        assert!(
            !seen.contains(KEY) && !seen.contains("session="),
            "{vm}: {seen}"
        );
        assert!(
            seen.contains("authorization: Bearer for-the-workload\n"),
            "{vm}: {seen}"
        );
        assert!(seen.contains("cookie: app=1\n"), "{vm}: {seen}");
        assert!(!seen.contains("x-volant-workload"), "{vm}: {seen}");
    }
    let (code, page) = get(&cp.host.name, "/api/v1/vms/plain/proxy/").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Hello from Volant"), "{page}");

    // No network device in the guest: kestrel lists its interfaces on the console.
    let console =
        std::fs::read_to_string(cp.root.path().join("vmmd/state/vms/sec/serial.log")).unwrap();
    let interfaces = console
        .lines()
        .find(|l| l.contains("kestrel: interfaces"))
        .unwrap_or_default();
    assert!(
        interfaces.ends_with("interfaces lo"),
        "{interfaces}\n{console}"
    );

    // Ingress: a GET, a 10 MiB streamed POST, a WebSocket echo.
    let (code, body) = get(&ns, "/api/v1/vms/sec/proxy/").await;
    assert_eq!((code, body.as_str()), (200, "echo from sec\n"));
    let (code, body) = get(&ns, "/api/v1/vms/nope/proxy/").await;
    assert_eq!(code, 404, "{body}");

    let chunk: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut sha = sha1_smol::Sha1::new();
    for _ in 0..160 {
        sha.update(&chunk);
    }
    let chunks = (0..160).map({
        let chunk = Bytes::from(chunk.clone());
        move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))
    });
    let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
    let mut c = gateway_conn(&ns).await;
    let res = c
        .send_request(
            hyper::Request::post("/api/v1/vms/sec/proxy/sha1")
                .header("host", "gw")
                .header("authorization", format!("Bearer {KEY}"))
                .header("content-length", (160 * 64 * 1024).to_string())
                .body(body)
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let answer = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        format!("10485760 {}", sha.digest())
    );

    let (res, mut ws) = upgrade(
        &ns,
        "sec",
        "/ws",
        "websocket",
        &[
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    )
    .await;
    assert_eq!(
        res.headers()["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    ws.write_all(&ws_frame(1, b"hello over vsock"))
        .await
        .unwrap();
    assert_eq!(ws_read(&mut ws).await, (1, b"hello over vsock".to_vec()));
    let big: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    ws.write_all(&ws_frame(2, &big)).await.unwrap();
    assert_eq!(ws_read(&mut ws).await, (2, big));
    ws.write_all(&ws_frame(8, b"")).await.unwrap();
    assert_eq!(ws_read(&mut ws).await.0, 8);

    // Egress from inside the guest, through kestrel.
    let (code, text, tunnel) = connect(&ns, "sec", "api.example.test:443").await;
    assert_eq!(code, 200, "{text}");
    let (code, page) = tls_get(tunnel, &ca_der, "api.example.test").await.unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.ends_with("hello over tls"), "{page}");

    let (_, mut io) = upgrade(&ns, "sec", "/tunnel", "tunnel", &[]).await;
    io.write_all(b"GET https://api.example.test/ HTTP/1.1\r\nhost: api.example.test\r\n\r\n")
        .await
        .unwrap();
    let (code, page) = read_answer(&mut io).await;
    assert_eq!(
        code, 200,
        "proxyd originates TLS, trusting the extra CA: {page}"
    );
    assert!(page.ends_with("hello over tls"), "{page}");

    for (target, want) in [
        ("notlisted.example.test:443", "is not on vm sec's allowlist"),
        (
            &format!("{UPSTREAM}:443") as &str,
            "IP literals are refused",
        ),
        (
            "internal.example.test:443",
            "resolves to 10.99.0.2, which is private",
        ),
    ] {
        let (code, text, mut io) = connect(&ns, "sec", target).await;
        assert_eq!(code, 403, "{target}: {text}");
        // proxyd closes a refused connection, and the close travels back through the guest.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "{target}: still open: {closed:?}"
        );
        assert!(text.contains(want), "{target}: {text}");
    }
    let (code, text, tunnel) = connect(&ns, "sec", "api.example.test:443").await;
    assert_eq!(code, 200, "{text}");
    let mismatch = tls_get(tunnel, &ca_der, "other.example.test").await;
    assert!(
        mismatch.is_err(),
        "an SNI other than the CONNECT host passed: {mismatch:?}"
    );

    let (code, text, _) = connect(&ns, "shut", "api.example.test:443").await;
    assert_eq!(code, 403, "{text}");
    assert!(text.contains("allow_outbound is false"), "{text}");

    let mut limited = None;
    for i in 0..30 {
        let (code, text, _) = connect(&ns, "sec", "notlisted.example.test:443").await;
        if code == 429 {
            limited = Some((i, text));
            break;
        }
        assert_eq!(code, 403, "{text}");
    }
    let (_, text) = limited.expect("the rate limit never answered 429");
    assert!(text.contains("rate limit"), "{text}");

    let mut proxy = ProxyClient::new(cp.proxyd.channel());
    let stats = proxy
        .get_stats(GetStatsRequest { vm: "sec".into() })
        .await
        .unwrap()
        .into_inner()
        .vms;
    let s = &stats[0];
    assert!(
        s.egress_allowed >= 2 && s.egress_denied >= 4 && s.egress_rate_limited >= 1,
        "{s:?}"
    );
    assert!(s.ingress_requests >= 5, "{s:?}");
    for reason in [
        "not in allowlist",
        "IP literal not listed",
        "resolves to a forbidden address",
        "SNI differs from CONNECT host",
        "rate limited",
    ] {
        assert!(
            s.reasons.contains_key(reason),
            "{reason} not counted: {s:?}"
        );
    }

    // Delete: no route, no backend, no socket left; the context ids are free again.
    for name in ["sec", "shut", "plain", "br"] {
        vmm.delete_vm(DeleteVmRequest {
            name: name.into(),
            force: false,
        })
        .await
        .unwrap();
    }
    let routes = proxy
        .list_routes(ListRoutesRequest {})
        .await
        .unwrap()
        .into_inner()
        .routes;
    assert!(routes.is_empty(), "{routes:?}");
    let run = cp.run_dir();
    assert!(run_leftovers(&run).is_empty(), "{:?}", run_leftovers(&run));
    let again = vmm
        .create_vm(CreateVmRequest {
            name: "again".into(),
            plugin: "secure".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(again.vsock_cid, 3, "the lowest free context id is reused");
    let got = vmm
        .get_vm(GetVmRequest {
            name: "again".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(got.vsock_cid, 3);

    // The gateway keeps what it learnt of VMs for the proxy route: none of it outlives them,
    // also once their context id and address belong to others.
    let bridged = vmm
        .create_vm(CreateVmRequest {
            name: "br2".into(),
            plugin: "secure".into(),
            network: "bridge".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(
        bridged.ip_address, "192.168.127.100",
        "br's address, reused"
    );
    for name in ["sec", "br"] {
        let path = format!("/api/v1/vms/{name}/proxy/");
        let mut answer = get(&ns, &path).await;
        for _ in 0..20 {
            if answer.0 == 404 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer = get(&ns, &path).await;
        }
        assert_eq!(answer.0, 404, "{name}: {}", answer.1);
        assert!(answer.1.contains("does not exist"), "{name}: {}", answer.1);
    }
    ready(vmm.clone(), "again".into(), limit).await.unwrap();
    let (code, body) = get(&ns, "/api/v1/vms/again/proxy/").await;
    assert_eq!((code, body.as_str()), (200, "echo from again\n"));

    // A clean stop: the power button reaches kestrel, the workload gets SIGTERM (and says so),
    // the guest powers off, and nothing had to be forced.
    let asked = std::time::Instant::now();
    let stopped = vmm
        .stop_vm(StopVmRequest {
            name: "again".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let took = asked.elapsed();
    assert_eq!(
        (stopped.status, stopped.error.as_str()),
        (VmStatus::Stopped as i32, "")
    );
    let console =
        std::fs::read_to_string(cp.root.path().join("vmmd/state/vms/again/serial.log")).unwrap();
    for said in [
        "kestrel: power button, stopping the workload",
        "volant-echo: SIGTERM, exiting",
        "kestrel: powering off",
    ] {
        assert!(console.contains(said), "{said:?} missing:\n{console}");
    }
    println!("a clean stop through the power button took {took:?}");
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
    assert!(!cp.vmmd.log_text().contains("did not shut down in time"));
    for name in ["again", "br2"] {
        vmm.delete_vm(DeleteVmRequest {
            name: name.into(),
            force: true,
        })
        .await
        .unwrap();
    }
    assert!(run_leftovers(&run).is_empty(), "{:?}", run_leftovers(&run));
}
