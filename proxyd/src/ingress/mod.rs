//! The ingress proxy: an HTTP/1.1 listener (a Unix socket by default) that the gateway forwards
//! `/api/v1/vms/{name}/proxy/{path...}` to. Per VM it dials the hybrid-vsock socket, does the
//! `CONNECT`/`OK` handshake with kestrel's listener and passes the request on, reusing idle
//! connections. One task per client connection does everything: it parses heads itself
//! ([`wire`]), carries bodies verbatim (spliced when large), and splices upgraded (WebSocket)
//! connections both ways, so a request costs a few syscalls and no hand-offs between tasks.
//! The ingress runs on threads of its own, each a single-threaded runtime that accepts from the
//! shared listener and keeps its own idle vsock streams, so a request never wakes another
//! thread.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;
use volant_services::daemon::{Listener, Stop};
use volant_services::metrics::KeyValue;
use volant_services::telemetry::{DataSpan, SpanKind};

use crate::routes::Routes;
use crate::splice::{Buf, Pipe, Socket, both_ways};
use crate::wire::{self, Framing, Refusal, Request};

mod pool;
use crate::{hvsock, metrics};
use pool::Pool;

/// The read buffer of a client connection, which bounds the request head.
const MAX_HEAD: usize = 256 * 1024;
/// The read buffer for answers, which bounds their heads.
const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// How long a client may take to send a request head (the gateway's kept connections depend on
/// it).
const HEAD_TIMEOUT: Duration = volant_services::timeouts::INGRESS_HEAD;
/// How long an upgraded connection may live.
const UPGRADED_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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
    /// How long a body or an upgraded connection may sit idle.
    pub idle_timeout: Duration,
}

/// Why an exchange failed, and whether the client already has part of an answer.
struct Failure {
    status: StatusCode,
    message: String,
    /// Bytes of an answer reached the client: it can only be closed.
    answered: bool,
    /// The workload closed a reused connection before answering: safe to retry a bodiless
    /// request on a fresh one.
    stale: bool,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
            answered: false,
            stale: false,
        }
    }
}

/// The per-connection pieces an exchange works with.
struct Conn<'a> {
    down: &'a Socket,
    dbuf: &'a mut Buf,
    ubuf: &'a mut Buf,
    pipes: &'a mut [Option<Pipe>; 2],
    pool: &'a Pool,
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
        }
    }

    /// Serves HTTP/1.1 on `listener` with `threads` threads of its own until `stop`, then
    /// waits for them to end.
    pub async fn serve(
        self: Arc<Self>,
        listener: Listener,
        threads: usize,
        stop: Stop,
    ) -> anyhow::Result<()> {
        let listener = Shared::of(listener)?;
        let (tell, told) = tokio::sync::watch::channel(());
        let mut workers = Vec::new();
        for i in 0..threads {
            let (l, me, told) = (listener.try_clone()?, self.clone(), told.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("ingress-{i}"))
                    .spawn(move || {
                        let ended = me.thread(l, told);
                        if let Err(e) = &ended {
                            tracing::error!("ingress thread {i} stopped: {e:#}");
                        }
                        ended
                    })?,
            );
        }
        stop.await;
        drop(tell);
        tokio::task::spawn_blocking(move || {
            workers.into_iter().try_for_each(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an ingress thread panicked")))
            })
        })
        .await?
    }

    /// One ingress thread: accepts and serves on a runtime of its own until `stop` is dropped.
    fn thread(
        self: Arc<Self>,
        listener: Shared,
        mut stop: tokio::sync::watch::Receiver<()>,
    ) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = listener.into_tokio()?;
            let pool = Arc::new(Pool::default());
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    a = accept(&listener, &self, &pool) => a,
                };
                if let Err(e) = accepted {
                    tracing::warn!("ingress accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    }

    /// Serves one client connection: requests one after another until it closes.
    async fn connection(&self, down: Socket, pool: &Pool) {
        let mut dbuf = Buf::new(MAX_HEAD);
        let mut ubuf = Buf::new(MAX_ANSWER_HEAD);
        let mut pipes = [None, None];
        loop {
            let req = match tokio::time::timeout(HEAD_TIMEOUT, self.request(&down, &mut dbuf)).await
            {
                Ok(Ok(Some(req))) => req,
                Ok(Ok(None)) | Ok(Err(None)) | Err(_) => return,
                Ok(Err(Some(refusal))) => {
                    dbuf.consume(refusal.len);
                    let _ = down.write_all(&wire::refusal(&refusal)).await;
                    if refusal.close {
                        return;
                    }
                    continue;
                }
            };
            let conn = Conn {
                down: &down,
                dbuf: &mut dbuf,
                ubuf: &mut ubuf,
                pipes: &mut pipes,
                pool,
            };
            if !self.exchange(conn, req).await {
                return;
            }
        }
    }

    /// The next request head: `Ok(None)` when the client closed between requests, `Err(None)`
    /// when it broke off.
    async fn request(
        &self,
        down: &Socket,
        buf: &mut Buf,
    ) -> Result<Option<Request>, Option<Refusal>> {
        loop {
            if let Some(req) = wire::parse_request(buf.bytes(), self.max_body)? {
                buf.consume(req.len);
                return Ok(Some(req));
            }
            if buf.is_full() {
                return Err(Some(Refusal {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    message: format!("the request head is larger than {MAX_HEAD} bytes"),
                    close: true,
                    len: 0,
                }));
            }
            match buf.fill(&mut { down }).await {
                Ok(0) if buf.is_empty() => return Ok(None),
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    }

    /// Forwards `req` and its answer, in a span of its own that continues the trace the request
    /// carries (the gateway's); returns whether the client connection goes on.
    async fn exchange(&self, conn: Conn<'_>, req: Request) -> bool {
        let started = std::time::Instant::now();
        let method = volant_services::metrics::http_method(&req.method);
        let mut span = DataSpan::start(
            format!("ingress {method}"),
            SpanKind::Server,
            &req.trace,
            vec![
                KeyValue::new("vm", req.vm.clone()),
                KeyValue::new("http.request.method", method),
            ],
        );
        let (goes_on, status) = self.answer_request(conn, req).await;
        span.set(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if status >= 500 {
            span.failed(format!("answered {status}"));
        }
        metrics::ingress(method, status, started.elapsed());
        goes_on
    }

    /// Forwards `req` and its answer; returns whether the client connection goes on, and the
    /// status the client was answered.
    async fn answer_request(&self, conn: Conn<'_>, req: Request) -> (bool, u16) {
        let Some((vm, policy)) = self.routes.route(&req.vm) else {
            conn.pool.forget(&req.vm);
            let why = format!(
                "vm {:?} has no vsock route; is it a vsock VM that is running?",
                req.vm
            );
            let status = StatusCode::NOT_FOUND;
            return (refuse(conn.down, &req, status, why).await, status.as_u16());
        };
        vm.stats.ingress_requests.fetch_add(1, Relaxed);
        let route = &policy.route;
        if route.ingress_disabled {
            let why = format!(
                "vm {:?} takes no ingress: its plugin sets networking.proxy.enabled to false",
                req.vm
            );
            let status = StatusCode::FORBIDDEN;
            return (refuse(conn.down, &req, status, why).await, status.as_u16());
        }
        let socket = Path::new(&route.socket);
        let down = conn.down;
        match self.forward(conn, &req, socket, route.ingress_port).await {
            Ok(answered) => answered,
            Err(f) => {
                vm.stats.ingress_errors.fetch_add(1, Relaxed);
                tracing::info!(
                    vm = req.vm,
                    status = f.status.as_u16(),
                    "ingress: {}",
                    f.message
                );
                let status = f.status.as_u16();
                if f.answered {
                    return (false, status);
                }
                let refusal = Refusal {
                    status: f.status,
                    message: f.message,
                    close: !(req.framing == Framing::None && req.keep_alive),
                    len: 0,
                };
                let sent = down.write_all(&wire::refusal(&refusal)).await;
                (sent.is_ok() && !refusal.close, status)
            }
        }
    }

    /// Sends `req` to the workload (retrying once on a fresh connection if a reused one turns
    /// out closed) and relays the answer; returns whether the client connection goes on and
    /// the answer's status.
    async fn forward(
        &self,
        conn: Conn<'_>,
        req: &Request,
        socket: &Path,
        port: u32,
    ) -> Result<(bool, u16), Failure> {
        let Conn {
            down,
            dbuf,
            ubuf,
            pipes,
            pool,
        } = conn;
        let mut fresh_only = false;
        loop {
            let (up, reused) = match self.upstream(pool, &req.vm, socket, port, fresh_only).await {
                Ok(u) => u,
                Err(m) => return Err(Failure::new(StatusCode::BAD_GATEWAY, m)),
            };
            ubuf.consume(ubuf.bytes().len());
            match self.relay(down, dbuf, ubuf, pipes, &up, req).await {
                Ok((goes_on, reusable, status)) => {
                    if reusable {
                        pool.give_back(&req.vm, up);
                    }
                    return Ok((goes_on, status));
                }
                Err(f) if f.stale && reused && req.framing == Framing::None => fresh_only = true,
                Err(f) => return Err(f),
            }
        }
    }

    /// One request and its answer over `up`; returns whether the client connection goes on,
    /// whether `up` may serve again, and the answer's status.
    async fn relay(
        &self,
        down: &Socket,
        dbuf: &mut Buf,
        ubuf: &mut Buf,
        pipes: &mut [Option<Pipe>; 2],
        up: &Socket,
        req: &Request,
    ) -> Result<(bool, bool, u16), Failure> {
        let vm = &req.vm;
        let mut first = req.head.clone();
        let mut rest = req.framing;
        if let Framing::Length(n) = rest {
            let k = (dbuf.bytes().len() as u64).min(n) as usize;
            first.extend_from_slice(&dbuf.bytes()[..k]);
            dbuf.consume(k);
            rest = Framing::Length(n - k as u64);
        }
        up.write_all(&first).await.map_err(|e| Failure {
            stale: true,
            ..Failure::new(StatusCode::BAD_GATEWAY, format!("vm {vm}: {e}"))
        })?;
        let mut body_done = matches!(rest, Framing::None | Framing::Length(0));
        let outcome = {
            let [pipe_up, pipe_down] = &mut *pipes;
            let (max, idle) = (self.max_body, self.idle_timeout);
            let (mut from, mut to) = (down, up);
            let body = wire::carry(&mut from, dbuf, &mut to, rest, max, pipe_up, idle);
            let answer = self.answer(up, ubuf, down, req, pipe_down);
            tokio::pin!(body, answer);
            loop {
                tokio::select! {
                    r = &mut body, if !body_done => match r {
                        Ok(()) => body_done = true,
                        Err(e) => {
                            return Err(Failure::new(
                                StatusCode::BAD_REQUEST,
                                format!("vm {vm}: the request body broke off: {e}"),
                            ));
                        }
                    },
                    r = &mut answer => break r?,
                }
            }
        };
        let Answered {
            status,
            switched,
            reusable,
            closes,
        } = outcome;
        if switched {
            self.upgraded(down, dbuf, up, ubuf).await;
            return Ok((false, false, status));
        }
        Ok((
            body_done && !closes,
            body_done && reusable && ubuf.is_empty(),
            status,
        ))
    }

    /// Reads the answer to `req` from `up` and relays it to `down`, interim heads included.
    async fn answer(
        &self,
        up: &Socket,
        ubuf: &mut Buf,
        down: &Socket,
        req: &Request,
        pipe: &mut Option<Pipe>,
    ) -> Result<Answered, Failure> {
        let vm = &req.vm;
        let deadline = Instant::now() + self.request_timeout;
        let mut answered = false;
        let fail = |answered: bool, m: String| Failure {
            answered,
            ..Failure::new(StatusCode::BAD_GATEWAY, format!("vm {vm}: {m}"))
        };
        loop {
            let head = loop {
                match wire::parse_answer(ubuf.bytes(), &req.asked()) {
                    Ok(Some(a)) => break a,
                    Ok(None) if ubuf.is_full() => {
                        return Err(fail(answered, "the answer's head is too large".into()));
                    }
                    Ok(None) => {}
                    Err(m) => return Err(fail(answered, m)),
                }
                match tokio::time::timeout_at(deadline, ubuf.fill(&mut { up })).await {
                    Err(_) => {
                        return Err(Failure {
                            answered,
                            ..Failure::new(
                                StatusCode::GATEWAY_TIMEOUT,
                                format!("vm {vm} did not answer within {:?}", self.request_timeout),
                            )
                        });
                    }
                    Ok(Ok(0)) | Ok(Err(_)) if ubuf.is_empty() && !answered => {
                        return Err(Failure {
                            stale: true,
                            ..fail(
                                false,
                                "the workload closed the connection without answering".into(),
                            )
                        });
                    }
                    Ok(Ok(0)) => return Err(fail(answered, "the answer broke off".into())),
                    Ok(Err(e)) => return Err(fail(answered, e.to_string())),
                    Ok(Ok(_)) => {}
                }
            };
            ubuf.consume(head.len);
            let mut first = head.head;
            let mut rest = head.framing;
            if let Framing::Length(n) = rest {
                let k = (ubuf.bytes().len() as u64).min(n) as usize;
                first.extend_from_slice(&ubuf.bytes()[..k]);
                ubuf.consume(k);
                rest = Framing::Length(n - k as u64);
            }
            let sent = down.write_all(&first).await;
            answered = true;
            sent.map_err(|e| fail(true, format!("the client went away: {e}")))?;
            if head.interim {
                continue;
            }
            if head.switched {
                return Ok(Answered {
                    status: head.status,
                    switched: true,
                    reusable: false,
                    closes: true,
                });
            }
            let (mut from, mut to) = (up, down);
            wire::carry(
                &mut from,
                ubuf,
                &mut to,
                rest,
                u64::MAX,
                pipe,
                self.idle_timeout,
            )
            .await
            .map_err(|e| fail(true, format!("the answer's body broke off: {e}")))?;
            if head.closes {
                down.shutdown_write();
            }
            return Ok(Answered {
                status: head.status,
                switched: false,
                reusable: head.reusable,
                closes: head.closes,
            });
        }
    }

    /// After a 101: everything either side sends goes to the other (what each had sent already
    /// first) until both have finished or nothing moved either way for the idle timeout.
    async fn upgraded(&self, down: &Socket, dbuf: &mut Buf, up: &Socket, ubuf: &mut Buf) {
        for (buf, to) in [(dbuf, up), (ubuf, down)] {
            if !buf.is_empty() && to.write_all(buf.bytes()).await.is_err() {
                return;
            }
        }
        let idle = self.idle_timeout;
        let _ = both_ways(down, up, idle, UPGRADED_LIFETIME, |_, _| Duration::ZERO).await;
    }

    /// A connection to `vm`'s workload: an idle one unless `fresh`, else a new handshake.
    /// Returns it and whether it was reused.
    async fn upstream(
        &self,
        pool: &Pool,
        vm: &str,
        socket: &Path,
        port: u32,
        fresh: bool,
    ) -> Result<(Socket, bool), String> {
        if !fresh && let Some(s) = pool.take(vm) {
            return Ok((s, true));
        }
        let s = hvsock::connect(socket, port, self.handshake_timeout)
            .await
            .map_err(|e| format!("vm {vm}: {e}"))?;
        let s = Socket::unix(s).map_err(|e| format!("vm {vm}: {e}"))?;
        Ok((s, false))
    }
}

/// What became of an answer.
struct Answered {
    status: u16,
    switched: bool,
    reusable: bool,
    closes: bool,
}

/// Accepts one client and serves it on its own task.
async fn accept(l: &Listener, ingress: &Arc<Ingress>, pool: &Arc<Pool>) -> io::Result<()> {
    let (me, pool) = (ingress.clone(), pool.clone());
    match l {
        Listener::Unix(l) => {
            let s = Socket::unix(l.accept().await?.0)?;
            tokio::spawn(async move { me.connection(s, &pool).await });
        }
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            s.set_nodelay(true)?;
            let s = Socket::tcp(s)?;
            tokio::spawn(async move { me.connection(s, &pool).await });
        }
    }
    Ok(())
}

/// The listening socket, handed to each ingress thread as a descriptor of its own.
enum Shared {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl Shared {
    fn of(l: Listener) -> io::Result<Shared> {
        Ok(match l {
            Listener::Unix(l) => Shared::Unix(l.into_std()?),
            Listener::Tcp(l) => Shared::Tcp(l.into_std()?),
        })
    }

    fn try_clone(&self) -> io::Result<Shared> {
        Ok(match self {
            Shared::Unix(l) => Shared::Unix(l.try_clone()?),
            Shared::Tcp(l) => Shared::Tcp(l.try_clone()?),
        })
    }

    /// Registers it with the current thread's runtime.
    fn into_tokio(self) -> io::Result<Listener> {
        Ok(match self {
            Shared::Unix(l) => Listener::Unix(tokio::net::UnixListener::from_std(l)?),
            Shared::Tcp(l) => Listener::Tcp(tokio::net::TcpListener::from_std(l)?),
        })
    }
}

/// Answers `req` with `status` and `message` instead of forwarding it; returns whether the
/// client connection goes on (not when the request's body, unread, follows).
async fn refuse(down: &Socket, req: &Request, status: StatusCode, message: String) -> bool {
    let refusal = Refusal {
        status,
        message,
        close: req.framing != Framing::None || !req.keep_alive,
        len: 0,
    };
    let sent = down.write_all(&wire::refusal(&refusal)).await;
    sent.is_ok() && !refusal.close
}
