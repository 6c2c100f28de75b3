//! The egress proxy: one listener per VM at `<vsock socket>_3128`, where a guest connection to
//! CID 2 port 3128 arrives. It takes `CONNECT host:port` (a tunnel whose TLS ClientHello must
//! name the same host) and absolute-form `http://` and `https://` requests (the latter
//! originated over TLS by proxyd, certificates and host names checked), and applies every rule
//! of the VM's policy before it dials exactly the address it checked.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpStream, UnixListener, UnixStream};

use crate::http::{Body, boxed, empty, error};
use crate::resolve::Resolver;
use crate::routes::Vm;
use crate::rules::{Host, forbidden, normalise};
use crate::splice::{Socket, both_ways};
use crate::stats::Verdict;
use volant_services::hop;

/// The largest ClientHello proxyd reads to find the SNI.
const HELLO_LIMIT: usize = 64 * 1024;

/// The egress data plane's settings, shared by every VM.
pub struct Egress {
    /// Name resolution.
    pub resolver: Resolver,
    /// TLS for `https://` absolute-form requests.
    pub tls: Arc<rustls::ClientConfig>,
    /// Subnets never reached besides the built-in list.
    pub deny: Vec<IpNet>,
    /// How long dialing may take.
    pub dial_timeout: Duration,
    /// How long a connection may sit idle.
    pub idle_timeout: Duration,
    /// How long a connection may live.
    pub total_timeout: Duration,
}

/// Where a request goes, once every rule let it through.
struct Target {
    host: Host,
    port: u16,
    addr: SocketAddr,
}

/// A refusal: the status, the reason counted in the stats, and the message for the guest.
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

fn refuse(status: StatusCode, reason: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        reason,
        message,
    }
}

/// Counts carried bytes against the VM's byte bucket and counters.
struct VmMeter<'a>(&'a Vm);

impl VmMeter<'_> {
    /// `n` bytes went the way `outbound` says; returns the pause owed.
    fn carried(&self, outbound: bool, n: usize) -> Duration {
        let c = if outbound {
            &self.0.stats.egress_bytes_out
        } else {
            &self.0.stats.egress_bytes_in
        };
        c.fetch_add(n as u64, Relaxed);
        self.0.bytes.take(n as f64)
    }
}

impl Egress {
    /// Accepts the guest's connections until the VM is unregistered (the task is aborted).
    pub async fn serve(self: Arc<Self>, listener: UnixListener, vm: Weak<Vm>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(vm_now) = vm.upgrade() else { return };
            let egress = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let egress = egress.clone();
                    let vm = vm_now.clone();
                    async move { Ok::<_, Infallible>(egress.handle(req, vm).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(64 * 1024)
                    .header_read_timeout(Duration::from_secs(30))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                let _ = conn.await;
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, vm: Arc<Vm>) -> Response<Body> {
        let name = vm.route.vm.clone();
        let asked = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match self.decide(&req, &vm).await {
            Err(r) => {
                let verdict = if r.status == StatusCode::TOO_MANY_REQUESTS {
                    Verdict::Limit
                } else {
                    Verdict::Deny
                };
                vm.stats.decided(verdict, r.reason);
                tracing::info!(vm = %name, target = %asked, verdict = ?verdict, reason = r.reason, "egress: {}", r.message);
                let mut res = error(r.status, r.message);
                res.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                res
            }
            // A tunnel's verdict waits for its ClientHello; a request's is final here.
            Ok((target, tcp)) if req.method() == Method::CONNECT => {
                self.tunnel(req, vm, target, tcp)
            }
            Ok((target, tcp)) => {
                allowed(&vm, &target);
                self.forward(req, vm, target, tcp).await
            }
        }
    }

    /// Every rule, in order; on success the connection to the checked address.
    async fn decide(
        &self,
        req: &Request<Incoming>,
        vm: &Vm,
    ) -> Result<(Target, TcpStream), Refusal> {
        let policy = vm.route.egress.clone().unwrap_or_default();
        if !policy.allow_outbound {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "outbound access is off",
                format!(
                    "vm {} may not reach the outside (allow_outbound is false)",
                    vm.route.vm
                ),
            ));
        }
        if !vm.requests.try_take() || vm.bytes.exhausted() {
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited",
                format!(
                    "vm {} is over its egress rate limit; retry later",
                    vm.route.vm
                ),
            ));
        }
        let (raw_host, port) = target_of(req.method(), req.uri())
            .map_err(|m| refuse(StatusCode::BAD_REQUEST, "malformed request", m))?;
        let host = normalise(&raw_host)
            .map_err(|m| refuse(StatusCode::BAD_REQUEST, "malformed host", m))?;
        if !vm.allow.allows(&host) {
            return Err(match host {
                Host::Ip(_) => refuse(
                    StatusCode::FORBIDDEN,
                    "IP literal not listed",
                    format!("{host}: IP literals are refused unless the allowlist names them"),
                ),
                Host::Name(_) => refuse(
                    StatusCode::FORBIDDEN,
                    "not in allowlist",
                    format!("{host} is not on vm {}'s allowlist", vm.route.vm),
                ),
            });
        }
        let ip = match &host {
            // A listed literal was allowed explicitly.
            Host::Ip(ip) => *ip,
            Host::Name(n) => {
                let found = self
                    .resolver
                    .resolve(n)
                    .await
                    .map_err(|m| refuse(StatusCode::BAD_GATEWAY, "does not resolve", m))?;
                self.checked(&host, &found, vm)?
            }
        };
        if req.method() == Method::CONNECT && vm.tunnels.available_permits() == 0 {
            return Err(refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many tunnels",
                format!(
                    "vm {} has too many open tunnels; close some first",
                    vm.route.vm
                ),
            ));
        }
        let addr = SocketAddr::new(ip, port);
        let tcp = tokio::time::timeout(self.dial_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "dial timed out",
                    format!(
                        "{host} ({addr}) did not answer within {:?}",
                        self.dial_timeout
                    ),
                )
            })?
            .map_err(|e| {
                refuse(
                    StatusCode::BAD_GATEWAY,
                    "dial failed",
                    format!("{host} ({addr}): {e}"),
                )
            })?;
        let _ = tcp.set_nodelay(true);
        Ok((Target { host, port, addr }, tcp))
    }

    /// Every address a name resolved to must be allowed; returns the first.
    fn checked(&self, host: &Host, found: &[IpAddr], vm: &Vm) -> Result<IpAddr, Refusal> {
        for ip in found {
            if vm.allow.lists_ip(ip) {
                continue;
            }
            if let Some(why) = forbidden(*ip, &self.deny) {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "resolves to a forbidden address",
                    format!("{host} resolves to {ip}, which is {why}"),
                ));
            }
        }
        Ok(found[0])
    }

    /// Answers 200 to a CONNECT, then checks the tunnel's ClientHello and carries it.
    fn tunnel(
        self: Arc<Self>,
        req: Request<Incoming>,
        vm: Arc<Vm>,
        target: Target,
        tcp: TcpStream,
    ) -> Response<Body> {
        let Ok(permit) = vm.tunnels.clone().try_acquire_owned() else {
            vm.stats.decided(Verdict::Limit, "too many tunnels");
            return error(StatusCode::TOO_MANY_REQUESTS, "too many open tunnels");
        };
        tokio::spawn(async move {
            let _permit = permit;
            let name = vm.route.vm.clone();
            let guest = match hyper::upgrade::on(req).await.map(|u| u.downcast()) {
                Ok(Ok(parts)) => parts,
                Ok(Err(_)) => {
                    tracing::warn!(vm = %name, "egress: a CONNECT upgrade of an unexpected kind");
                    return;
                }
                Err(e) => {
                    tracing::debug!(vm = %name, "egress: CONNECT upgrade failed: {e}");
                    return;
                }
            };
            let guest: hyper::upgrade::Parts<TokioIo<UnixStream>> = guest;
            let (stream, early) = (guest.io.into_inner(), guest.read_buf);
            match self.tunnel_checked(stream, &early, tcp, &target, &vm).await {
                Ok((out, back)) => {
                    tracing::debug!(vm = %name, host = %target.host, out, back, "tunnel closed")
                }
                Err(e) => tracing::debug!(vm = %name, host = %target.host, "tunnel ended: {e}"),
            }
        });
        Response::new(empty())
    }

    /// Checks the tunnel's ClientHello (in what the guest sent with its CONNECT, `early`, and
    /// after), then splices the two connections together, the guest's bytes paced by its VM's
    /// byte budget. Returns the bytes carried (out, back).
    async fn tunnel_checked(
        &self,
        mut guest: UnixStream,
        early: &[u8],
        mut tcp: TcpStream,
        target: &Target,
        vm: &Vm,
    ) -> std::io::Result<(u64, u64)> {
        let hello = tokio::time::timeout(Duration::from_secs(10), hello_after(early, &mut guest))
            .await
            .unwrap_or_else(|_| Err("no TLS ClientHello within 10 s".into()));
        let (bytes, sni) = match hello {
            Ok(h) => h,
            Err(why) => {
                vm.stats.decided(Verdict::Deny, "not TLS");
                tracing::info!(vm = %vm.route.vm, host = %target.host, port = target.port, address = %target.addr, verdict = "deny", reason = "not TLS", "egress: {why}");
                return Err(std::io::Error::other(why));
            }
        };
        let sni_ok = match (&sni, &target.host) {
            (Some(s), host) => normalise(s).ok().as_ref() == Some(host),
            // Clients send no SNI for IP literals.
            (None, Host::Ip(_)) => true,
            (None, Host::Name(_)) => false,
        };
        if !sni_ok {
            vm.stats
                .decided(Verdict::Deny, "SNI differs from CONNECT host");
            tracing::info!(vm = %vm.route.vm, host = %target.host, sni = ?sni, verdict = "deny", reason = "SNI differs from CONNECT host", "egress");
            return Err(std::io::Error::other("SNI differs from the CONNECT host"));
        }
        allowed(vm, target);
        tokio::io::AsyncWriteExt::write_all(&mut tcp, &bytes).await?;
        let meter = VmMeter(vm);
        let mut out = bytes.len() as u64;
        meter.carried(true, bytes.len());
        let (guest, tcp) = (Socket::unix(guest)?, Socket::tcp(tcp)?);
        let (sent, back) = both_ways(
            &guest,
            &tcp,
            self.idle_timeout,
            self.total_timeout,
            |outbound, n| meter.carried(outbound, n),
        )
        .await?;
        out += sent;
        Ok((out, back))
    }

    /// Forwards an absolute-form request to the checked address, over TLS for `https://`.
    async fn forward(
        &self,
        req: Request<Incoming>,
        vm: Arc<Vm>,
        target: Target,
        tcp: TcpStream,
    ) -> Response<Body> {
        let https = req.uri().scheme_str() == Some("https");
        let (mut parts, body) = req.into_parts();
        hop::strip(&mut parts.headers, false);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let host_header = match (https, target.port) {
            (false, 80) | (true, 443) => target.host.to_string(),
            _ => format!("{}:{}", target.host, target.port),
        };
        parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
        if let Ok(v) = host_header.parse() {
            parts.headers.insert(http::header::HOST, v);
        }
        let out = Request::from_parts(parts, boxed(body));
        let sent = if https {
            let name = match &target.host {
                Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone()),
                Host::Ip(ip) => Ok(rustls::pki_types::ServerName::IpAddress((*ip).into())),
            };
            let Ok(name) = name else {
                return error(StatusCode::BAD_REQUEST, "not a TLS server name");
            };
            match tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
            {
                Ok(tls) => send(tls, out, &vm).await,
                Err(e) => {
                    vm.stats.decided(Verdict::Deny, "TLS validation failed");
                    return error(
                        StatusCode::BAD_GATEWAY,
                        format!("TLS with {} failed: {e}", target.host),
                    );
                }
            }
        } else {
            send(tcp, out, &vm).await
        };
        match sent {
            Ok(mut res) => {
                hop::strip(res.headers_mut(), false);
                res
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, format!("{}: {e}", target.host)),
        }
    }
}

/// Logs and counts a connection let through.
fn allowed(vm: &Vm, target: &Target) {
    vm.stats.decided(Verdict::Allow, "allowed");
    tracing::info!(vm = %vm.route.vm, host = %target.host, port = target.port, address = %target.addr, verdict = "allow", reason = "allowed", "egress");
}

/// Sends one request on a fresh HTTP/1.1 connection over `io` and streams the answer back,
/// counting its bytes against the VM.
async fn send<I>(io: I, req: Request<Body>, vm: &Arc<Vm>) -> Result<Response<Body>, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let vm = vm.clone();
    Ok(res.map(move |b| {
        use http_body_util::BodyExt as _;
        boxed(b.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                VmMeter(&vm).carried(false, d.len());
            }
            f
        }))
    }))
}

/// The host and port a proxy request names: CONNECT's authority (port required), or an
/// absolute-form URI with scheme `http` or `https`.
pub fn target_of(method: &Method, uri: &Uri) -> Result<(String, u16), String> {
    let Some(auth) = uri.authority() else {
        return Err(if method == Method::CONNECT {
            "CONNECT needs host:port".into()
        } else {
            "send absolute-form requests (http://host/path) or CONNECT host:port through this proxy"
                .into()
        });
    };
    if auth.as_str().contains('@') {
        return Err("credentials in the URL are refused".into());
    }
    if auth.host().is_empty() {
        return Err("the target names no host".into());
    }
    if method == Method::CONNECT {
        let port = auth
            .port_u16()
            .filter(|p| *p != 0)
            .ok_or("CONNECT needs host:port with a port from 1 to 65535")?;
        if uri.scheme().is_some()
            || uri
                .path_and_query()
                .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err("CONNECT takes host:port only".into());
        }
        return Ok((auth.host().to_string(), port));
    }
    let default = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        Some(other) => {
            return Err(format!(
                "scheme {other:?} is not proxied; use http or https"
            ));
        }
        None => return Err("absolute-form requests need a scheme".into()),
    };
    if auth.port().is_some() && auth.port_u16().is_none_or(|p| p == 0) {
        return Err("the port is not valid".into());
    }
    Ok((auth.host().to_string(), auth.port_u16().unwrap_or(default)))
}

/// Reads a TLS ClientHello from `io`; returns the bytes read (to forward) and its SNI.
/// The guest's ClientHello and its SNI, read from what came with its CONNECT (`early`), then from
/// `guest`. The bytes returned are everything read, all of `early` included.
async fn hello_after<R: AsyncRead + Unpin>(
    early: &[u8],
    guest: &mut R,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut unread = early;
    let (mut bytes, sni) = read_client_hello(&mut (&mut unread).chain(guest)).await?;
    bytes.extend_from_slice(unread);
    Ok((bytes, sni))
}

async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<(Vec<u8>, Option<String>), String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = io.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the guest closed the tunnel before a TLS ClientHello".into());
        }
        seen.extend_from_slice(&chunk[..n]);
        let mut rest = &chunk[..n];
        while !rest.is_empty() {
            acceptor
                .read_tls(&mut rest)
                .map_err(|e| format!("not TLS: {e}"))?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_string);
                return Ok((seen, sni));
            }
            Ok(None) if seen.len() < HELLO_LIMIT => continue,
            Ok(None) => return Err("the ClientHello is too large".into()),
            Err((e, _)) => return Err(format!("not a TLS ClientHello: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello for `sni`, as rustls sends it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        hello
    }

    #[tokio::test]
    async fn nothing_the_guest_sent_with_its_connect_is_lost() {
        let hello = client_hello("api.example.com");
        // The hello and 40 KiB after it, all read by the HTTP server with the CONNECT.
        let early = [hello.as_slice(), &[7u8; 40 << 10]].concat();
        let (bytes, sni) = hello_after(&early, &mut tokio::io::empty()).await.unwrap();
        assert_eq!(
            (bytes, sni.as_deref()),
            (early.clone(), Some("api.example.com"))
        );
        // Part of the hello with the CONNECT, the rest and more after it.
        let (first, rest) = hello.split_at(40);
        let later = [rest, b"more"].concat();
        let (bytes, _) = hello_after(first, &mut later.as_slice()).await.unwrap();
        assert!(bytes.starts_with(&hello));
    }

    #[test]
    fn targets() {
        let t = |m: &str, u: &str| target_of(&m.parse().unwrap(), &u.parse().unwrap());
        assert_eq!(
            t("CONNECT", "api.example.com:443").unwrap(),
            ("api.example.com".into(), 443)
        );
        assert_eq!(
            t("GET", "http://a.example/x?y").unwrap(),
            ("a.example".into(), 80)
        );
        assert_eq!(
            t("GET", "https://a.example:8443/").unwrap(),
            ("a.example".into(), 8443)
        );
        assert_eq!(t("GET", "http://[::1]:81/").unwrap(), ("[::1]".into(), 81));
        for (m, u) in [
            ("CONNECT", "api.example.com"),
            ("CONNECT", "api.:0"),
            ("CONNECT", ":3"),
            ("GET", "/relative"),
            ("GET", "ftp://a.example/"),
            ("GET", "http://user:pw@a.example/"),
            ("GET", "http://a.example:0/"),
        ] {
            assert!(t(m, u).is_err(), "{m} {u} accepted");
        }
    }
}
