//! A recording HTTP proxy in front of the gateway: volar and curl talk to it, it forwards every
//! request and keeps every answer (streams pass through unrecorded), so a test can check each
//! against the served OpenAPI document.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::Netns;

/// One answer the gateway gave.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// Request method.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// Response status.
    pub status: u16,
    /// Response content type.
    pub content_type: String,
    /// Response body.
    pub body: Bytes,
}

/// The proxy.
pub struct Recorder {
    /// `127.0.0.1:<port>` inside the namespace.
    pub addr: String,
    log: Arc<Mutex<Vec<Exchange>>>,
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn forward(
    ns: String,
    upstream: std::net::SocketAddr,
    log: Arc<Mutex<Vec<Exchange>>>,
    req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let streaming =
        req.uri().query().is_some_and(|q| q.contains("follow=true")) || path.ends_with("/events");
    let stream = crate::in_netns(&ns, move || std::net::TcpStream::connect(upstream));
    let fail = |e: String| {
        Ok(hyper::Response::builder()
            .status(599)
            .body(Full::new(Bytes::from(e)).map_err(|n| match n {}).boxed())
            .expect("response"))
    };
    let stream = match stream.and_then(|s| s.set_nonblocking(true).map(|()| s)) {
        Ok(s) => tokio::net::TcpStream::from_std(s).expect("tokio stream"),
        Err(e) => return fail(format!("proxy: connecting to the gateway: {e}")),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => return fail(format!("proxy: {e}")),
    };
    tokio::spawn(conn);
    let res = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return fail(format!("proxy: {e}")),
    };
    let (parts, body) = res.into_parts();
    if streaming {
        return Ok(hyper::Response::from_parts(parts, body.boxed()));
    }
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(format!("proxy: reading the answer: {e}")),
    };
    log.lock().expect("lock").push(Exchange {
        method,
        path,
        status: parts.status.as_u16(),
        content_type: parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: bytes.clone(),
    });
    Ok(hyper::Response::from_parts(
        parts,
        Full::new(bytes).map_err(|n| match n {}).boxed(),
    ))
}

impl Recorder {
    /// Listens on loopback inside `ns` and forwards to `upstream` (in the same namespace).
    /// Needs a Tokio runtime.
    pub fn start(ns: &Netns, upstream: &str) -> Recorder {
        let upstream: std::net::SocketAddr = upstream.parse().expect("upstream address");
        let listener = ns.enter(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let addr = listener.local_addr().expect("addr").to_string();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let log: Arc<Mutex<Vec<Exchange>>> = Arc::default();
        let (name, keep) = (ns.name.clone(), log.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (name, keep) = (name.clone(), keep.clone());
                tokio::spawn(async move {
                    let svc =
                        service_fn(move |req| forward(name.clone(), upstream, keep.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        Recorder { addr, log }
    }

    /// Every recorded exchange.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.log.lock().expect("lock").clone()
    }
}
