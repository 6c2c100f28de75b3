//! The ingress proxy: an HTTP listener (a Unix socket by default) that the gateway forwards
//! `/api/v1/vms/{name}/proxy/{path...}` to. Per VM it dials the hybrid-vsock socket, does the
//! `CONNECT`/`OK` handshake with kestrel's listener, and speaks HTTP/1.1 to the workload over it,
//! reusing idle connections. Bodies stream both ways; WebSocket (any upgrade) is spliced through.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use volant_services::daemon::{Io, Listener, Stop};

use crate::http::{Body, Unmetered, boxed, empty, error, pipe};
use crate::hvsock;
use crate::routes::Routes;
use volant_services::hop;

/// The read buffer of a client connection, which bounds the request head.
const MAX_HEAD: usize = 256 * 1024;
/// Idle connections kept per VM.
const POOL_PER_VM: usize = 32;

/// The ingress data plane.
pub struct Ingress {
    /// The registered VMs.
    pub routes: Arc<Routes>,
    /// The largest request body.
    pub max_body: u64,
    /// How long the answer's head may take.
    pub request_timeout: Duration,
    /// How long the vsock handshake may take.
    pub handshake_timeout: Duration,
    /// How long an upgraded (WebSocket) connection may sit idle.
    pub idle_timeout: Duration,
    idle: Mutex<HashMap<String, Vec<SendRequest<Body>>>>,
}

/// The VM name and the workload's path (with the query) of an ingress request path.
pub fn split_path(path_and_query: &str) -> Option<(&str, String)> {
    let rest = path_and_query
        .strip_prefix("/api/v1/vms/")
        .or_else(|| path_and_query.strip_prefix("/vms/"))?;
    let (name, rest) = rest.split_once('/')?;
    let tail = rest.strip_prefix("proxy")?;
    let target = match tail.as_bytes().first() {
        None => "/".to_string(),
        Some(b'/') => tail.to_string(),
        Some(b'?') => format!("/{tail}"),
        Some(_) => return None,
    };
    Some((name, target))
}

impl Ingress {
    /// The ingress over `routes`.
    pub fn new(
        routes: Arc<Routes>,
        max_body: u64,
        request_timeout: Duration,
        idle_timeout: Duration,
    ) -> Ingress {
        Ingress {
            routes,
            max_body,
            request_timeout,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout,
            idle: Mutex::default(),
        }
    }

    /// Serves HTTP/1.1 on `listener` until `stop`.
    pub async fn serve(self: Arc<Self>, listener: Listener, stop: Stop) -> anyhow::Result<()> {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                _ = &mut stop => return Ok(()),
                a = accept(&listener) => a,
            };
            let io = match accepted {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!("ingress accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(MAX_HEAD)
                    .header_read_timeout(Duration::from_secs(30))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, svc)
                    .with_upgrades()
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let Some((name, target)) = split_path(&pq) else {
            return error(
                StatusCode::NOT_FOUND,
                "ingress paths are /api/v1/vms/{name}/proxy/{path...}",
            );
        };
        let Some(vm) = self.routes.get(name) else {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            return error(
                StatusCode::NOT_FOUND,
                format!("vm {name:?} has no vsock route; is it a vsock VM that is running?"),
            );
        };
        vm.stats.ingress_requests.fetch_add(1, Relaxed);
        let res = self
            .forward(
                req,
                name,
                target,
                Path::new(&vm.route.socket),
                vm.route.ingress_port,
            )
            .await;
        if let Err((status, msg)) = &res {
            vm.stats.ingress_errors.fetch_add(1, Relaxed);
            tracing::info!(vm = name, status = status.as_u16(), "ingress: {msg}");
        }
        res.unwrap_or_else(|(status, msg)| error(status, msg))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        name: &str,
        target: String,
        socket: &Path,
        port: u32,
    ) -> Result<Response<Body>, (StatusCode, String)> {
        let too_big = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > self.max_body);
        if too_big {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {} bytes", self.max_body),
            ));
        }
        let upgrade = hop::wants_upgrade(req.headers());
        let incoming_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        hop::strip(&mut parts.headers, upgrade);
        parts.uri = target.parse().map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("{target:?} is not a valid path"),
            )
        })?;
        let body = if upgrade {
            empty()
        } else {
            boxed(Limited::new(body, self.max_body as usize))
        };
        let out = Request::from_parts(parts, body);
        let bad_gateway = |e: String| (StatusCode::BAD_GATEWAY, format!("vm {name}: {e}"));

        if let Some(incoming_upgrade) = incoming_upgrade {
            let stream = hvsock::connect(socket, port, self.handshake_timeout)
                .await
                .map_err(bad_gateway)?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| bad_gateway(e.to_string()))?;
            tokio::spawn(conn.with_upgrades());
            let mut res = self.answer(&mut sender, out, name).await?;
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                let outgoing_upgrade = hyper::upgrade::on(&mut res);
                let idle = self.idle_timeout;
                tokio::spawn(async move {
                    if let (Ok(a), Ok(b)) = (incoming_upgrade.await, outgoing_upgrade.await) {
                        let _ = pipe(
                            TokioIo::new(a),
                            TokioIo::new(b),
                            idle,
                            Duration::from_secs(24 * 3600),
                            &Unmetered,
                        )
                        .await;
                    }
                });
            }
            return Ok(res.map(boxed));
        }

        let mut sender = match self.pooled(name) {
            Some(s) => s,
            None => {
                let stream = hvsock::connect(socket, port, self.handshake_timeout)
                    .await
                    .map_err(bad_gateway)?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| bad_gateway(e.to_string()))?;
                tokio::spawn(conn);
                sender
            }
        };
        let res = self.answer(&mut sender, out, name).await?;
        self.give_back(name, sender);
        let (mut parts, body) = res.into_parts();
        hop::strip(&mut parts.headers, false);
        Ok(Response::from_parts(parts, boxed(body)))
    }

    /// Sends `req` to `vm`'s workload; its answer's head within the request timeout.
    async fn answer(
        &self,
        sender: &mut SendRequest<Body>,
        req: Request<Body>,
        vm: &str,
    ) -> Result<Response<Incoming>, (StatusCode, String)> {
        tokio::time::timeout(self.request_timeout, sender.send_request(req))
            .await
            .map_err(|_| {
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("vm {vm} did not answer within {:?}", self.request_timeout),
                )
            })?
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("vm {vm}: {e}")))
    }

    /// An idle connection to `vm`'s workload; busy ones stay in the pool, closed ones leave it.
    fn pooled(&self, vm: &str) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(vm)?;
        list.retain(|s| !s.is_closed());
        let ready = list.iter().position(|s| s.is_ready())?;
        Some(list.swap_remove(ready))
    }

    /// Puts a connection back; it serves again once its answer has been read.
    fn give_back(&self, vm: &str, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(vm.to_string()).or_default();
        if list.len() < POOL_PER_VM {
            list.push(sender);
        }
    }
}

async fn accept(l: &Listener) -> std::io::Result<hyper_util::rt::TokioIo<Box<dyn Io>>> {
    Ok(TokioIo::new(match l {
        Listener::Unix(l) => Box::new(l.accept().await?.0) as Box<dyn Io>,
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    }))
}
