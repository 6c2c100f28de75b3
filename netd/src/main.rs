//! netd: the owner of everything Volant changes in the host's network.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use netd::{desired, grpc, kernel, metrics};
use volant_services::api::net::v1::net_server::NetServer;
use volant_services::daemon::{self, Daemon, DaemonArgs, Services};

/// Volant's network owner: bridges, forwarding, NAT, TAP devices and port forwards. Needs
/// CAP_NET_ADMIN; everything it does happens in the network namespace it runs in.
#[derive(Parser)]
#[command(name = "netd", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("netd", args.daemon)?;
    let store = desired::Store::open(&daemon.state_dir).map_err(anyhow::Error::msg)?;
    let kernel = kernel::Kernel::connect().map_err(anyhow::Error::msg)?;
    let mut netd = netd::control::Netd::open(store, kernel)?;
    netd.start(&daemon.config.networking.bridge).await?;
    let netd = Arc::new(netd);
    metrics::watch_taps(netd.clone());
    let service = NetServer::new(grpc::NetService::new(netd));
    daemon.serve(Services::default().with(service)).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("netd", || run(args))
}
