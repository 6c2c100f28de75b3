//! `/api/v1/networks` and `/api/v1/ipam/leases`: a network is netd's bridge and ipamd's pool of
//! the same name, made and removed together by vmmd, their owner.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use volant_services::api::{ipam::v1 as ipam, net::v1 as net, vmm::v1 as vmm};

use crate::error::{ApiError, Body, By, ErrorBody, Path, Query};
use crate::model::{CreateNetwork, Lease, List, Network, UpdateNetwork};
use crate::peers::{Peers, READ, WRITE, req};
use crate::vms::Force;

/// `?network=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ByNetwork {
    /// Only this network's leases.
    pub network: Option<String>,
}

/// The networks.
#[utoipa::path(get, path = "/api/v1/networks", tag = "networks",
    responses((status = 200, body = Vec<Network>), (status = 503, body = ErrorBody)))]
pub async fn list(State(p): State<Peers>) -> Result<List<Network>, ApiError> {
    let nets = p
        .vmm
        .clone()
        .list_networks(req(vmm::ListNetworksRequest::default(), READ))
        .await
        .by("vmmd")?
        .into_inner()
        .networks;
    Ok(List(
        nets.into_iter()
            .filter_map(|n| Network::join(n.bridge, n.pool))
            .collect(),
    ))
}

async fn one(p: &Peers, name: &str) -> Result<Network, ApiError> {
    let n = p
        .vmm
        .clone()
        .list_networks(req(vmm::ListNetworksRequest { name: name.into() }, READ))
        .await
        .by("vmmd")?
        .into_inner()
        .networks
        .pop()
        .unwrap_or_default();
    Network::join(n.bridge, n.pool)
        .ok_or_else(|| ApiError::not_found(format!("network {name:?} does not exist")))
}

/// One network, with what the kernel has of it.
#[utoipa::path(get, path = "/api/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name")),
    responses((status = 503, body = ErrorBody), (status = 200, body = Network), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(p): State<Peers>,
    Path(name): Path<String>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(one(&p, &name).await?))
}

/// Creates a network: its address pool, then its bridge, forwarding and rules (vmmd makes both,
/// and takes the pool back when the bridge fails). Creating an identical network again answers
/// 200; one that exists otherwise answers 409 (change `nat` with `PATCH`; subnets never change).
#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = Network), (status = 200, body = Network), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(p): State<Peers>,
    Body(b): Body<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let (range_start, range_end) = b.ip_range.map(|r| (r.start, r.end)).unwrap_or_default();
    let bridge = net::Network {
        name: b.name,
        subnet: b.subnet,
        gateway: b.gateway.unwrap_or_default(),
        nat: b.nat.unwrap_or(true),
        status: None,
    };
    let made = p
        .vmm
        .clone()
        .create_network(req(
            vmm::CreateNetworkRequest {
                bridge: Some(bridge),
                range_start,
                range_end,
            },
            WRITE,
        ))
        .await
        .by("vmmd")?
        .into_inner();
    let status = if made.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let n = made.network.unwrap_or_default();
    let n = Network::join(n.bridge, n.pool).ok_or_else(|| {
        ApiError::from(tonic::Status::internal("vmmd answered without a network"))
    })?;
    Ok((status, Json(n)))
}

/// Changes `nat` of a network. The network the config file defines answers 412: it changes
/// there.
#[utoipa::path(patch, path = "/api/v1/networks/{name}", tag = "networks", request_body = UpdateNetwork,
    params(("name" = String, Path, description = "network name")),
    responses((status = 200, body = Network), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 412, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn update(
    State(p): State<Peers>,
    Path(name): Path<String>,
    Body(b): Body<UpdateNetwork>,
) -> Result<Json<Network>, ApiError> {
    p.vmm
        .clone()
        .update_network(req(
            vmm::UpdateNetworkRequest {
                name: name.clone(),
                nat: b.nat,
            },
            WRITE,
        ))
        .await
        .by("vmmd")?;
    Ok(Json(one(&p, &name).await?))
}

/// Deletes a network: its bridge and rules, then its pool. A network with VMs answers 412
/// unless forced; deleting what is not there succeeds too.
#[utoipa::path(delete, path = "/api/v1/networks/{name}", tag = "networks",
    params(("name" = String, Path, description = "network name"), Force),
    responses((status = 503, body = ErrorBody), (status = 204), (status = 400, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn delete(
    State(p): State<Peers>,
    Path(name): Path<String>,
    Query(q): Query<Force>,
) -> Result<StatusCode, ApiError> {
    p.vmm
        .clone()
        .delete_network(req(
            vmm::DeleteNetworkRequest {
                name,
                force: q.force,
            },
            WRITE,
        ))
        .await
        .by("vmmd")?;
    Ok(StatusCode::NO_CONTENT)
}

/// The lease table, by network then address.
#[utoipa::path(get, path = "/api/v1/ipam/leases", tag = "networks", params(ByNetwork),
    responses((status = 503, body = ErrorBody), (status = 200, body = Vec<Lease>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn leases(
    State(p): State<Peers>,
    Query(q): Query<ByNetwork>,
) -> Result<List<Lease>, ApiError> {
    if q.network.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "network= names no network; leave it out for every network's leases",
        ));
    }
    let r = ipam::ListLeasesRequest {
        pool: q.network.unwrap_or_default(),
        vm: String::new(),
    };
    let leases = p
        .ipam
        .clone()
        .list_leases(req(r, READ))
        .await
        .by("ipamd")?
        .into_inner()
        .leases;
    Ok(List(leases.into_iter().map(Lease::from).collect()))
}
