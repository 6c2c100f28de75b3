//! The egress proxy: one listener per VM at `<vsock socket>_3128`, where a guest connection to
//! CID 2 port 3128 arrives. It takes `CONNECT host:port` (a tunnel whose TLS ClientHello must
//! name the same host, read before anything is dialled) and absolute-form `http://` and
//! `https://` requests (the latter originated over TLS by proxyd, certificates and host names
//! checked). Every request of a kept connection is judged by the VM's policy as it stands then,
//! and a connection at work is closed as soon as its target is no longer allowed (the VM
//! unregistered, its policy narrowed, the address now in a Volant network). Both kinds share
//! the VM's byte budget, idle and total timeouts, and one cap on upstream connections, whose
//! permit is taken before dialling; connections to the egress socket are capped too.

mod ask;
mod forward;
mod metered;
mod tunnel;

pub use ask::{Ask, Kind, authority, parse};

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::StatusCode;
use ipnet::IpNet;
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;

use crate::networks::Denied;
use crate::resolve::Resolver;
use crate::routes::{Policy, Vm};
use crate::rules::{Host, forbidden, normalise};
use crate::splice::{Buf, Socket};
use crate::stats::Verdict;
use crate::wire::{self, Refusal};
use volant_services::metrics::KeyValue;
use volant_services::telemetry::{DataSpan, SpanKind};

/// The longest request head, and the buffer a ClientHello is read into.
const MAX_HEAD: usize = 64 * 1024;
/// The longest a request head may take, and a kept connection may wait for one.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The egress data plane's settings, shared by every VM.
pub struct Egress {
    /// Name resolution.
    pub resolver: Resolver,
    /// TLS for `https://` absolute-form requests.
    pub tls: Arc<rustls::ClientConfig>,
    /// Subnets never reached besides the built-in list.
    pub denied: Arc<Denied>,
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

/// A request the rules let through: where it goes, and its decision, still to be closed by
/// what dialling it brings.
struct Passed {
    target: Target,
    decision: Decision,
}

/// A refusal: the status, the verdict and reason counted in the stats, and the message for
/// the guest.
struct Denial {
    status: StatusCode,
    verdict: Verdict,
    reason: &'static str,
    message: String,
}

fn deny(status: StatusCode, reason: &'static str, message: String) -> Denial {
    Denial {
        status,
        verdict: Verdict::Deny,
        reason,
        message,
    }
}

fn limit(reason: &'static str, message: String) -> Denial {
    Denial {
        status: StatusCode::TOO_MANY_REQUESTS,
        verdict: Verdict::Limit,
        reason,
        message,
    }
}

/// Whether a policy lets the VM out at all.
fn outbound(policy: &Policy) -> Result<(), Denial> {
    if policy.outbound() {
        return Ok(());
    }
    Err(deny(
        StatusCode::FORBIDDEN,
        "outbound access is off",
        format!(
            "vm {} may not reach the outside (allow_outbound is false)",
            policy.route.vm
        ),
    ))
}

/// Why a policy lets `host:port` through or not (the address is judged apart).
fn permitted(policy: &Policy, host: &Host, port: u16) -> Result<(), Denial> {
    let vm = &policy.route.vm;
    outbound(policy)?;
    if !policy.allow.allows(host) {
        return Err(match host {
            Host::Ip(_) => deny(
                StatusCode::FORBIDDEN,
                "IP literal not listed",
                format!("{host}: IP literals are refused unless the allowlist names them"),
            ),
            Host::Name(_) => deny(
                StatusCode::FORBIDDEN,
                "not in allowlist",
                format!("{host} is not on vm {vm}'s allowlist"),
            ),
        });
    }
    if policy.ports.binary_search(&port).is_err() {
        return Err(deny(
            StatusCode::FORBIDDEN,
            "port not allowed",
            format!(
                "port {port} is not among vm {vm}'s allowed ports {:?}",
                policy.ports
            ),
        ));
    }
    Ok(())
}

/// Whether `ip`, which `host` resolved to, may be reached: a listed literal always, anything
/// else unless it is forbidden or in a denied subnet.
fn reachable(policy: &Policy, host: &Host, ip: IpAddr, deny_list: &[IpNet]) -> Result<(), Denial> {
    if policy.allow.lists_ip(&ip) {
        return Ok(());
    }
    match forbidden(ip, deny_list) {
        None => Ok(()),
        Some(why) => Err(deny(
            StatusCode::FORBIDDEN,
            "resolves to a forbidden address",
            format!("{host} resolves to {ip}, which is {why}"),
        )),
    }
}

impl Egress {
    /// Accepts the guest's connections until the VM is unregistered (the task is aborted).
    /// Past the VM's connection cap a connection is answered 429 and closed at once.
    pub async fn serve(self: Arc<Self>, listener: UnixListener, vm: Weak<Vm>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(vm) = vm.upgrade() else { return };
            match vm.connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.connection(stream, &vm).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    vm.stats.decided(Verdict::Limit, "too many connections");
                    let answer = wire::refusal(&Refusal {
                        status: StatusCode::TOO_MANY_REQUESTS,
                        message: format!(
                            "vm {} has too many connections open to its egress proxy; close some",
                            vm.name
                        ),
                        close: true,
                        len: 0,
                    });
                    // A new socket has room for it; a guest that cannot take it loses nothing.
                    let _ = stream.try_write(&answer);
                }
            }
        }
    }

    /// Serves one guest connection: requests one after another, or one tunnel.
    async fn connection(&self, stream: UnixStream, vm: &Arc<Vm>) {
        let Ok(guest) = Socket::unix(stream) else {
            return;
        };
        let mut buf = Buf::new(MAX_HEAD);
        let mut policy_rx = vm.watch();
        let head_timeout = self.idle_timeout.min(HEAD_TIMEOUT);
        loop {
            policy_rx.borrow_and_update();
            let head = tokio::select! {
                h = tokio::time::timeout(head_timeout, next_ask(&guest, &mut buf)) => h,
                () = unregistered(&mut policy_rx) => return,
            };
            let ask = match head {
                Ok(Ok(Some(ask))) => ask,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(refusal)) => {
                    vm.stats.decided(Verdict::Deny, "malformed request");
                    tracing::info!(vm = %vm.name, status = refusal.status.as_u16(), verdict = "deny", reason = "malformed request", "egress: {}", refusal.message);
                    let _ = guest.write_all(&wire::refusal(&refusal)).await;
                    return;
                }
            };
            buf.consume(ask.len);
            let mut decision = Decision::new(vm, &ask);
            let Some(policy) = vm.policy() else { return };
            let decided = match self.decide(&ask, &policy).await {
                Ok(target) => vm
                    .upstreams
                    .clone()
                    .try_acquire_owned()
                    .map(|permit| (target, permit))
                    .map_err(|_| {
                        limit(
                            "too many upstream connections",
                            format!(
                                "vm {} has too many upstream connections open; close some first",
                                vm.name
                            ),
                        )
                    }),
                Err(d) => Err(d),
            };
            let (target, _permit) = match decided {
                Ok(d) => d,
                Err(d) => {
                    let asked = format!("{}:{}", ask.host, ask.port);
                    refuse(&guest, &mut decision, vm, &asked, d).await;
                    return;
                }
            };
            // Boxed: an idle connection's task stays small.
            let passed = Passed { target, decision };
            if ask.kind == Kind::Connect {
                return Box::pin(self.tunnel(guest, buf, vm, passed, policy_rx)).await;
            }
            if !Box::pin(self.forward(&guest, &mut buf, vm, &ask, passed, &mut policy_rx)).await {
                return;
            }
        }
    }

    /// Every rule, in order; on success where to dial.
    async fn decide(&self, ask: &Ask, policy: &Policy) -> Result<Target, Denial> {
        let vm = &policy.route.vm;
        outbound(policy)?;
        if !policy.requests.try_take() || policy.bytes.exhausted() {
            return Err(limit(
                "rate limited",
                format!("vm {vm} is over its egress rate limit; retry later"),
            ));
        }
        let host =
            normalise(&ask.host).map_err(|m| deny(StatusCode::BAD_REQUEST, "malformed host", m))?;
        permitted(policy, &host, ask.port)?;
        let ip = match &host {
            // A listed literal was allowed explicitly.
            Host::Ip(ip) => *ip,
            Host::Name(n) => {
                let found = self
                    .resolver
                    .resolve(n)
                    .await
                    .map_err(|m| deny(StatusCode::BAD_GATEWAY, "does not resolve", m))?;
                let deny_list = self.denied.now();
                for ip in &found {
                    reachable(policy, &host, *ip, &deny_list)?;
                }
                found[0]
            }
        };
        Ok(Target {
            addr: SocketAddr::new(ip, ask.port),
            host,
            port: ask.port,
        })
    }

    /// Whether `target`, let through earlier, still is under `policy` and the denied subnets.
    fn still_allowed(
        &self,
        policy: Option<&Policy>,
        target: &Target,
        deny_list: &[IpNet],
    ) -> Result<(), Denial> {
        let Some(policy) = policy else {
            return Err(deny(
                StatusCode::FORBIDDEN,
                "unregistered",
                "the vm was unregistered".into(),
            ));
        };
        permitted(policy, &target.host, target.port)?;
        reachable(policy, &target.host, target.addr.ip(), deny_list)
    }

    /// Ends, saying why, once `target` is no longer allowed: the VM unregistered, its new
    /// policy refuses the host or the port, or the address joined the denied subnets.
    async fn revoked(
        &self,
        policy_rx: &mut watch::Receiver<Option<Arc<Policy>>>,
        target: &Target,
    ) -> Denial {
        let mut deny_rx = self.denied.watch();
        loop {
            let policy = policy_rx.borrow_and_update().clone();
            let deny_list = deny_rx.borrow_and_update().clone();
            if let Err(d) = self.still_allowed(policy.as_deref(), target, &deny_list) {
                return d;
            }
            tokio::select! {
                r = policy_rx.changed() => if r.is_err() {
                    return self.still_allowed(None, target, &[]).unwrap_err();
                },
                _ = deny_rx.changed() => {}
            }
        }
    }

    /// Dials the checked address.
    async fn dial(&self, target: &Target) -> Result<TcpStream, Denial> {
        let (host, addr) = (&target.host, target.addr);
        let tcp = tokio::time::timeout(self.dial_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                deny(
                    StatusCode::GATEWAY_TIMEOUT,
                    "dial timed out",
                    format!(
                        "{host} ({addr}) did not answer within {:?}",
                        self.dial_timeout
                    ),
                )
            })?
            .map_err(|e| {
                deny(
                    StatusCode::BAD_GATEWAY,
                    "dial failed",
                    format!("{host} ({addr}): {e}"),
                )
            })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

/// Ends when the VM is unregistered.
async fn unregistered(policy_rx: &mut watch::Receiver<Option<Arc<Policy>>>) {
    while policy_rx.changed().await.is_ok() {
        if policy_rx.borrow_and_update().is_none() {
            return;
        }
    }
}

/// The next request head on a guest connection: `Ok(None)` when it closed or broke off.
async fn next_ask(guest: &Socket, buf: &mut Buf) -> Result<Option<Ask>, Refusal> {
    loop {
        if let Some(ask) = ask::parse(buf.bytes())? {
            return Ok(Some(ask));
        }
        if buf.is_full() {
            return Err(wire::refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the request head is larger than {MAX_HEAD} bytes"),
                true,
            ));
        }
        match buf.fill(&mut { guest }).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Counts, logs and answers a refusal; the connection then closes.
async fn refuse(guest: &Socket, decision: &mut Decision, vm: &Vm, asked: &str, d: Denial) {
    decision.refuse(vm, asked, &d);
    answer(guest, d).await;
}

/// Answers a refusal; the connection then closes.
async fn answer(guest: &Socket, d: Denial) {
    let _ = guest
        .write_all(&wire::refusal(&Refusal {
            status: d.status,
            message: d.message,
            close: true,
            len: 0,
        }))
        .await;
}

/// The longest host name the span records: a DNS name's limit. A guest may write any host into
/// a 64 KiB head, and spans wait in the exporter's queue.
const MAX_SPAN_HOST: usize = 253;

/// `host` as the decision span records it: at most [`MAX_SPAN_HOST`] bytes.
fn bounded(host: &str) -> String {
    let mut end = host.len().min(MAX_SPAN_HOST);
    while !host.is_char_boundary(end) {
        end -= 1;
    }
    host[..end].to_string()
}

/// One egress decision: counted and logged, and traced as a span of its own (`egress.decision`)
/// from the request's head to its verdict.
struct Decision(Option<DataSpan>);

impl Decision {
    fn new(vm: &Vm, ask: &Ask) -> Decision {
        let method = volant_services::metrics::http_method(&ask.method);
        Decision(Some(DataSpan::start(
            "egress.decision".into(),
            SpanKind::Internal,
            &http::HeaderMap::new(),
            vec![
                KeyValue::new("vm", vm.name.clone()),
                KeyValue::new("server.address", bounded(&ask.host)),
                KeyValue::new("server.port", i64::from(ask.port)),
                KeyValue::new("http.request.method", method),
            ],
        )))
    }

    /// Records the verdict on the span, which ends.
    fn close(&mut self, verdict: Verdict, reason: &'static str) {
        if let Some(mut span) = self.0.take() {
            span.set(KeyValue::new(
                "volant.decision",
                crate::metrics::verdict(verdict),
            ));
            span.set(KeyValue::new("volant.reason", reason));
        }
    }

    /// Counts and logs a decision that was not to let through.
    fn refuse(&mut self, vm: &Vm, asked: &str, d: &Denial) {
        vm.stats.decided(d.verdict, d.reason);
        self.close(d.verdict, d.reason);
        tracing::info!(vm = %vm.name, target = %asked, verdict = ?d.verdict, reason = d.reason, "egress: {}", d.message);
    }

    /// Counts and logs a connection let through.
    fn allow(&mut self, vm: &Vm, target: &Target) {
        vm.stats.decided(Verdict::Allow, "allowed");
        self.close(Verdict::Allow, "allowed");
        tracing::info!(vm = %vm.name, host = %target.host, port = target.port, address = %target.addr, verdict = "allow", reason = "allowed", "egress");
    }
}

/// Counts and logs a connection closed because its target is no longer allowed.
fn closed(vm: &Vm, target: &Target, d: &Denial) {
    if d.reason == "unregistered" {
        tracing::info!(vm = %vm.name, host = %target.host, "egress: closed, the vm was unregistered");
        return;
    }
    vm.stats.decided(Verdict::Deny, "closed by a policy change");
    tracing::info!(vm = %vm.name, host = %target.host, port = target.port, verdict = "deny", reason = d.reason, "egress: closed, no longer allowed: {}", d.message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_records_at_most_a_dns_name_of_the_host() {
        assert_eq!(bounded("api.example.com"), "api.example.com");
        assert_eq!(bounded(&"a".repeat(60_000)).len(), MAX_SPAN_HOST);
        let wide = "é".repeat(200);
        assert!(bounded(&wide).len() <= MAX_SPAN_HOST && wide.starts_with(&bounded(&wide)));
    }
}
