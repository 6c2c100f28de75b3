//! ipamd, netd and proxyd, as vmmd calls them: a trait, so that the create and delete steps can
//! be tried against fakes, and its gRPC implementation, every call with a deadline and every
//! error named after its peer.

use std::net::IpAddr;
use std::time::Duration;

use tonic::{Request, Status};
use volant_services::Channel;
pub use volant_services::api::ipam::v1 as ipam;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
pub use volant_services::api::net::v1 as net;
use volant_services::api::net::v1::net_client::NetClient;
use volant_services::api::proxy::v1 as proxy;
use volant_services::api::proxy::v1::proxy_client::ProxyClient;

use crate::error::{Error, Result};

/// A lease as vmmd keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The address.
    pub ip: IpAddr,
    /// Its network's prefix length.
    pub prefix_len: u8,
    /// Its network's gateway.
    pub gateway: IpAddr,
}

/// A port forward as netd holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// The VM it was made for.
    pub vm: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The host's port.
    pub host_port: u16,
    /// The VM's address.
    pub vm_ip: IpAddr,
    /// The VM's port.
    pub vm_port: u16,
}

/// What vmmd asks of its peers. Every call is idempotent.
#[tonic::async_trait]
pub trait Peers: Send + Sync {
    /// Registers a vsock VM's route and egress policy with proxyd.
    async fn register_route(&self, route: proxy::Route) -> Result<()>;
    /// Removes a VM's route from proxyd.
    async fn unregister_route(&self, vm: &str) -> Result<()>;
    /// The VMs proxyd has routes for.
    async fn routes(&self) -> Result<Vec<String>>;
    /// Leases an address of `network` to `vm` (its existing one when it has one).
    async fn allocate(&self, network: &str, vm: &str, requested: Option<IpAddr>) -> Result<Lease>;
    /// Releases every lease of `vm`.
    async fn release_vm(&self, vm: &str) -> Result<()>;
    /// Releases one lease.
    async fn release(&self, pool: &str, ip: &str) -> Result<()>;
    /// Every lease: pool, address, VM.
    async fn leases(&self) -> Result<Vec<(String, String, String)>>;
    /// Creates (or confirms) `vm`'s TAP on `network` for its leased address `ip`, for the
    /// hypervisor running as `owner` (0: vmmd's own user) to attach to: its name and the
    /// guest's MAC.
    async fn create_tap(
        &self,
        network: &str,
        vm: &str,
        ip: IpAddr,
        owner: u32,
    ) -> Result<(String, String)>;
    /// Deletes `vm`'s TAP.
    async fn delete_tap(&self, vm: &str) -> Result<()>;
    /// Every TAP: name and VM.
    async fn taps(&self) -> Result<Vec<(String, String)>>;
    /// Adds a port forward (an identical one is success).
    async fn add_forward(&self, f: &Forward) -> Result<()>;
    /// Removes `vm`'s port forward from `protocol`/`host_port`.
    async fn remove_forward(&self, vm: &str, protocol: &str, host_port: u16) -> Result<()>;
    /// Removes every port forward of `vm`.
    async fn remove_forwards(&self, vm: &str) -> Result<()>;
    /// Every port forward.
    async fn forwards(&self) -> Result<Vec<Forward>>;
    /// Asks netd to converge the kernel to its desired state.
    async fn reconcile_net(&self) -> Result<Vec<String>>;
    /// Creates (or confirms) an address pool: it as made, and whether it is new.
    async fn create_pool(&self, pool: ipam::Pool) -> Result<(ipam::Pool, bool)>;
    /// Deletes a pool; with `force` also while it has leases.
    async fn delete_pool(&self, name: &str, force: bool) -> Result<()>;
    /// Every pool.
    async fn pools(&self) -> Result<Vec<ipam::Pool>>;
    /// Creates (or confirms; with `update`, changes) a bridge network: it, and whether it is new.
    async fn ensure_network(&self, n: net::Network, update: bool) -> Result<(net::Network, bool)>;
    /// Deletes a bridge network; with `force` also while it has TAPs.
    async fn delete_network(&self, name: &str, force: bool) -> Result<()>;
    /// Every bridge network, with its status.
    async fn networks(&self) -> Result<Vec<net::Network>>;
    /// The IPv4 address and prefix of a bridge of the host that netd does not manage.
    async fn inspect_bridge(&self, name: &str) -> Result<(IpAddr, u8)>;
}

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

fn named(peer: &'static str) -> impl Fn(Status) -> Error {
    move |s| Error::from_peer(peer, &s)
}

fn bad(peer: &str, what: &str) -> Error {
    Error::internal(format!("{peer} answered a bad {what}"))
}

/// The peers over gRPC.
#[derive(Clone)]
pub struct Grpc {
    ipam: IpamClient<Channel>,
    net: NetClient<Channel>,
    proxy: ProxyClient<Channel>,
}

impl Grpc {
    /// Clients over the given channels.
    pub fn new(ipam: Channel, net: Channel, proxy: Channel) -> Grpc {
        Grpc {
            ipam: IpamClient::new(ipam),
            net: NetClient::new(net),
            proxy: ProxyClient::new(proxy),
        }
    }

    async fn remove(
        &self,
        target: net::remove_port_forward_request::Target,
        vm: &str,
    ) -> Result<()> {
        self.net
            .clone()
            .remove_port_forward(req_vm(
                net::RemovePortForwardRequest {
                    target: Some(target),
                },
                vm,
            ))
            .await
            .map(drop)
            .map_err(named("netd"))
    }
}

#[tonic::async_trait]
impl Peers for Grpc {
    async fn register_route(&self, route: proxy::Route) -> Result<()> {
        let vm = route.vm.clone();
        self.proxy
            .clone()
            .register_vm(req_vm(proxy::RegisterVmRequest { route: Some(route) }, &vm))
            .await
            .map(drop)
            .map_err(named("proxyd"))
    }

    async fn unregister_route(&self, vm: &str) -> Result<()> {
        self.proxy
            .clone()
            .unregister_vm(req_vm(proxy::UnregisterVmRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("proxyd"))
    }

    async fn routes(&self) -> Result<Vec<String>> {
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

    async fn allocate(&self, network: &str, vm: &str, requested: Option<IpAddr>) -> Result<Lease> {
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
            .ok_or_else(|| Error::internal("ipamd answered without a lease"))?;
        Ok(Lease {
            ip: lease.ip.parse().map_err(|_| bad("ipamd", "address"))?,
            prefix_len: u8::try_from(lease.prefix_len).map_err(|_| bad("ipamd", "prefix"))?,
            gateway: lease.gateway.parse().map_err(|_| bad("ipamd", "gateway"))?,
        })
    }

    async fn release_vm(&self, vm: &str) -> Result<()> {
        self.ipam
            .clone()
            .release_vm(req_vm(ipam::ReleaseVmRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("ipamd"))
    }

    async fn release(&self, pool: &str, ip: &str) -> Result<()> {
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

    async fn leases(&self) -> Result<Vec<(String, String, String)>> {
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

    async fn create_tap(
        &self,
        network: &str,
        vm: &str,
        ip: IpAddr,
        owner: u32,
    ) -> Result<(String, String)> {
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

    async fn delete_tap(&self, vm: &str) -> Result<()> {
        self.net
            .clone()
            .delete_tap(req_vm(net::DeleteTapRequest { vm: vm.into() }, vm))
            .await
            .map(drop)
            .map_err(named("netd"))
    }

    async fn taps(&self) -> Result<Vec<(String, String)>> {
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

    async fn add_forward(&self, f: &Forward) -> Result<()> {
        let forward = net::PortForward {
            host_port: f.host_port.into(),
            protocol: f.protocol.clone(),
            vm_ip: f.vm_ip.to_string(),
            vm_port: f.vm_port.into(),
            vm: f.vm.clone(),
            network: String::new(),
        };
        self.net
            .clone()
            .add_port_forward(req_vm(
                net::AddPortForwardRequest {
                    forward: Some(forward),
                },
                &f.vm,
            ))
            .await
            .map(drop)
            .map_err(named("netd"))
    }

    async fn remove_forward(&self, vm: &str, protocol: &str, host_port: u16) -> Result<()> {
        let target = net::remove_port_forward_request::Target::HostPort(net::HostPort {
            port: host_port.into(),
            protocol: protocol.into(),
        });
        self.remove(target, vm).await
    }

    async fn remove_forwards(&self, vm: &str) -> Result<()> {
        let target = net::remove_port_forward_request::Target::Vm(vm.into());
        self.remove(target, vm).await
    }

    async fn forwards(&self) -> Result<Vec<Forward>> {
        self.net
            .clone()
            .list_port_forwards(req(net::ListPortForwardsRequest::default()))
            .await
            .map_err(named("netd"))?
            .into_inner()
            .forwards
            .into_iter()
            .map(|f| {
                Ok(Forward {
                    host_port: u16::try_from(f.host_port).map_err(|_| bad("netd", "port"))?,
                    vm_port: u16::try_from(f.vm_port).map_err(|_| bad("netd", "port"))?,
                    vm_ip: f.vm_ip.parse().map_err(|_| bad("netd", "address"))?,
                    protocol: f.protocol,
                    vm: f.vm,
                })
            })
            .collect()
    }

    async fn create_pool(&self, pool: ipam::Pool) -> Result<(ipam::Pool, bool)> {
        let r = self
            .ipam
            .clone()
            .create_pool(req(ipam::CreatePoolRequest { pool: Some(pool) }))
            .await
            .map_err(named("ipamd"))?
            .into_inner();
        let pool = r
            .pool
            .ok_or_else(|| Error::internal("ipamd answered without a pool"))?;
        Ok((pool, r.created))
    }

    async fn delete_pool(&self, name: &str, force: bool) -> Result<()> {
        let r = ipam::DeletePoolRequest {
            name: name.into(),
            force,
        };
        self.ipam
            .clone()
            .delete_pool(req(r))
            .await
            .map(drop)
            .map_err(named("ipamd"))
    }

    async fn pools(&self) -> Result<Vec<ipam::Pool>> {
        Ok(self
            .ipam
            .clone()
            .list_pools(req(ipam::ListPoolsRequest {}))
            .await
            .map_err(named("ipamd"))?
            .into_inner()
            .pools)
    }

    async fn ensure_network(&self, n: net::Network, update: bool) -> Result<(net::Network, bool)> {
        let r = net::EnsureNetworkRequest {
            network: Some(n),
            update,
        };
        let r = self
            .net
            .clone()
            .ensure_network(req(r))
            .await
            .map_err(named("netd"))?
            .into_inner();
        let n = r
            .network
            .ok_or_else(|| Error::internal("netd answered without a network"))?;
        Ok((n, r.created))
    }

    async fn delete_network(&self, name: &str, force: bool) -> Result<()> {
        let r = net::DeleteNetworkRequest {
            name: name.into(),
            force,
        };
        self.net
            .clone()
            .delete_network(req(r))
            .await
            .map(drop)
            .map_err(named("netd"))
    }

    async fn networks(&self) -> Result<Vec<net::Network>> {
        Ok(self
            .net
            .clone()
            .list_networks(req(net::ListNetworksRequest {}))
            .await
            .map_err(named("netd"))?
            .into_inner()
            .networks)
    }

    async fn inspect_bridge(&self, name: &str) -> Result<(IpAddr, u8)> {
        let r = self
            .net
            .clone()
            .inspect_bridge(req(net::InspectBridgeRequest { name: name.into() }))
            .await
            .map_err(named("netd"))?
            .into_inner();
        Ok((
            r.address.parse().map_err(|_| bad("netd", "address"))?,
            u8::try_from(r.prefix_len).map_err(|_| bad("netd", "prefix"))?,
        ))
    }

    async fn reconcile_net(&self) -> Result<Vec<String>> {
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
