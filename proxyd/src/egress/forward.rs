//! Absolute-form requests: sent on over a connection of their own (TLS originated by proxyd for
//! `https://`), metered like a tunnel (the VM's byte budget both ways, counted both ways), and
//! ended like one: when nothing moved either way for the idle timeout, past the total timeout,
//! or once the target is no longer allowed. Before the answer's head reached the guest that is
//! a 504 (or 502, 403); after, the connection closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use volant_services::daemon::Io;

use super::metered::Metered;
use super::{Ask, Denial, Egress, Kind, Passed, Target, answer, closed, deny};
use crate::routes::{Policy, Vm};
use crate::rules::Host;
use crate::splice::{Activity, Buf, Sink, Socket, Source, Stream};
use crate::wire::{self, Framing};

/// The read buffer for answers, which bounds their heads.
const MAX_ANSWER_HEAD: usize = 64 * 1024;

impl Egress {
    /// Sends `ask` on to where it `passed` to and relays the answer; returns whether the guest's connection
    /// goes on.
    pub(super) async fn forward(
        &self,
        guest: &Socket,
        buf: &mut Buf,
        vm: &Arc<Vm>,
        ask: &Ask,
        passed: Passed,
        policy_rx: &mut watch::Receiver<Option<Arc<Policy>>>,
    ) -> bool {
        let (target, mut decision) = (&passed.target, passed.decision);
        let activity = Arc::new(Activity::default());
        let answered = AtomicBool::new(false);
        let exchange = async {
            let up = self.open(vm, target, ask.kind, &activity).await?;
            decision.allow(vm, target);
            self.exchange(guest, buf, up, ask, &target.host, &answered)
                .await
                .map_err(|m| deny(StatusCode::BAD_GATEWAY, "upstream failed", m))
        };
        let (idle, total) = (self.idle_timeout, self.total_timeout);
        let timed_out = |m: String| deny(StatusCode::GATEWAY_TIMEOUT, "upstream timed out", m);
        let outcome = tokio::select! {
            r = exchange => r,
            e = activity.quiet(idle) => Err(timed_out(format!("{}: {e}", target.host))),
            () = tokio::time::sleep(total) => Err(timed_out(format!(
                "{}: the request lived longer than {total:?}", target.host
            ))),
            d = self.revoked(policy_rx, target) => {
                closed(vm, target, &d);
                if !answered.load(Relaxed) {
                    answer(guest, d).await;
                }
                return false;
            }
        };
        let failure = match outcome {
            Ok(goes_on) => return goes_on,
            Err(d) => d,
        };
        if answered.load(Relaxed) {
            tracing::info!(vm = %vm.name, host = %target.host, "egress: {}", failure.message);
            return false;
        }
        let asked = format!("{}:{}", target.host, target.port);
        if failure.reason == "upstream timed out" || failure.reason == "upstream failed" {
            // Let through already; what failed is the upstream, not a rule.
            tracing::info!(vm = %vm.name, target = %asked, status = failure.status.as_u16(), "egress: {}", failure.message);
        } else {
            decision.refuse(vm, &asked, &failure);
        }
        answer(guest, failure).await;
        false
    }

    /// The upstream connection: dialled, metered, over TLS for `https://`.
    async fn open(
        &self,
        vm: &Arc<Vm>,
        target: &Target,
        kind: Kind,
        activity: &Arc<Activity>,
    ) -> Result<Box<dyn Io>, Denial> {
        let tcp = self.dial(target).await?;
        let up = Metered::new(tcp, vm.clone(), activity.clone());
        if kind != Kind::Https {
            return Ok(Box::new(up));
        }
        let name = match &target.host {
            Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|e| deny(StatusCode::BAD_REQUEST, "malformed host", e.to_string()))?,
            Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
        };
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, up);
        match tokio::time::timeout(self.dial_timeout, tls).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(deny(
                StatusCode::BAD_GATEWAY,
                "TLS validation failed",
                format!("TLS with {} failed: {e}", target.host),
            )),
            Err(_) => Err(deny(
                StatusCode::GATEWAY_TIMEOUT,
                "dial timed out",
                format!(
                    "TLS with {} took longer than {:?}",
                    target.host, self.dial_timeout
                ),
            )),
        }
    }

    /// The request's head and body up, the answer down, at once (an upstream may answer before
    /// the body is whole). Returns whether the guest's connection goes on.
    async fn exchange(
        &self,
        guest: &Socket,
        buf: &mut Buf,
        up: Box<dyn Io>,
        ask: &Ask,
        host: &Host,
        answered: &AtomicBool,
    ) -> Result<bool, String> {
        let (ur, mut uw) = tokio::io::split(up);
        uw.write_all(&ask.upstream_head(host))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let (mut ur, mut uw) = (Stream(ur), Stream(uw));
        let idle = self.idle_timeout;
        let answer = relay_answer(&mut ur, guest, ask, answered, idle);
        tokio::pin!(answer);
        if ask.framing != Framing::None {
            let (mut from, mut no_pipe) = (guest, None);
            let body = wire::carry(
                &mut from,
                buf,
                &mut uw,
                ask.framing,
                u64::MAX,
                &mut no_pipe,
                idle,
            );
            tokio::select! {
                r = body => r.map_err(|e| format!("the request body broke off: {e}"))?,
                // Answered before the body was whole: the guest's connection cannot go on.
                r = &mut answer => return r.map(|_| false).map_err(|e| format!("{host}: {e}")),
            }
        }
        tokio::select! {
            r = &mut answer => r.map(|closes| !closes).map_err(|e| format!("{host}: {e}")),
            () = hung_up(guest, buf) => Err("the guest went away".into()),
        }
    }
}

/// Ends when the guest closes its connection; what it sends meanwhile (a pipelined request) is
/// kept in `buf`.
async fn hung_up(guest: &Socket, buf: &mut Buf) {
    while !buf.is_full() {
        match buf.fill(&mut { guest }).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// Reads the answer from `up` and relays it to the guest, interim heads included; returns
/// whether the guest's connection closes after it.
async fn relay_answer(
    up: &mut impl Source,
    guest: &Socket,
    ask: &Ask,
    answered: &AtomicBool,
    idle: std::time::Duration,
) -> Result<bool, String> {
    let mut ubuf = Buf::new(MAX_ANSWER_HEAD);
    loop {
        let head = loop {
            match wire::parse_answer(ubuf.bytes(), &ask.asked) {
                Ok(Some(a)) => break a,
                Ok(None) if ubuf.is_full() => return Err("the answer's head is too large".into()),
                Ok(None) => {}
                Err(m) => return Err(m),
            }
            match ubuf.fill(up).await {
                Ok(0) => return Err("the upstream closed without answering".into()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        };
        ubuf.consume(head.len);
        answered.store(true, Relaxed);
        let mut to = guest;
        Sink::write_all(&mut to, &head.head)
            .await
            .map_err(|e| format!("the guest went away: {e}"))?;
        if head.interim {
            continue;
        }
        let mut no_pipe = None;
        wire::carry(
            up,
            &mut ubuf,
            &mut to,
            head.framing,
            u64::MAX,
            &mut no_pipe,
            idle,
        )
        .await
        .map_err(|e| format!("the answer's body broke off: {e}"))?;
        if head.closes {
            guest.shutdown_write();
        }
        return Ok(head.closes);
    }
}
