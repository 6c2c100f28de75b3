//! `volant.net.v1.Net` over gRPC: translation between the wire and [`Netd`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use volant_services::api::net::v1 as pb;

use crate::control::{Error, ForwardRequest, ForwardTarget, Netd};
use crate::desired::{Forward, Network, Tap};
use crate::kernel;
use crate::naming::format_mac;

/// The gRPC face of netd.
pub struct NetService {
    netd: Arc<Netd>,
}

impl NetService {
    /// Serves `netd`.
    pub fn new(netd: Arc<Netd>) -> NetService {
        NetService { netd }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Invalid(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Conflict(m) => Status::already_exists(m),
            Error::Precondition(m) => Status::failed_precondition(m),
            Error::Failed(m) => Status::internal(m),
        }
    }
}

fn network_pb(n: Network, st: Option<kernel::Status>) -> pb::Network {
    pb::Network {
        name: n.name,
        subnet: n.subnet.to_string(),
        gateway: n.gateway.to_string(),
        nat: n.nat,
        status: st.map(|s| pb::NetworkStatus {
            bridge_present: s.bridge_present,
            bridge_up: s.bridge_up,
            bridge_mac: s.bridge_mac,
            address_present: s.address_present,
            forwarding: s.forwarding,
            nat_rule: s.nat_rule,
            forward_rules: s.forward_rules,
            ports: s
                .ports
                .into_iter()
                .map(|(name, state, mac, vm)| pb::BridgePort {
                    name,
                    state,
                    mac,
                    vm,
                })
                .collect(),
            fdb: s
                .fdb
                .into_iter()
                .map(|(mac, port, permanent)| pb::FdbEntry {
                    mac,
                    port,
                    permanent,
                })
                .collect(),
            rules: s.rules,
        }),
    }
}

fn tap_pb(t: Tap) -> pb::Tap {
    pb::Tap {
        mac: format_mac(&t.mac),
        name: t.name,
        network: t.network,
        vm: t.vm,
        ip: t.ip.map(|ip| ip.to_string()).unwrap_or_default(),
    }
}

fn forward_pb(f: Forward) -> pb::PortForward {
    pb::PortForward {
        host_port: f.host_port.into(),
        protocol: f.protocol.to_string(),
        vm_ip: f.vm_ip.to_string(),
        vm_port: f.vm_port.into(),
        vm: f.vm,
        network: f.network,
    }
}

fn optional(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

#[tonic::async_trait]
impl pb::net_server::Net for NetService {
    async fn ensure_network(
        &self,
        req: Request<pb::EnsureNetworkRequest>,
    ) -> Result<Response<pb::EnsureNetworkResponse>, Status> {
        let r = req.into_inner();
        let n = r
            .network
            .ok_or_else(|| Status::invalid_argument("network is required"))?;
        let net = Network::validate(&n.name, &n.subnet, &n.gateway, n.nat)
            .map_err(Status::invalid_argument)?;
        let (net, created) = self.netd.ensure_network(net, r.update).await?;
        let (net, status) = self.netd.get_network(&net.name).await?;
        Ok(Response::new(pb::EnsureNetworkResponse {
            network: Some(network_pb(net, Some(status))),
            created,
        }))
    }

    async fn inspect_bridge(
        &self,
        req: Request<pb::InspectBridgeRequest>,
    ) -> Result<Response<pb::InspectBridgeResponse>, Status> {
        let (ip, prefix) = self.netd.inspect_bridge(&req.into_inner().name).await?;
        Ok(Response::new(pb::InspectBridgeResponse {
            address: ip.to_string(),
            prefix_len: prefix.into(),
        }))
    }

    async fn get_network(
        &self,
        req: Request<pb::GetNetworkRequest>,
    ) -> Result<Response<pb::GetNetworkResponse>, Status> {
        let (net, status) = self.netd.get_network(&req.into_inner().name).await?;
        Ok(Response::new(pb::GetNetworkResponse {
            network: Some(network_pb(net, Some(status))),
        }))
    }

    async fn list_networks(
        &self,
        _: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let nets = self.netd.list_networks().await?;
        Ok(Response::new(pb::ListNetworksResponse {
            networks: nets
                .into_iter()
                .map(|(n, s)| network_pb(n, Some(s)))
                .collect(),
        }))
    }

    async fn delete_network(
        &self,
        req: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        let req = req.into_inner();
        let deleted = self.netd.delete_network(&req.name, req.force).await?;
        Ok(Response::new(pb::DeleteNetworkResponse { deleted }))
    }

    async fn create_tap(
        &self,
        req: Request<pb::CreateTapRequest>,
    ) -> Result<Response<pb::CreateTapResponse>, Status> {
        let req = req.into_inner();
        let (tap, created) = self
            .netd
            .create_tap(&req.network, &req.vm, &req.ip, req.owner_uid)
            .await?;
        Ok(Response::new(pb::CreateTapResponse {
            mac: format_mac(&tap.mac),
            tap: tap.name,
            created,
        }))
    }

    async fn delete_tap(
        &self,
        req: Request<pb::DeleteTapRequest>,
    ) -> Result<Response<pb::DeleteTapResponse>, Status> {
        let deleted = self.netd.delete_tap(&req.into_inner().vm).await?;
        Ok(Response::new(pb::DeleteTapResponse { deleted }))
    }

    async fn list_taps(
        &self,
        req: Request<pb::ListTapsRequest>,
    ) -> Result<Response<pb::ListTapsResponse>, Status> {
        let req = req.into_inner();
        let taps = self.netd.list_taps(optional(&req.network)).await?;
        Ok(Response::new(pb::ListTapsResponse {
            taps: taps.into_iter().map(tap_pb).collect(),
        }))
    }

    async fn add_port_forward(
        &self,
        req: Request<pb::AddPortForwardRequest>,
    ) -> Result<Response<pb::AddPortForwardResponse>, Status> {
        let f = req
            .into_inner()
            .forward
            .ok_or_else(|| Status::invalid_argument("forward is required"))?;
        let (fwd, created) = self
            .netd
            .add_forward(ForwardRequest {
                host_port: f.host_port,
                protocol: &f.protocol,
                vm_ip: &f.vm_ip,
                vm_port: f.vm_port,
                vm: &f.vm,
            })
            .await?;
        Ok(Response::new(pb::AddPortForwardResponse {
            forward: Some(forward_pb(fwd)),
            created,
        }))
    }

    async fn remove_port_forward(
        &self,
        req: Request<pb::RemovePortForwardRequest>,
    ) -> Result<Response<pb::RemovePortForwardResponse>, Status> {
        use pb::remove_port_forward_request::Target;
        let removed = match req.into_inner().target {
            Some(Target::HostPort(hp)) => {
                self.netd
                    .remove_forwards(ForwardTarget::HostPort(hp.port, &hp.protocol))
                    .await?
            }
            Some(Target::Vm(vm)) => self.netd.remove_forwards(ForwardTarget::Vm(&vm)).await?,
            None => {
                return Err(Status::invalid_argument(
                    "say which forwards: set host_port or vm",
                ));
            }
        };
        Ok(Response::new(pb::RemovePortForwardResponse {
            removed: removed.into_iter().map(forward_pb).collect(),
        }))
    }

    async fn list_port_forwards(
        &self,
        req: Request<pb::ListPortForwardsRequest>,
    ) -> Result<Response<pb::ListPortForwardsResponse>, Status> {
        let req = req.into_inner();
        let forwards = self.netd.list_forwards(optional(&req.vm)).await;
        Ok(Response::new(pb::ListPortForwardsResponse {
            forwards: forwards.into_iter().map(forward_pb).collect(),
        }))
    }

    async fn reconcile(
        &self,
        _: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let actions = self.netd.reconcile().await?;
        Ok(Response::new(pb::ReconcileResponse { actions }))
    }
}
