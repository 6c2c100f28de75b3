//! ipamd, netd and proxyd, as vmmd calls them: every call with a deadline, every error naming the peer.

use std::net::IpAddr;
use std::time::Duration;

use tonic::{Request, Status};
use volant_services::Channel;
use volant_services::api::ipam::v1 as ipam;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::net::v1 as net;
use volant_services::api::net::v1::net_client::NetClient;
use volant_services::api::proxy::v1 as proxy;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;

/// The deadline of one call to a peer.
const CALL: Duration = Duration::from_secs(10);

fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(CALL);
    r
}

/// A request about VM `vm`: its spans carry the VM's name.
fn req_vm<T>(msg: T, vm: &str) -> Request<T> {
    let mut r = req(msg);
    volant_services::telemetry::about_vm(&mut r, vm);
    r
}

fn named(peer: &'static str) -> impl Fn(Status) -> Status {
    move |s| Status::new(s.code(), format!("{peer}: {}", s.message()))
}

/// A lease as vmmd keeps it.
pub struct Lease {
    /// The address.
    pub ip: IpAddr,
    /// Its network's prefix length.
    pub prefix_len: u8,
    /// Its network's gateway.
    pub gateway: IpAddr,
}

/// The peers of vmmd.
#[derive(Clone)]
pub struct Peers {
    ipam: IpamClient<Channel>,
    net: NetClient<Channel>,
    proxy: ProxyClient<Channel>,
}

impl Peers {
    /// Clients over the given channels.
    pub fn new(ipam: Channel, net: Channel, proxy: Channel) -> Peers {
        Peers {
            ipam: IpamClient::new(ipam),
            net: NetClient::new(net),
            proxy: ProxyClient::new(proxy),
        }
    }

    /// Registers a vsock VM's route and egress policy with proxyd (idempotent).
    pub async fn register_route(&self, route: proxy::Route) -> Result<(), Status> {
        self.proxy
            .clone()
            .register_vm(req_vm(
                proxy::RegisterVmRequest {
                    route: Some(route.clone()),
                },
                &route.vm,
            ))
            .await
            .map(drop)
            .map_err(named("proxyd"))
    }

    /// Removes a VM's route from proxyd (idempotent).
    pub async fn unregister_route(&self, vm: &str) -> Result<(), Status> {
        self.proxy
            .clone()
            .unregister_vm(req_vm(proxy::UnregisterVmRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("proxyd"))
    }

    /// The VMs proxyd has routes for.
    pub async fn routes(&self) -> Result<Vec<String>, Status> {
        Ok(self
            .proxy
            .clone()
            .list_routes(req(proxy::ListRoutesRequest {}))
            .await
            .map_err(named("proxyd"))?
            .into_inner()
            .routes
            .into_iter()
            .map(|r| r.vm)
            .collect())
    }

    /// Leases an address of `network` to `vm` (its existing one when it has one).
    pub async fn allocate(
        &self,
        network: &str,
        vm: &str,
        requested: Option<IpAddr>,
    ) -> Result<Lease, Status> {
        let reply = self
            .ipam
            .clone()
            .allocate(req_vm(
                ipam::AllocateRequest {
                    pool: network.into(),
                    vm: vm.into(),
                    requested_ip: requested.map(|ip| ip.to_string()),
                },
                vm,
            ))
            .await
            .map_err(named("ipamd"))?
            .into_inner();
        let lease = reply
            .lease
            .ok_or_else(|| Status::internal("ipamd answered without a lease"))?;
        let bad = |what: &str| Status::internal(format!("ipamd answered a bad {what}"));
        Ok(Lease {
            ip: lease.ip.parse().map_err(|_| bad("address"))?,
            prefix_len: u8::try_from(lease.prefix_len).map_err(|_| bad("prefix"))?,
            gateway: lease.gateway.parse().map_err(|_| bad("gateway"))?,
        })
    }

    /// Releases every lease of `vm`.
    pub async fn release_vm(&self, vm: &str) -> Result<(), Status> {
        self.ipam
            .clone()
            .release_vm(req_vm(ipam::ReleaseVmRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("ipamd"))
    }

    /// Releases one lease.
    pub async fn release(&self, pool: &str, ip: &str) -> Result<(), Status> {
        self.ipam
            .clone()
            .release(req(ipam::ReleaseRequest {
                pool: pool.into(),
                target: Some(ipam::release_request::Target::Ip(ip.into())),
            }))
            .await
            .map(drop)
            .map_err(named("ipamd"))
    }

    /// Every lease: pool, address, VM.
    pub async fn leases(&self) -> Result<Vec<(String, String, String)>, Status> {
        Ok(self
            .ipam
            .clone()
            .list_leases(req(ipam::ListLeasesRequest::default()))
            .await
            .map_err(named("ipamd"))?
            .into_inner()
            .leases
            .into_iter()
            .map(|l| (l.pool, l.ip, l.vm))
            .collect())
    }

    /// Creates (or confirms) `vm`'s TAP on `network` for its leased address `ip`, for the
    /// hypervisor running as `owner` (0: vmmd's own user) to attach to: its name and the
    /// guest's MAC.
    pub async fn create_tap(
        &self,
        network: &str,
        vm: &str,
        ip: IpAddr,
        owner: u32,
    ) -> Result<(String, String), Status> {
        let reply = self
            .net
            .clone()
            .create_tap(req_vm(
                net::CreateTapRequest {
                    network: network.into(),
                    vm: vm.into(),
                    ip: ip.to_string(),
                    owner_uid: owner,
                },
                vm,
            ))
            .await
            .map_err(named("netd"))?
            .into_inner();
        Ok((reply.tap, reply.mac))
    }

    /// Deletes `vm`'s TAP.
    pub async fn delete_tap(&self, vm: &str) -> Result<(), Status> {
        self.net
            .clone()
            .delete_tap(req_vm(net::DeleteTapRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("netd"))
    }

    /// Every TAP: name and VM.
    pub async fn taps(&self) -> Result<Vec<(String, String)>, Status> {
        Ok(self
            .net
            .clone()
            .list_taps(req(net::ListTapsRequest::default()))
            .await
            .map_err(named("netd"))?
            .into_inner()
            .taps
            .into_iter()
            .map(|t| (t.name, t.vm))
            .collect())
    }

    /// Removes every port forward of `vm`.
    pub async fn remove_forwards(&self, vm: &str) -> Result<(), Status> {
        self.net
            .clone()
            .remove_port_forward(req_vm(
                net::RemovePortForwardRequest {
                    target: Some(net::remove_port_forward_request::Target::Vm(vm.into())),
                },
                vm,
            ))
            .await
            .map(drop)
            .map_err(named("netd"))
    }

    /// Asks netd to converge the kernel to its desired state.
    pub async fn reconcile_net(&self) -> Result<Vec<String>, Status> {
        Ok(self
            .net
            .clone()
            .reconcile(req(net::ReconcileRequest {}))
            .await
            .map_err(named("netd"))?
            .into_inner()
            .actions)
    }
}
