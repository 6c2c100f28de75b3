//! A host-side hybrid-vsock endpoint, an HTTPS server for egress tunnels, and a proxyd process,
//! shared by proxyd's tests and benchmarks. The endpoint speaks the `CONNECT <port>`/`OK <n>`
//! handshake like Cloud Hypervisor and vhost-device-vsock, then serves HTTP/1.1 (it echoes
//! bodies), so proxyd can be measured and tested on its own; the end-to-end tests use real guests
//! instead.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixListener;
use tokio_rustls::rustls;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;
use volant_services::api::proxy::v1::{EgressPolicy, RegisterVmRequest, Route};

/// How the endpoint behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Handshake, then HTTP: bodies echoed as they arrive (to `/whole`: once read whole),
    /// `x-seen-*` headers report what arrived; a request with `upgrade: ticks` is switched
    /// (101), and the connection then carries `tick\n` six times, 400 ms apart, while the server
    /// reads nothing, then ends.
    Serve,
    /// Close without `OK`, as when nothing listens in the guest.
    Refuse,
    /// HTTP as `Serve`, without the handshake: the endpoint in the form a plain HTTP proxy
    /// (nginx) can reach.
    Plain,
}

/// Starts the endpoint at `path`; returns the count of connections it accepted.
pub fn endpoint(path: PathBuf, mode: Mode) -> Arc<AtomicUsize> {
    let listener = UnixListener::bind(&path).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if mode != Mode::Plain {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    if mode == Mode::Refuse || !line.starts_with(b"CONNECT ") {
                        return;
                    }
                    s.write_all(b"OK 1073741824\n").await.unwrap();
                }
                let svc = hyper::service::service_fn(
                    |mut req: hyper::Request<hyper::body::Incoming>| async move {
                        if req.headers().get("upgrade").is_some_and(|v| v == "ticks") {
                            let switched = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(switched.await.unwrap());
                                for _ in 0..6 {
                                    tokio::time::sleep(Duration::from_millis(400)).await;
                                    if io.write_all(b"tick\n").await.is_err() {
                                        return;
                                    }
                                }
                            });
                            let res = hyper::Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "ticks")
                                .body(http_body_util::Full::default())
                                .unwrap();
                            return Ok::<_, hyper::Error>(res.map(http_body_util::Either::Left));
                        }
                        let mut res = hyper::Response::builder()
                            .header("x-seen-path", req.uri().to_string())
                            .header(
                                "x-seen-proxy-authorization",
                                req.headers()
                                    .contains_key("proxy-authorization")
                                    .to_string(),
                            )
                            .header(
                                "x-seen-keep-alive",
                                req.headers().contains_key("keep-alive").to_string(),
                            );
                        if let Some(v) = req.headers().get("x-custom") {
                            res = res.header("x-seen-custom", v);
                        }
                        if req.uri().path() == "/whole" {
                            use http_body_util::BodyExt as _;
                            let body = req.into_body().collect().await?.to_bytes();
                            let whole =
                                http_body_util::Either::Left(http_body_util::Full::new(body));
                            return Ok(res.body(whole).unwrap());
                        }
                        let echo = http_body_util::Either::Right(req.into_body());
                        Ok::<_, hyper::Error>(res.body(echo).unwrap())
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    count
}

/// A proxyd process in `dir` (config `yaml`), killed when dropped.
pub struct Proxyd {
    child: Child,
    /// Its run directory.
    pub run: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

impl Proxyd {
    /// Starts proxyd with `yaml` as its config and waits until it answers.
    pub async fn start(dir: &Path, yaml: &str) -> Proxyd {
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let config = dir.join("volant.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut p = Proxyd {
            child: spawn(dir, &config, &run),
            run,
            dir: dir.into(),
            config,
        };
        p.wait().await;
        p
    }

    fn grpc(&self) -> ProxyClient<volant_services::Channel> {
        ProxyClient::new(
            volant_services::dial(&volant_services::Addr::Unix(self.run.join("proxyd.sock")))
                .unwrap(),
        )
    }

    async fn wait(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut api = self.grpc();
        while api
            .list_routes(volant_services::api::proxy::v1::ListRoutesRequest {})
            .await
            .is_err()
        {
            assert!(self.child.try_wait().unwrap().is_none(), "proxyd exited");
            assert!(Instant::now() < deadline, "proxyd did not start");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gRPC API.
    pub fn api(&self) -> ProxyClient<volant_services::Channel> {
        self.grpc()
    }

    /// Registers VM `vm` with context id `cid` at the hybrid socket `socket`.
    pub async fn register(&self, vm: &str, cid: u32, socket: &Path, egress: EgressPolicy) -> Route {
        let route = Route {
            vm: vm.into(),
            cid,
            socket: socket.display().to_string(),
            ingress_port: 8080,
            egress: Some(egress),
            egress_socket: String::new(),
            ingress_disabled: false,
        };
        self.api()
            .register_vm(RegisterVmRequest { route: Some(route) })
            .await
            .unwrap()
            .into_inner()
            .route
            .unwrap()
    }

    /// `kill -9`, then a new process over the same state.
    pub async fn crash_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = spawn(&self.dir, &self.config, &self.run);
        self.wait().await;
    }
}

/// The proxyd binary: `VOLANT_PROXYD` when set (another build, for a before-and-after), else
/// this one.
fn binary() -> std::path::PathBuf {
    std::env::var_os("VOLANT_PROXYD")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_proxyd").into())
}

fn spawn(dir: &Path, config: &Path, run: &Path) -> Child {
    Command::new(binary())
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(run)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

impl Drop for Proxyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace that the calling thread (and every thread and process it starts later)
/// has moved into, with loopback up and `addr` on a veth; removed when dropped (also on a panic).
pub struct Netns(String);

impl Netns {
    /// Creates the namespace and moves this thread into it.
    pub fn enter(tag: &str, addr: &str) -> Netns {
        let name = format!("vp-{tag}-{}", std::process::id());
        sh(&format!("ip netns add {name}"));
        let ns = Netns(name.clone());
        let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        // SAFETY: setns on a valid namespace descriptor; it affects this thread only.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        sh(&format!(
            "ip link set lo up && ip link add d0 type veth peer name d1 && \
             ip addr add {addr}/32 dev d0 && ip link set d0 up && ip link set d1 up"
        ));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn sh(script: &str) {
    let ok = Command::new("sh").args(["-ec", script]).status().unwrap();
    assert!(ok.success(), "{script}");
}

/// A throwaway CA's server certificate for `names`, and a client that trusts only that CA.
pub struct Tls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl Tls {
    pub fn new(names: &[&str]) -> Tls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
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
}

/// The byte every download consists of.
pub const FILL: u8 = 0x5a;

/// An HTTPS server on `addr`:443. Each client asks with 16 bytes, a count and a pause in
/// milliseconds (big-endian u64 each), and gets that many bytes in 64 KiB chunks, the pause
/// between two chunks, then the end of the stream. Returns the count of TCP connections it
/// accepted.
pub async fn https_server(addr: &str, config: Arc<rustls::ServerConfig>) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind((addr, 443)).await.unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut ask = [0u8; 16];
                if tls.read_exact(&mut ask).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(ask[..8].try_into().unwrap()) as usize;
                let pause = Duration::from_millis(u64::from_be_bytes(ask[8..].try_into().unwrap()));
                let chunk = vec![FILL; 64 * 1024];
                while left > 0 {
                    let k = left.min(chunk.len());
                    if tls.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                    if left > 0 && !pause.is_zero() {
                        tls.flush().await.ok();
                        tokio::time::sleep(pause).await;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    count
}

/// A plain HTTP/1.1 origin on `addr:port`; returns the count of TCP connections it accepted.
/// `GET /bytes/N` answers N bytes of [`FILL`]; `/hang` is read and never answered; anything
/// else is read whole and answered `<method> <path> <body bytes> host=<Host>`.
pub async fn http_origin(addr: &str, port: u16) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind((addr, port)).await.unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        use http_body_util::BodyExt as _;
                        let path = req.uri().path().to_string();
                        if path == "/hang" {
                            std::future::pending::<()>().await;
                        }
                        let body = if let Some(n) = path.strip_prefix("/bytes/") {
                            vec![FILL; n.parse().unwrap()]
                        } else {
                            let method = req.method().to_string();
                            let host = req
                                .headers()
                                .get("host")
                                .map(|h| h.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let got = req.into_body().collect().await?.to_bytes().len();
                            format!("{method} {path} {got} host={host}").into_bytes()
                        };
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    count
}

/// A stream that sends a CONNECT with its first write (one write) and skips the proxy's answer,
/// which must be a 200, before its first read: a client that pipelines its ClientHello.
struct Pipelined<S> {
    inner: S,
    connect: Vec<u8>,
    head: Vec<u8>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Pipelined<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        while !this.head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            let mut one = ReadBuf::new(&mut b);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut one))?;
            if one.filled().is_empty() {
                return Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()));
            }
            this.head.push(b[0]);
            if this.head.ends_with(b"\r\n\r\n") && !this.head.starts_with(b"HTTP/1.1 200") {
                let head = String::from_utf8_lossy(&this.head).to_string();
                return Poll::Ready(Err(std::io::Error::other(head)));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Pipelined<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.connect.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        // The CONNECT and the ClientHello, small enough to go out in one write to a new socket.
        let all = [this.connect.as_slice(), buf].concat();
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, &all))?;
        assert_eq!(
            n,
            all.len(),
            "the CONNECT and the ClientHello went out in one write"
        );
        this.connect.clear();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One tunnel through an egress proxy at `s`: `CONNECT target`, TLS to `sni`, then a download
/// of `bytes` with `pause_ms` between chunks. With `pipelined` the ClientHello goes out in the
/// same write as the CONNECT, before the proxy's answer. Returns the bytes received (each one
/// checked) once the server ends the stream, or the error that ended the tunnel first.
pub async fn download<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    target: &str,
    sni: &str,
    client: Arc<rustls::ClientConfig>,
    (bytes, pause_ms): (usize, u64),
    pipelined: bool,
) -> std::io::Result<usize> {
    let mut connect = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").into_bytes();
    let mut head = Vec::new();
    if !pipelined {
        s.write_all(&connect).await?;
        connect.clear();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.push(b[0]);
        }
        // Any HTTP/1.x: tinyproxy answers a CONNECT with HTTP/1.0.
        if !(head.starts_with(b"HTTP/1.") && head.get(8..13) == Some(b" 200 ")) {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&head).to_string(),
            ));
        }
    }
    let s = Pipelined {
        inner: s,
        connect,
        head,
    };
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, s)
        .await?;
    let ask = [(bytes as u64).to_be_bytes(), pause_ms.to_be_bytes()].concat();
    tls.write_all(&ask).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        assert!(
            buf[..n].iter().all(|b| *b == FILL),
            "the download arrived intact"
        );
        got += n;
    }
}
