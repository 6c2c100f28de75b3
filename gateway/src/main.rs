//! gateway: Volant's public REST API, a thin translator to vmmd, ipamd and netd.

mod bridges;
mod doors;
mod error;
mod ingress;
mod known;
mod model;
mod networks;
mod openapi;
mod peers;
mod plugins;
mod proxy;
mod router;
mod serve;
mod system;
mod vms;

use std::process::ExitCode;
use std::sync::Arc;

/// Many small, short-lived allocations per request (decoded messages, JSON): mimalloc serves
/// them without the lock contention of the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::Parser;
use tonic_health::pb::health_client::HealthClient;
use volant_services::addr::Addr;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::vmm::v1::vmm_client::VmmClient;
use volant_services::daemon::{self, Daemon, DaemonArgs};

/// Volant's REST API (`/api/v1/…`, `GET /api/v1/openapi.json` describes it). It reaches vmmd,
/// ipamd and netd at unix:<run-dir>/<service>.sock unless the config says otherwise.
#[derive(Parser)]
#[command(name = "gateway", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("gateway", args.daemon)?;
    check_open_door(&daemon).await?;
    let channels = [
        ("vmmd", daemon.dial_peer("vmmd")?),
        ("ipamd", daemon.dial_peer("ipamd")?),
        ("netd", daemon.dial_peer("netd")?),
        ("proxyd", daemon.dial_peer("proxyd")?),
    ];
    let ingress = daemon
        .config
        .proxyd
        .ingress
        .clone()
        .unwrap_or_else(|| Addr::Unix(daemon.run_dir.join("proxyd-ingress.sock")));
    anyhow::ensure!(
        daemon.tls.is_none() || matches!(ingress, Addr::Unix(_)),
        "proxyd's ingress is configured at {ingress}, but the config asks for mutual TLS between \
         the services and the ingress speaks plain HTTP: keep it on a Unix socket (the default)"
    );
    let peers = peers::Peers {
        vmm: VmmClient::new(channels[0].1.clone()),
        ipam: IpamClient::new(channels[1].1.clone()),
        health: channels
            .iter()
            .map(|(name, ch)| (*name, HealthClient::new(ch.clone())))
            .collect(),
        ingress: Arc::new(ingress::Ingress::new(ingress)),
        known: Arc::default(),
    };
    let (known, vmm) = (peers.known.clone(), peers.vmm.clone());
    tokio::spawn(async move { known.follow(vmm).await });
    let g = &daemon.config.gateway;
    let doors = doors::Doors::new(
        &g.api_key_hashes,
        g.requests_per_second.unwrap_or(1000),
        g.burst.unwrap_or(2000),
    )
    .map_err(anyhow::Error::msg)?;
    let tls = match &g.tls {
        Some(t) => {
            let tls = serve::Tls::open(t.cert.clone(), t.key.clone())?;
            tls.reload_on_sighup()?;
            Some(tls)
        }
        None => None,
    };
    let files = daemon::raise_file_limit();
    let limits = serve::Limits {
        per_client: g.max_connections_per_client.unwrap_or(256).max(1) as usize,
        total: g
            .max_connections
            .map_or((files / 2).min(8192), u64::from)
            .max(1) as usize,
    };
    // The VMs see the health on their network's gateway address, at the API's port.
    let port = match &daemon.listen {
        Addr::Tcp(host_port) => host_port
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(8080),
        Addr::Unix(_) => 8080,
    };
    let to_vms = peers.clone();
    let app = router::router(peers, Arc::new(doors));
    daemon
        .run(move |listener, stop| async move {
            // Only once the API's own address is bound: a wildcard one covers the networks'
            // gateway addresses, which must not be taken before it.
            tokio::spawn(bridges::follow(to_vms, port, limits));
            serve::serve(listener, app, tls, limits, stop)
                .await
                .context("serving HTTP")
        })
        .await
}

/// Refuses to serve without API keys on an address other hosts can reach, unless the config
/// says so in as many words; then warns.
async fn check_open_door(daemon: &Daemon) -> anyhow::Result<()> {
    let g = &daemon.config.gateway;
    if !g.api_key_hashes.is_empty() {
        return Ok(());
    }
    let reachable = match &daemon.listen {
        Addr::Unix(_) => false,
        Addr::Tcp(host_port) => tokio::net::lookup_host(host_port.as_str())
            .await
            .with_context(|| format!("resolving the listen address {host_port}"))?
            .any(|a| !a.ip().to_canonical().is_loopback()),
    };
    if !reachable {
        return Ok(());
    }
    anyhow::ensure!(
        g.allow_unauthenticated,
        "the gateway is to listen on {}, which other hosts (and the VMs on the bridge) can \
         reach, and no API key is set: anyone reaching it would drive the whole API. Set \
         gateway.api_key_hashes, listen on loopback, or write gateway.allow_unauthenticated: \
         true to accept that",
        daemon.listen
    );
    tracing::warn!(
        listen = %daemon.listen,
        "serving WITHOUT API keys on an address other hosts and the VMs can reach \
         (gateway.allow_unauthenticated: true)"
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("gateway", || run(args))
}
