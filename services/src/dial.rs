//! Dialling peers: a lazily connected channel with deadlines and trace propagation.

use std::time::Duration;

use tonic::transport::Endpoint;

use crate::addr::Addr;
use crate::mtls::MutualTls;
use crate::telemetry::{GrpcTrace, GrpcTraceLayer, Side};

/// A channel to a peer service, carrying trace context. Generated clients take it as is, e.g.
/// `IpamClient::new(channel)`.
pub type Channel = GrpcTrace<tonic::transport::Channel>;

/// How long a connection attempt may take before the call fails with `UNAVAILABLE`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default deadline of one call, so a stuck peer never hangs its caller.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel to `addr`. It connects on first use and reconnects after failures, so a service can
/// start before its peers.
pub fn dial(addr: &Addr) -> anyhow::Result<Channel> {
    dial_with(addr, None)
}

/// Like [`dial`]; over TCP with `tls`, the connection is mutual TLS.
pub fn dial_with(addr: &Addr, tls: Option<&MutualTls>) -> anyhow::Result<Channel> {
    let endpoint = match (addr, tls) {
        (Addr::Unix(path), _) => Endpoint::from_shared(format!("unix:{}", path.display()))?,
        (Addr::Tcp(hostport), None) => Endpoint::from_shared(format!("http://{hostport}"))?,
        (Addr::Tcp(hostport), Some(tls)) => {
            Endpoint::from_shared(format!("https://{hostport}"))?.tls_config(tls.client(addr))?
        }
    };
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(tower::Layer::layer(&GrpcTraceLayer(Side::Client), channel))
}
