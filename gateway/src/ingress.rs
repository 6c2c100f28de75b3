//! proxyd's ingress as the gateway reaches it: HTTP/1.1 connections to it are kept after an
//! answer and reused, so a proxied request costs neither a connect nor a handshake nor the
//! wake-ups of accepting and closing, on either side.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::StatusCode;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use volant_services::addr::Addr;
use volant_services::daemon::Io;

use crate::error::ApiError;

/// Connections kept, at most.
const MAX_IDLE: usize = 64;
/// How long a kept connection may be left unused (below proxyd's wait for a request head).
const IDLE_LIMIT: Duration = volant_services::timeouts::GATEWAY_KEEP;

/// proxyd's ingress listener and the connections to it kept for reuse.
pub struct Ingress {
    addr: Addr,
    /// Connections that finished a request, with when they did; one still carrying its answer's
    /// body is not yet ready for the next.
    idle: Mutex<Vec<(SendRequest<Body>, Instant)>>,
}

impl Ingress {
    /// The ingress at `addr`, with no connections yet.
    pub fn new(addr: Addr) -> Ingress {
        Ingress {
            addr,
            idle: Mutex::default(),
        }
    }

    /// A kept connection ready for a request, if there is one; drops the closed and the stale.
    pub fn take(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        idle.retain(|(s, since)| !s.is_closed() && (!s.is_ready() || now - *since < IDLE_LIMIT));
        let i = idle.iter().rposition(|(s, _)| s.is_ready())?;
        Some(idle.swap_remove(i).0)
    }

    /// Keeps `s`, which has its answer, for a later request.
    pub fn give_back(&self, s: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }

    /// A new connection to the ingress, its HTTP/1.1 side driven on its own task (upgrades
    /// included).
    pub async fn connect(&self) -> Result<SendRequest<Body>, ApiError> {
        let unavailable = |e: std::io::Error| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                format!("proxyd's ingress at {}: {e}", self.addr),
            )
        };
        let io: Box<dyn Io> = match &self.addr {
            Addr::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(unavailable)?,
            ),
            Addr::Tcp(hp) => {
                let s = tokio::net::TcpStream::connect(hp)
                    .await
                    .map_err(unavailable)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unavailable(std::io::Error::other(e)))?;
        tokio::spawn(conn.with_upgrades());
        Ok(sender)
    }
}
