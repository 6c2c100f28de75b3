//! The gateway on each network's gateway address (`192.168.127.1:8080` on the default network),
//! where Volant's networking guide shows a VM reaching the host: there it serves
//! `GET /api/v1/health` and, like a cloud's metadata service, `GET /api/v1/self` (the calling
//! VM's own record) and nothing else. Every other path is refused, API keys or not, so a VM can
//! see whether the platform is up and who it is, and can drive nothing. The addresses follow
//! vmmd's networks as they come and go.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use tokio::task::JoinHandle;
use volant_services::api::vmm::v1 as vmm;
use volant_services::daemon::Listener;

use crate::doors::{Doors, Peer};
use crate::error::{ApiError, By};
use crate::model::Vm;
use crate::peers::{Peers, READ, req};
use crate::serve::{self, Limits};
use crate::system;

/// How often the networks are read.
const EVERY: Duration = Duration::from_secs(2);
/// Requests per second (and burst) one VM may make there.
const RATE: (u32, u32) = (20, 40);

/// The network whose gateway address a request came to.
#[derive(Clone)]
struct OnNetwork(String);

/// What a VM reaches on the gateway address of network `network`.
pub fn router(peers: Peers, network: String) -> Router {
    let doors = Doors::new(&[], RATE.0, RATE.1).expect("no keys, a positive rate");
    Router::new()
        .route("/api/v1/health", axum::routing::get(system::health))
        .route("/api/v1/self", axum::routing::get(whoami))
        .layer(axum::Extension(OnNetwork(network)))
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
        "on a network's gateway address the gateway serves GET /api/v1/health and \
         GET /api/v1/self only; the API is on the host's own listen address",
    )
}

fn not_a_vm() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "this connection comes from no VM of this network",
    )
}

/// `GET /api/v1/self`: the calling VM's own record. The caller is the bridge VM of this network
/// whose leased address the connection comes from, and whose MAC the bridge learned on that VM's
/// TAP and resolves that address to: nothing the guest says plays a part, and netd's guard lets
/// a TAP send from its own MAC and address only.
async fn whoami(
    State(p): State<Peers>,
    axum::Extension(OnNetwork(network)): axum::Extension<OnNetwork>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
) -> Result<axum::Json<Vm>, ApiError> {
    let ip = peer.ok_or_else(not_a_vm)?;
    let vms = p
        .vmm
        .clone()
        .list_vms(req(vmm::ListVmsRequest {}, READ))
        .await
        .by("vmmd")?
        .into_inner()
        .vms;
    let vm = vms
        .into_iter()
        .find(|v| {
            v.network_mode == "bridge"
                && v.network == network
                && v.ip_address.parse::<IpAddr>() == Ok(ip)
        })
        .ok_or_else(not_a_vm)?;
    if !on_its_tap(&network, ip, &vm.mac_address, &vm.tap_device).await {
        return Err(not_a_vm());
    }
    Ok(axum::Json(Vm::from(vm)))
}

/// Whether bridge `bridge` resolves `ip` to `mac` and learned `mac` on port `tap`.
async fn on_its_tap(bridge: &str, ip: IpAddr, mac: &str, tap: &str) -> bool {
    if mac.is_empty() || tap.is_empty() {
        return false;
    }
    let json = |args: Vec<String>| async move {
        let out = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::process::Command::new(&args[0])
                .args(&args[1..])
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match out {
            Ok(Ok(o)) if o.status.success() => {
                serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    };
    let same = |v: &serde_json::Value| v.as_str().is_some_and(|m| m.eq_ignore_ascii_case(mac));
    let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    let neighbours = json(args(&format!("ip -j neigh show to {ip} dev {bridge}"))).await;
    let resolved = neighbours.iter().any(|n| same(&n["lladdr"]));
    let fdb = json(args(&format!("bridge -j fdb show br {bridge}"))).await;
    let learned = fdb
        .iter()
        .any(|e| same(&e["mac"]) && e["ifname"].as_str() == Some(tap));
    resolved && learned
}

/// Serves [`router`] on port `port` of every network's gateway address, for as long as the
/// gateway runs. An address already served otherwise (the main listener on `0.0.0.0`) is left
/// to that.
pub async fn follow(peers: Peers, port: u16, limits: Limits) {
    let mut served: HashMap<IpAddr, JoinHandle<()>> = HashMap::new();
    let mut said = std::collections::HashSet::new();
    loop {
        let listed = peers
            .vmm
            .clone()
            .list_networks(req(vmm::ListNetworksRequest::default(), READ))
            .await;
        if let Ok(listed) = listed {
            let gateways: Vec<(IpAddr, String)> = listed
                .into_inner()
                .networks
                .into_iter()
                .filter_map(|n| {
                    let bridge = n.bridge?;
                    Some((bridge.gateway.parse().ok()?, bridge.name))
                })
                .collect();
            served.retain(|ip, task| {
                let keep = gateways.iter().any(|(g, _)| g == ip) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for (ip, network) in gateways {
                if served.contains_key(&ip) {
                    continue;
                }
                match tokio::net::TcpListener::bind((ip, port)).await {
                    Ok(l) => {
                        tracing::info!(%ip, port, "serving health and self to the VMs");
                        let app = router(peers.clone(), network);
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
