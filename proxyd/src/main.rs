//! proxyd: the vsock data plane. Ingress from the gateway to workloads over hybrid vsock,
//! egress from workloads to the allowed outside, and the gRPC API vmmd registers VMs with.

use std::process::ExitCode;

/// Bodies stream through in many short-lived buffers: mimalloc serves them without the lock
/// contention of the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proxyd::{egress, grpc, ingress, metrics, networks, resolve, routes, tls};
use volant_services::addr::Addr;
use volant_services::api::proxy::v1::proxy_server::ProxyServer;
use volant_services::daemon::{self, Daemon, DaemonArgs, Services};

/// Volant's vsock proxy: ingress to workloads, egress through an allowlist.
#[derive(Parser)]
#[command(name = "proxyd", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// The ingress HTTP listener [default: the config's, else unix:<run-dir>/proxyd-ingress.sock].
    #[arg(long)]
    ingress: Option<Addr>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("proxyd", args.daemon)?;
    metrics::init();
    let c = daemon.config.proxyd.clone();
    let threads = c.ingress_threads.unwrap_or(1);
    anyhow::ensure!(
        threads >= 1,
        "proxyd.ingress_threads is 0: the ingress needs at least one thread"
    );
    let (max_upstreams, max_connections) = (
        c.max_upstreams.unwrap_or(64),
        c.max_connections.unwrap_or(256),
    );
    anyhow::ensure!(
        max_upstreams >= 1 && max_connections >= 1,
        "proxyd.max_upstreams and proxyd.max_connections must be at least 1"
    );
    let mut deny = c.deny.clone();
    deny.push(daemon.config.networking.bridge.subnet);
    let denied = Arc::new(networks::Denied::new(deny));
    tokio::spawn(denied.clone().follow(daemon.dial_peer("vmmd")?));
    let egress = Arc::new(egress::Egress {
        resolver: resolve::Resolver::from_config(c.resolver.as_ref())
            .map_err(|e| anyhow::anyhow!("proxyd.{e}"))?,
        tls: tls::client_config(c.extra_ca.as_deref())?,
        denied,
        dial_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(c.idle_timeout_secs.unwrap_or(60)),
        total_timeout: Duration::from_secs(c.total_timeout_secs.unwrap_or(3600)),
    });
    let defaults = routes::Defaults {
        requests_per_second: c.requests_per_second.unwrap_or(50),
        burst: c.burst.unwrap_or(100),
        bytes_per_second: c.bytes_per_second.unwrap_or(12_500_000),
        max_upstreams,
        max_connections,
    };
    let routes = Arc::new(routes::Routes::open(
        &daemon.state_dir,
        defaults,
        egress.clone(),
    )?);
    let ingress_addr = args
        .ingress
        .or(c.ingress.clone())
        .unwrap_or_else(|| Addr::Unix(daemon.run_dir.join("proxyd-ingress.sock")));
    anyhow::ensure!(
        daemon.tls.is_none() || matches!(ingress_addr, Addr::Unix(_)),
        "the ingress is to listen on {ingress_addr}, but the config asks for mutual TLS between \
         the services and the ingress speaks plain HTTP: keep it on a Unix socket (the default)"
    );
    let ingress = Arc::new(ingress::Ingress::new(
        routes.clone(),
        c.max_body_bytes.unwrap_or(1 << 30),
        Duration::from_secs(c.request_timeout_secs.unwrap_or(300)),
        egress.idle_timeout,
    ));
    let listener = daemon::bind(&ingress_addr)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(ingress.serve(
        listener,
        threads.into(),
        Box::pin(async {
            let _ = stop_rx.await;
        }),
    ));
    tracing::info!(ingress = %ingress_addr, "ingress serving");
    let result = daemon
        .serve(Services::default().with(ProxyServer::new(grpc::ProxyService(routes))))
        .await;
    let _ = stop_tx.send(());
    match serving.await {
        Ok(Err(e)) => tracing::error!("ingress: {e:#}"),
        Err(e) => tracing::error!("ingress: {e}"),
        Ok(Ok(())) => {}
    }
    if let Addr::Unix(path) = &ingress_addr {
        let _ = std::fs::remove_file(path);
    }
    result
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("proxyd", || run(args))
}
