//! `volant.ipam.v1.Ipam` over gRPC: translation between the wire and the [`Allocator`].

use std::sync::Arc;

use tonic::{Request, Response, Status};
use volant_services::api::ipam::v1 as pb;

use crate::allocator::{Allocator, Error, PoolView, Target};
use crate::pool::{Pool, PoolSpec};
use crate::store::Lease;

/// The gRPC face of the allocator.
pub struct IpamService {
    allocator: Arc<Allocator>,
}

impl IpamService {
    /// Serves `allocator`.
    pub fn new(allocator: Arc<Allocator>) -> IpamService {
        IpamService { allocator }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Invalid(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Conflict(m) => Status::already_exists(m),
            Error::Exhausted(m) => Status::resource_exhausted(m),
            Error::Precondition(m) => Status::failed_precondition(m),
            Error::Storage(e) => Status::internal(format!("ipamd storage failed: {e}")),
        }
    }
}

fn pool_pb(v: PoolView) -> pb::Pool {
    pb::Pool {
        capacity: u64::try_from(v.pool.capacity()).unwrap_or(u64::MAX),
        leased: v.leased as u64,
        name: v.pool.name,
        subnet: v.pool.subnet.to_string(),
        gateway: v.pool.gateway.to_string(),
        range_start: v.pool.range_start.to_string(),
        range_end: v.pool.range_end.to_string(),
    }
}

fn lease_pb(lease: Lease, pool: &Pool) -> pb::Lease {
    pb::Lease {
        ip: lease.ip.to_string(),
        vm: lease.vm,
        pool: lease.pool,
        leased_at: Some(lease.leased_at.into()),
        prefix_len: pool.subnet.prefix_len().into(),
        gateway: pool.gateway.to_string(),
    }
}

/// Which lease a request names: by address or by VM.
enum TargetOwned {
    Ip(String),
    Vm(String),
}

impl TargetOwned {
    fn as_target(&self) -> Target<'_> {
        match self {
            TargetOwned::Ip(ip) => Target::Ip(ip),
            TargetOwned::Vm(vm) => Target::Vm(vm),
        }
    }
}

fn required(t: Option<TargetOwned>) -> Result<TargetOwned, Status> {
    t.ok_or_else(|| Status::invalid_argument("say which lease: set ip or vm"))
}

impl From<pb::release_request::Target> for TargetOwned {
    fn from(t: pb::release_request::Target) -> Self {
        match t {
            pb::release_request::Target::Ip(ip) => TargetOwned::Ip(ip),
            pb::release_request::Target::Vm(vm) => TargetOwned::Vm(vm),
        }
    }
}

impl From<pb::get_lease_request::Target> for TargetOwned {
    fn from(t: pb::get_lease_request::Target) -> Self {
        match t {
            pb::get_lease_request::Target::Ip(ip) => TargetOwned::Ip(ip),
            pb::get_lease_request::Target::Vm(vm) => TargetOwned::Vm(vm),
        }
    }
}

fn leases_pb(leases: Vec<(Lease, Pool)>) -> Vec<pb::Lease> {
    leases.into_iter().map(|(l, p)| lease_pb(l, &p)).collect()
}

#[tonic::async_trait]
impl pb::ipam_server::Ipam for IpamService {
    async fn create_pool(
        &self,
        req: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let p = req
            .into_inner()
            .pool
            .ok_or_else(|| Status::invalid_argument("pool is required"))?;
        let (view, created) = self
            .allocator
            .create_pool(PoolSpec {
                name: &p.name,
                subnet: &p.subnet,
                gateway: &p.gateway,
                range_start: &p.range_start,
                range_end: &p.range_end,
            })
            .await?;
        Ok(Response::new(pb::CreatePoolResponse {
            pool: Some(pool_pb(view)),
            created,
        }))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::GetPoolResponse>, Status> {
        let view = self.allocator.get_pool(&req.into_inner().name).await?;
        Ok(Response::new(pb::GetPoolResponse {
            pool: Some(pool_pb(view)),
        }))
    }

    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self.allocator.list_pools().await?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.into_iter().map(pool_pb).collect(),
        }))
    }

    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let req = req.into_inner();
        let (deleted, released) = self.allocator.delete_pool(&req.name, req.force).await?;
        Ok(Response::new(pb::DeletePoolResponse {
            deleted,
            released: leases_pb(released),
        }))
    }

    async fn allocate(
        &self,
        req: Request<pb::AllocateRequest>,
    ) -> Result<Response<pb::AllocateResponse>, Status> {
        let req = req.into_inner();
        let requested = req.requested_ip.as_deref().filter(|ip| !ip.is_empty());
        let (lease, pool, created) = self
            .allocator
            .allocate(&req.pool, &req.vm, requested)
            .await?;
        Ok(Response::new(pb::AllocateResponse {
            lease: Some(lease_pb(lease, &pool)),
            created,
        }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = req.into_inner();
        let t = required(req.target.map(Into::into))?;
        let released = self.allocator.release(&req.pool, t.as_target()).await?;
        Ok(Response::new(pb::ReleaseResponse {
            released: released.map(|(l, p)| lease_pb(l, &p)),
        }))
    }

    async fn release_vm(
        &self,
        req: Request<pb::ReleaseVmRequest>,
    ) -> Result<Response<pb::ReleaseVmResponse>, Status> {
        let released = self.allocator.release_vm(&req.into_inner().vm).await?;
        Ok(Response::new(pb::ReleaseVmResponse {
            released: leases_pb(released),
        }))
    }

    async fn get_lease(
        &self,
        req: Request<pb::GetLeaseRequest>,
    ) -> Result<Response<pb::GetLeaseResponse>, Status> {
        let req = req.into_inner();
        let t = required(req.target.map(Into::into))?;
        let (lease, pool) = self.allocator.get_lease(&req.pool, t.as_target()).await?;
        Ok(Response::new(pb::GetLeaseResponse {
            lease: Some(lease_pb(lease, &pool)),
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        let req = req.into_inner();
        let pool = Some(req.pool.as_str()).filter(|s| !s.is_empty());
        let vm = Some(req.vm.as_str()).filter(|s| !s.is_empty());
        let leases = self.allocator.list_leases(pool, vm).await?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: leases_pb(leases),
        }))
    }
}
