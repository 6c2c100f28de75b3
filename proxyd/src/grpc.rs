//! `volant.proxy.v1.Proxy` over the routes.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use volant_services::api::proxy::v1 as pb;
use volant_services::api::proxy::v1::proxy_server::Proxy;

use crate::routes::Routes;

/// The gRPC face of proxyd.
pub struct ProxyService(pub Arc<Routes>);

#[tonic::async_trait]
impl Proxy for ProxyService {
    async fn register_vm(
        &self,
        req: Request<pb::RegisterVmRequest>,
    ) -> Result<Response<pb::RegisterVmResponse>, Status> {
        let route = req
            .into_inner()
            .route
            .ok_or_else(|| Status::invalid_argument("route is required"))?;
        let (route, changed) = self.0.register(route).await?;
        Ok(Response::new(pb::RegisterVmResponse {
            route: Some(route),
            changed,
        }))
    }

    async fn unregister_vm(
        &self,
        req: Request<pb::UnregisterVmRequest>,
    ) -> Result<Response<pb::UnregisterVmResponse>, Status> {
        let existed = self.0.unregister(&req.into_inner().vm).await?;
        Ok(Response::new(pb::UnregisterVmResponse { existed }))
    }

    async fn list_routes(
        &self,
        _: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        Ok(Response::new(pb::ListRoutesResponse {
            routes: self.0.all(),
        }))
    }

    async fn get_stats(
        &self,
        req: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let vm = req.into_inner().vm;
        let vms = self.0.stats((!vm.is_empty()).then_some(vm.as_str()));
        if vms.is_empty() && !vm.is_empty() {
            return Err(Status::not_found(format!(
                "vm {vm:?} has no route and no counters"
            )));
        }
        Ok(Response::new(pb::GetStatsResponse { vms }))
    }
}
