//! The services behind the gateway, each call with a deadline so a service that is down or
//! stuck answers 503 instead of hanging the request.

use std::time::Duration;

use tonic::Request;
use tonic_health::pb::health_client::HealthClient;
use volant_services::Channel;
use volant_services::api::ipam::v1::ipam_client::IpamClient;
use volant_services::api::vmm::v1::vmm_client::VmmClient;

/// Deadline of reads.
pub const READ: Duration = Duration::from_secs(5);
/// Deadline of ordinary changes.
pub const WRITE: Duration = Duration::from_secs(30);
/// Deadline of creating, deleting, stopping and restarting a VM, which wait for hypervisors.
pub const LIFECYCLE: Duration = Duration::from_secs(120);

/// Clients of vmmd and ipamd (leases), and every service's health.
#[derive(Clone)]
pub struct Peers {
    /// vmmd.
    pub vmm: VmmClient<Channel>,
    /// ipamd.
    pub ipam: IpamClient<Channel>,
    /// Each service's health, by name.
    pub health: Vec<(&'static str, HealthClient<Channel>)>,
    /// proxyd's ingress HTTP listener.
    pub ingress: std::sync::Arc<crate::ingress::Ingress>,
    /// The VMs the proxy route has asked about.
    pub known: std::sync::Arc<crate::known::Known>,
}

tokio::task_local! {
    /// The VM the REST request being served is about (from its path), so that the spans of the
    /// gRPC calls it makes carry the VM's name.
    pub static VM: String;
}

/// A request with a deadline, about the current REST request's VM if it has one.
pub fn req<T>(msg: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(deadline);
    let _ = VM.try_with(|vm| volant_services::telemetry::about_vm(&mut r, vm));
    r
}

/// Opens a stream: the deadline covers the answer's start only, since a followed stream may run
/// for ever.
pub async fn open_stream<T, F>(opening: F) -> Result<T, tonic::Status>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(READ, opening).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {READ:?}"
        ))),
    }
}
