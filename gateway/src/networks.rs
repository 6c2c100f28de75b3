//! `/api/v1/networks` and `/api/v1/ipam/leases`: a network is netd's bridge and ipamd's pool of
//! the same name, made and removed together.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use tonic::Code;
use utoipa::IntoParams;
use volant_services::api::{ipam::v1 as ipam, net::v1 as net};

use crate::error::{ApiError, Body, By, ErrorBody, Path, Query};
use crate::model::{CreateNetwork, Lease, List, Network, UpdateNetwork};
use crate::peers::{Peers, READ, WRITE, req};
use crate::vms::Force;

/// `?network=`.
#[derive(Deserialize, IntoParams)]
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
        .net
        .clone()
        .list_networks(req(net::ListNetworksRequest {}, READ))
        .await
        .by("netd")?
        .into_inner()
        .networks;
    let mut pools = p
        .ipam
        .clone()
        .list_pools(req(ipam::ListPoolsRequest {}, READ))
        .await
        .by("ipamd")?
        .into_inner()
        .pools;
    let mut out = Vec::new();
    for n in nets {
        let pool = pools
            .iter()
            .position(|p| p.name == n.name)
            .map(|i| pools.remove(i));
        out.extend(Network::join(Some(n), pool));
    }
    out.extend(
        pools
            .into_iter()
            .filter_map(|p| Network::join(None, Some(p))),
    );
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(List(out))
}

async fn one(p: &Peers, name: &str) -> Result<Network, ApiError> {
    let n = match p
        .net
        .clone()
        .get_network(req(net::GetNetworkRequest { name: name.into() }, READ))
        .await
    {
        Ok(r) => r.into_inner().network,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(s).by("netd"),
    };
    let pool = match p
        .ipam
        .clone()
        .get_pool(req(ipam::GetPoolRequest { name: name.into() }, READ))
        .await
    {
        Ok(r) => r.into_inner().pool,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => return Err(s).by("ipamd"),
    };
    Network::join(n, pool)
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

/// Creates a network: its address pool, then its bridge, forwarding and rules. Creating an
/// identical network again answers 200; one that exists otherwise answers 409 (change `nat`
/// with `PATCH`; subnets never change).
#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = Network), (status = 200, body = Network), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(p): State<Peers>,
    Body(b): Body<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let (start, end) = b.ip_range.map(|r| (r.start, r.end)).unwrap_or_default();
    let pool = ipam::Pool {
        name: b.name.clone(),
        subnet: b.subnet.clone(),
        gateway: b.gateway.unwrap_or_default(),
        range_start: start,
        range_end: end,
        ..Default::default()
    };
    let made = p
        .ipam
        .clone()
        .create_pool(req(ipam::CreatePoolRequest { pool: Some(pool) }, WRITE))
        .await
        .by("ipamd")?
        .into_inner();
    let gateway = made.pool.map(|p| p.gateway).unwrap_or_default();
    let network = net::Network {
        name: b.name.clone(),
        subnet: b.subnet,
        gateway,
        nat: b.nat.unwrap_or(true),
        status: None,
    };
    let ensured = p
        .net
        .clone()
        .ensure_network(req(
            net::EnsureNetworkRequest {
                network: Some(network),
                update: false,
            },
            WRITE,
        ))
        .await;
    let ensured = match ensured {
        Ok(r) => r.into_inner(),
        Err(e) => {
            if made.created {
                // The bridge failed: take back the pool made for it.
                let undo = ipam::DeletePoolRequest {
                    name: b.name.clone(),
                    force: true,
                };
                let _ = p.ipam.clone().delete_pool(req(undo, WRITE)).await;
            }
            return Err(e).by("netd");
        }
    };
    let status = if made.created || ensured.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(one(&p, &b.name).await?)))
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
    let mut network = p
        .net
        .clone()
        .get_network(req(net::GetNetworkRequest { name: name.clone() }, READ))
        .await
        .by("netd")?
        .into_inner()
        .network
        .ok_or_else(|| ApiError::not_found(format!("network {name:?} does not exist")))?;
    network.nat = b.nat;
    network.status = None;
    p.net
        .clone()
        .ensure_network(req(
            net::EnsureNetworkRequest {
                network: Some(network),
                update: true,
            },
            WRITE,
        ))
        .await
        .by("netd")?;
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
    p.net
        .clone()
        .delete_network(req(
            net::DeleteNetworkRequest {
                name: name.clone(),
                force: q.force,
            },
            WRITE,
        ))
        .await
        .by("netd")?;
    p.ipam
        .clone()
        .delete_pool(req(
            ipam::DeletePoolRequest {
                name,
                force: q.force,
            },
            WRITE,
        ))
        .await
        .by("ipamd")?;
    Ok(StatusCode::NO_CONTENT)
}

/// The lease table, by network then address.
#[utoipa::path(get, path = "/api/v1/ipam/leases", tag = "networks", params(ByNetwork),
    responses((status = 503, body = ErrorBody), (status = 200, body = Vec<Lease>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn leases(
    State(p): State<Peers>,
    Query(q): Query<ByNetwork>,
) -> Result<List<Lease>, ApiError> {
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
