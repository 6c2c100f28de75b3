//! The gateway on each network's gateway address (`192.168.127.1:8080` on the default network),
//! where Volant's networking guide shows a VM reaching the host: there it serves
//! `GET /api/v1/health` and nothing else. Every other path is refused, API keys or not, so a VM
//! can see whether the platform is up and can drive nothing. The addresses follow vmmd's
//! networks as they come and go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use tokio::task::JoinHandle;
use volant_services::api::vmm::v1 as vmm;
use volant_services::daemon::Listener;

use crate::doors::Doors;
use crate::error::ApiError;
use crate::peers::{Peers, READ, req};
use crate::serve::{self, Limits};
use crate::system;

/// How often the networks are read.
const EVERY: Duration = Duration::from_secs(2);
/// Requests per second (and burst) one VM may make there.
const RATE: (u32, u32) = (20, 40);

/// What a VM reaches on its network's gateway address.
pub fn router(peers: Peers) -> Router {
    let doors = Doors::new(&[], RATE.0, RATE.1).expect("no keys, a positive rate");
    Router::new()
        .route("/api/v1/health", axum::routing::get(system::health))
        .fallback(refuse)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(doors),
            crate::doors::guard,
        ))
        .with_state(peers)
}

async fn refuse() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "on a network's gateway address the gateway serves GET /api/v1/health only; the API \
         is on the host's own listen address",
    )
}

/// Serves [`router`] on port `port` of every network's gateway address, for as long as the
/// gateway runs. An address already served otherwise (the main listener on `0.0.0.0`) is left
/// to that.
pub async fn follow(peers: Peers, port: u16, limits: Limits) {
    let app = router(peers.clone());
    let mut served: HashMap<IpAddr, JoinHandle<()>> = HashMap::new();
    let mut said = std::collections::HashSet::new();
    loop {
        let listed = peers
            .vmm
            .clone()
            .list_networks(req(vmm::ListNetworksRequest::default(), READ))
            .await;
        if let Ok(listed) = listed {
            let gateways: Vec<IpAddr> = listed
                .into_inner()
                .networks
                .into_iter()
                .filter_map(|n| n.bridge?.gateway.parse().ok())
                .collect();
            served.retain(|ip, task| {
                let keep = gateways.contains(ip) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for ip in gateways {
                if served.contains_key(&ip) {
                    continue;
                }
                match tokio::net::TcpListener::bind((ip, port)).await {
                    Ok(l) => {
                        tracing::info!(%ip, port, "serving health to the VMs");
                        let app = app.clone();
                        let stop = Box::pin(std::future::pending());
                        served.insert(
                            ip,
                            tokio::spawn(async move {
                                let _ =
                                    serve::serve(Listener::Tcp(l), app, None, limits, stop).await;
                            }),
                        );
                    }
                    Err(e) => {
                        if said.insert(ip) {
                            tracing::info!(%ip, port, "not serving health to the VMs here: {e}");
                        }
                    }
                }
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}
