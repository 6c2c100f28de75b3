//! The gateway's listener: plain HTTP or TLS (rustls, the certificate re-read on SIGHUP), each
//! connection's client address handed to the router, in-flight requests drained on stop.
//! Connections are bounded before anything is read from them: at most so many from one client
//! address and so many in all (a connection past either is closed at once), and a request head
//! must arrive within [`HEAD_TIMEOUT`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio_rustls::rustls;
use tower::ServiceExt as _;
use volant_services::daemon::{Io, Listener, Stop};

use crate::doors::Peer;

/// A TLS configuration that SIGHUP reloads from its files.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

fn load(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading gateway.tls.cert {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing gateway.tls.cert {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "gateway.tls.cert {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading gateway.tls.key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("gateway.tls: the key does not match the certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Tls {
    /// Loads the files; an error names the one at fault.
    pub fn open(cert: PathBuf, key: PathBuf) -> anyhow::Result<Arc<Tls>> {
        let current = RwLock::new(load(&cert, &key)?);
        Ok(Arc::new(Tls { cert, key, current }))
    }

    /// Re-reads the files on every SIGHUP; a bad file keeps the previous configuration.
    pub fn reload_on_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let tls = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match load(&tls.cert, &tls.key) {
                    Ok(c) => {
                        *tls.current.write().unwrap_or_else(|p| p.into_inner()) = c;
                        tracing::info!(cert = %tls.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::error!(
                        "TLS reload failed, keeping the previous certificate: {e:#}"
                    ),
                }
            }
        });
        Ok(())
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How long a client has to send a request head (and a kept connection may idle).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections the gateway holds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From one client address.
    pub per_client: usize,
    /// In all.
    pub total: usize,
}

/// The connections held now, by client address.
struct Held {
    limits: Limits,
    state: Mutex<(HashMap<IpAddr, usize>, usize)>,
    /// When a refusal was last logged.
    said: Mutex<Option<Instant>>,
}

/// One connection counted in [`Held`]; uncounted when dropped.
struct Slot(Arc<Held>, Option<IpAddr>);

impl Held {
    /// Counts a new connection from `peer`, or says why it is refused.
    fn take(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, &'static str> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.1 >= self.limits.total {
            return Err("the gateway holds as many connections as it may");
        }
        if let Some(ip) = peer {
            let n = s.0.entry(ip).or_default();
            if *n >= self.limits.per_client {
                return Err("the client holds as many connections as one may");
            }
            *n += 1;
        }
        s.1 += 1;
        Ok(Slot(self.clone(), peer))
    }

    /// Logs a refusal, at most once a second.
    fn refused(&self, peer: Option<IpAddr>, why: &str) {
        let mut said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *said = Some(Instant::now());
            tracing::warn!(client = ?peer, limits = ?self.limits, "connection closed: {why}");
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 -= 1;
        if let Some(ip) = self.1
            && let Some(n) = s.0.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                s.0.remove(&ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `stop`, then lets in-flight requests finish (the daemon
/// bounds the wait).
pub async fn serve(
    listener: Listener,
    app: Router,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    stop: Stop,
) -> anyhow::Result<()> {
    let (stopping, _) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let held = Arc::new(Held {
        limits,
        state: Mutex::default(),
        said: Mutex::default(),
    });
    tokio::pin!(stop);
    loop {
        while connections.try_join_next().is_some() {}
        let (io, peer): (Box<dyn Io>, Peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = accept(&listener) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match held.take(peer.0) {
            Ok(slot) => slot,
            Err(why) => {
                held.refused(peer.0, why);
                continue;
            }
        };
        let app = app.clone();
        let tls = tls.clone();
        let mut stopped = stopping.subscribe();
        connections.spawn(async move {
            let _slot = slot;
            let io: Box<dyn Io> = match tls {
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let handshake = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(io));
                    match handshake.await {
                        Ok(Ok(s)) => Box::new(s),
                        _ => return,
                    }
                }
                None => io,
            };
            let svc = app.map_request(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer);
                    req
                },
            );
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    // Stop: idle connections close, requests in flight finish.
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

async fn accept(l: &Listener) -> std::io::Result<(Box<dyn Io>, Peer)> {
    Ok(match l {
        Listener::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            (Box::new(s), Peer(Some(addr.ip())))
        }
        Listener::Unix(l) => (Box::new(l.accept().await?.0), Peer(None)),
    })
}
