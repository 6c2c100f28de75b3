//! `volant.vmm.v1.Vmm` over gRPC: translation between the wire and [`Vmm`].

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use volant_services::api::vmm::v1 as pb;

use crate::metrics;
use crate::records::{Paths, Plugin, PortForward};
use crate::vmm::{CreateRequest, Vmm, forward_pb, vm_pb};

/// Runs operation `name` on its own task, so that it reaches its end (or its compensation)
/// even when the caller goes away: a dropped saga would leave a VM half made. Its duration and
/// outcome are recorded.
async fn to_the_end<T: Send + 'static>(
    name: &'static str,
    op: impl std::future::Future<Output = crate::error::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    let started = std::time::Instant::now();
    let result = tokio::spawn(op)
        .await
        .map_err(|e| crate::error::Error::internal(format!("the operation failed: {e}")))
        .and_then(|r| r);
    let failed = result.as_ref().err().map(|e| e.kind());
    metrics::operation(name, started.elapsed(), failed);
    Ok(result?)
}

/// The gRPC face of vmmd.
pub struct VmmService {
    vmm: Arc<Vmm>,
    paths: Box<dyn Fn(&str) -> Paths + Send + Sync>,
}

impl VmmService {
    /// Serves `vmm`; `paths` locates a VM's files.
    pub fn new(vmm: Arc<Vmm>, paths: Box<dyn Fn(&str) -> Paths + Send + Sync>) -> VmmService {
        VmmService { vmm, paths }
    }
}

fn plugin_pb(p: Plugin) -> pb::Plugin {
    pb::Plugin {
        name: p.manifest.name.clone(),
        version: p.manifest.version.clone(),
        network_mode: p.manifest.networking.mode.as_str().into(),
        manifest_json: serde_json::to_string(&p.manifest).expect("JSON"),
        installed_at: Some(p.installed_at.into()),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::vmm_server::Vmm for VmmService {
    async fn install_plugin(
        &self,
        req: Request<pb::InstallPluginRequest>,
    ) -> Result<Response<pb::InstallPluginResponse>, Status> {
        let (plugin, created) = self
            .vmm
            .install_plugin(&req.into_inner().manifest_json)
            .await?;
        Ok(Response::new(pb::InstallPluginResponse {
            plugin: Some(plugin_pb(plugin)),
            created,
        }))
    }

    async fn get_plugin(
        &self,
        req: Request<pb::GetPluginRequest>,
    ) -> Result<Response<pb::GetPluginResponse>, Status> {
        let plugin = self.vmm.plugin(&req.into_inner().name)?;
        Ok(Response::new(pb::GetPluginResponse {
            plugin: Some(plugin_pb(plugin)),
        }))
    }

    async fn list_plugins(
        &self,
        _: Request<pb::ListPluginsRequest>,
    ) -> Result<Response<pb::ListPluginsResponse>, Status> {
        Ok(Response::new(pb::ListPluginsResponse {
            plugins: self.vmm.plugins().into_iter().map(plugin_pb).collect(),
        }))
    }

    async fn remove_plugin(
        &self,
        req: Request<pb::RemovePluginRequest>,
    ) -> Result<Response<pb::RemovePluginResponse>, Status> {
        let removed = self.vmm.remove_plugin(&req.into_inner().name).await?;
        Ok(Response::new(pb::RemovePluginResponse { removed }))
    }

    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("vm.create", vm = %r.name, plugin = %r.plugin);
        let vmm = self.vmm.clone();
        let (vm, notes) = to_the_end(
            "create",
            async move {
                vmm.create(CreateRequest {
                    name: r.name,
                    plugin: r.plugin,
                    cpu_cores: r.cpu_cores,
                    memory_mb: r.memory_mb,
                    network: r.network,
                    ip: r.ip,
                    kernel_cmdline: r.kernel_cmdline,
                })
                .await
            }
            .instrument(span),
        )
        .await?;
        Ok(Response::new(pb::CreateVmResponse {
            vm: Some(vm_pb(&vm)),
            notes,
        }))
    }

    async fn get_vm(
        &self,
        req: Request<pb::GetVmRequest>,
    ) -> Result<Response<pb::GetVmResponse>, Status> {
        let vm = self.vmm.get(&req.into_inner().name)?;
        Ok(Response::new(pb::GetVmResponse {
            vm: Some(vm_pb(&vm)),
        }))
    }

    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse {
            vms: self.vmm.list().iter().map(vm_pb).collect(),
        }))
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let r = req.into_inner();
        let vmm = self.vmm.clone();
        let deleted =
            to_the_end("delete", async move { vmm.delete(&r.name, r.force).await }).await?;
        Ok(Response::new(pb::DeleteVmResponse { deleted }))
    }

    async fn start_vm(
        &self,
        req: Request<pb::StartVmRequest>,
    ) -> Result<Response<pb::StartVmResponse>, Status> {
        let (vmm, name) = (self.vmm.clone(), req.into_inner().name);
        let vm = to_the_end("start", async move { vmm.start(&name).await }).await?;
        Ok(Response::new(pb::StartVmResponse {
            vm: Some(vm_pb(&vm)),
        }))
    }

    async fn stop_vm(
        &self,
        req: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::StopVmResponse>, Status> {
        let (vmm, name) = (self.vmm.clone(), req.into_inner().name);
        let vm = to_the_end("stop", async move { vmm.stop(&name).await }).await?;
        Ok(Response::new(pb::StopVmResponse {
            vm: Some(vm_pb(&vm)),
        }))
    }

    async fn restart_vm(
        &self,
        req: Request<pb::RestartVmRequest>,
    ) -> Result<Response<pb::RestartVmResponse>, Status> {
        let (vmm, name) = (self.vmm.clone(), req.into_inner().name);
        let vm = to_the_end("restart", async move { vmm.restart(&name).await }).await?;
        Ok(Response::new(pb::RestartVmResponse {
            vm: Some(vm_pb(&vm)),
        }))
    }

    async fn add_port_forward(
        &self,
        req: Request<pb::AddPortForwardRequest>,
    ) -> Result<Response<pb::AddPortForwardResponse>, Status> {
        let r = req.into_inner();
        let f = r.forward.unwrap_or_default();
        let f = PortForward::checked(&f.protocol, f.host_port, f.guest_port)
            .map_err(Status::invalid_argument)?;
        let (vmm, forward) = (self.vmm.clone(), f.clone());
        let (ip, created) = to_the_end("add_port_forward", async move {
            vmm.add_forward(&r.vm, forward).await
        })
        .await?;
        Ok(Response::new(pb::AddPortForwardResponse {
            forward: Some(forward_pb(&f)),
            vm_ip: ip.to_string(),
            created,
        }))
    }

    async fn remove_port_forward(
        &self,
        req: Request<pb::RemovePortForwardRequest>,
    ) -> Result<Response<pb::RemovePortForwardResponse>, Status> {
        let r = req.into_inner();
        let vmm = self.vmm.clone();
        to_the_end("remove_port_forward", async move {
            vmm.remove_forward(&r.vm, &r.protocol, r.host_port).await
        })
        .await?;
        Ok(Response::new(pb::RemovePortForwardResponse {}))
    }

    async fn create_network(
        &self,
        req: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        let r = req.into_inner();
        let bridge = r
            .bridge
            .ok_or_else(|| Status::invalid_argument("bridge: the network is missing"))?;
        let vmm = self.vmm.clone();
        let (network, created) = to_the_end("create_network", async move {
            vmm.create_network(bridge, (r.range_start, r.range_end))
                .await
        })
        .await?;
        Ok(Response::new(pb::CreateNetworkResponse {
            network: Some(network),
            created,
        }))
    }

    async fn update_network(
        &self,
        req: Request<pb::UpdateNetworkRequest>,
    ) -> Result<Response<pb::UpdateNetworkResponse>, Status> {
        let r = req.into_inner();
        let vmm = self.vmm.clone();
        let network = to_the_end("update_network", async move {
            vmm.update_network(&r.name, r.nat).await
        })
        .await?;
        Ok(Response::new(pb::UpdateNetworkResponse {
            network: Some(network),
        }))
    }

    async fn delete_network(
        &self,
        req: Request<pb::DeleteNetworkRequest>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        let r = req.into_inner();
        let vmm = self.vmm.clone();
        to_the_end("delete_network", async move {
            vmm.delete_network(&r.name, r.force).await
        })
        .await?;
        Ok(Response::new(pb::DeleteNetworkResponse {}))
    }

    async fn list_networks(
        &self,
        req: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let name = req.into_inner().name;
        let networks = if name.is_empty() {
            self.vmm.networks().await?
        } else {
            vec![self.vmm.network(&name).await?]
        };
        Ok(Response::new(pb::ListNetworksResponse { networks }))
    }

    type WatchEventsStream = Streamed<pb::VmEvent>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let only = req.into_inner().name;
        let mut events = self.vmm.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = match events.recv().await {
                    Ok(e) if only.is_empty() || e.name == only => Ok(e),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => Err(Status::data_loss(format!(
                        "this watcher fell {n} events behind and missed them; watch again and \
                         list the VMs to resynchronise"
                    ))),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type StreamLogsStream = Streamed<pb::LogChunk>;

    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let r = req.into_inner();
        self.vmm.get(&r.name)?;
        let current = (self.paths)(&r.name).serial;
        let path = if r.previous {
            crate::guest::previous(&current)
        } else {
            current
        };
        let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
        let vmm = self.vmm.clone();
        let name = r.name.clone();
        tokio::spawn(async move {
            let gone = || vmm.get(&name).is_err();
            if let Err(e) = crate::logs::stream(path, r.follow, tx, gone).await {
                tracing::warn!(vm = %name, "streaming the log: {e}");
            }
        });
        let stream =
            tokio_stream::StreamExt::map(ReceiverStream::new(rx), |data| Ok(pb::LogChunk { data }));
        Ok(Response::new(Box::pin(stream)))
    }
}
