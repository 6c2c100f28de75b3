//! ipamd: the owner of Volant's address pools and leases.

mod allocator;
mod grpc;
mod metrics;
mod pool;
mod sled_store;
mod store;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use volant_services::api::ipam::v1::ipam_server::IpamServer;
use volant_services::daemon::{self, Daemon, DaemonArgs, Services};

/// Volant's address manager: pools and leases, durable in sled.
#[derive(Parser)]
#[command(name = "ipamd", version)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

async fn run(args: Args) -> anyhow::Result<()> {
    let daemon = Daemon::start("ipamd", args.daemon)?;
    let store = sled_store::SledStore::open(&daemon.state_dir)?;
    let allocator = Arc::new(allocator::Allocator::open(Arc::new(store))?);
    allocator
        .ensure_config_pool(&daemon.config.networking.bridge)
        .await?;
    metrics::watch(allocator.clone());
    let service = IpamServer::new(grpc::IpamService::new(allocator));
    daemon.serve(Services::default().with(service)).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    daemon::main("ipamd", || run(args))
}
