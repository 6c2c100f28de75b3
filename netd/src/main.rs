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
    /// On SIGTERM, take out of the kernel everything netd made and keep only its records
    /// [default: the config's netd.withdraw_on_exit, false]
    #[arg(long)]
    withdraw_on_exit: bool,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("netd", args.daemon)?;
    let withdraw = args.withdraw_on_exit || daemon.config.netd.withdraw_on_exit;
    let store = desired::Store::open(&daemon.state_dir).map_err(anyhow::Error::msg)?;
    let kernel = kernel::Kernel::connect().map_err(anyhow::Error::msg)?;
    let mut netd = netd::control::Netd::open(store, kernel)?;
    netd.start(&daemon.config.networking.bridge).await?;
    let netd = Arc::new(netd);
    metrics::watch_taps(netd.clone());
    let service = NetServer::new(grpc::NetService::new(netd.clone()));
    daemon.serve(Services::default().with(service)).await?;
    if withdraw {
        netd.withdraw().await?;
        tracing::info!("withdrew every network from the kernel; the records stay");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("netd", || run(args))
}
