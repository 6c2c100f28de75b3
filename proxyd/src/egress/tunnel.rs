//! `CONNECT` tunnels: answered 200, then the guest's TLS ClientHello is read and its SNI checked
//! against the CONNECT host before anything is dialled; then the two connections are spliced
//! both ways, paced by the VM's byte budget, until they finish, go idle, outlive the total
//! timeout or stop being allowed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Denial, Egress, Passed, closed, deny};
use crate::routes::{Policy, Vm};
use crate::rules::{Host, normalise};
use crate::splice::{Buf, Socket, both_ways};

/// How long the guest has to send its ClientHello once the tunnel is answered.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

impl Egress {
    /// Carries one tunnel; `buf` holds what the guest sent after its CONNECT.
    pub(super) async fn tunnel(
        &self,
        guest: Socket,
        mut buf: Buf,
        vm: &Arc<Vm>,
        passed: Passed,
        mut policy_rx: watch::Receiver<Option<Arc<Policy>>>,
    ) {
        let (target, mut decision) = (passed.target, passed.decision);
        if guest
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        let checked = async {
            let sni = tokio::time::timeout(HELLO_TIMEOUT, client_hello(&guest, &mut buf))
                .await
                .unwrap_or_else(|_| Err(format!("no TLS ClientHello within {HELLO_TIMEOUT:?}")))
                .map_err(|why| deny(http::StatusCode::FORBIDDEN, "not TLS", why))?;
            let sni_ok = match (&sni, &target.host) {
                (Some(s), host) => normalise(s).ok().as_ref() == Some(host),
                // Clients send no SNI for IP literals.
                (None, Host::Ip(_)) => true,
                (None, Host::Name(_)) => false,
            };
            if !sni_ok {
                return Err(deny(
                    http::StatusCode::FORBIDDEN,
                    "SNI differs from CONNECT host",
                    format!("the ClientHello names {sni:?}, the CONNECT {}", target.host),
                ));
            }
            self.dial(&target).await
        };
        let tcp = tokio::select! {
            r = checked => r,
            d = self.revoked(&mut policy_rx, &target) => Err(d),
        };
        let tcp = match tcp.and_then(|t| {
            Socket::tcp(t).map_err(|e| {
                deny(
                    http::StatusCode::BAD_GATEWAY,
                    "dial failed",
                    format!("{}: {e}", target.host),
                )
            })
        }) {
            Ok(t) => t,
            Err(d) => return decision.refuse(vm, &format!("{}:{}", target.host, target.port), &d),
        };
        decision.allow(vm, &target);
        let _open = crate::metrics::Tunnel::open();
        let carried = async {
            tcp.write_all(buf.bytes()).await?;
            let early = vm.carried(true, buf.bytes().len());
            if !early.is_zero() {
                tokio::time::sleep(early).await;
            }
            let (idle, total) = (self.idle_timeout, self.total_timeout);
            both_ways(&guest, &tcp, idle, total, |out, n| vm.carried(out, n)).await
        };
        let ended: Result<_, Denial> = tokio::select! {
            r = carried => Ok(r),
            d = self.revoked(&mut policy_rx, &target) => Err(d),
        };
        match ended {
            Ok(Ok((out, back))) => {
                tracing::debug!(vm = %vm.name, host = %target.host, out, back, "tunnel closed")
            }
            Ok(Err(e)) => tracing::debug!(vm = %vm.name, host = %target.host, "tunnel ended: {e}"),
            Err(d) => closed(vm, &target, &d),
        }
    }
}

/// Reads the guest's TLS ClientHello into `buf` (which may hold part or all of it already) and
/// returns its SNI. What was read stays in `buf`, to be sent on.
pub(super) async fn client_hello(guest: &Socket, buf: &mut Buf) -> Result<Option<String>, String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        while fed < buf.bytes().len() {
            let mut rest = &buf.bytes()[fed..];
            fed += acceptor
                .read_tls(&mut rest)
                .map_err(|e| format!("not TLS: {e}"))?;
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    return Ok(accepted.client_hello().server_name().map(str::to_string));
                }
                Ok(None) => {}
                Err((e, _)) => return Err(format!("not a TLS ClientHello: {e}")),
            }
        }
        if buf.is_full() {
            return Err("the ClientHello is too large".into());
        }
        match buf.fill(&mut { guest }).await {
            Ok(0) => return Err("the guest closed the tunnel before a TLS ClientHello".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello for `sni`, as rustls sends it.
    fn client_hello_for(sni: &str) -> Vec<u8> {
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
    async fn nothing_the_guest_sent_is_lost_however_it_arrives() {
        let hello = client_hello_for("api.example.com");
        let after = [7u8; 20 << 10];
        // All at once, and in two parts with more after.
        for split in [hello.len() + after.len(), 40] {
            let (a, b) = tokio::net::UnixStream::pair().unwrap();
            let sent = [hello.as_slice(), &after].concat();
            let (first, rest) = sent.split_at(split);
            let mut a = a;
            tokio::io::AsyncWriteExt::write_all(&mut a, first)
                .await
                .unwrap();
            let guest = Socket::unix(b).unwrap();
            let mut buf = Buf::new(super::super::MAX_HEAD);
            buf.fill(&mut { &guest }).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut a, rest)
                .await
                .unwrap();
            let sni = client_hello(&guest, &mut buf).await.unwrap();
            assert_eq!(sni.as_deref(), Some("api.example.com"));
            assert!(buf.bytes().starts_with(&hello), "split at {split}");
        }
    }
}
