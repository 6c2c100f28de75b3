//! `/api/v1/vms`: VMs, their lifecycle, console logs and port forwards.

use axum::Json;
use axum::body::Body as HttpBody;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use volant_services::api::vmm::v1 as vmm;

use crate::error::{ApiError, Body, By, ErrorBody, Path, Query};
use crate::model::{AddPort, CreateVm, List, Port, Vm};
use crate::peers::{LIFECYCLE, Peers, READ, WRITE, open_stream, req};

/// `?force=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Force {
    /// Remove whatever is left even when a step fails.
    #[serde(default)]
    pub force: bool,
}

/// `?follow=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Follow {
    /// Keep streaming new output.
    #[serde(default)]
    pub follow: bool,
    /// The previous boot's console instead of this boot's.
    #[serde(default)]
    pub previous: bool,
}

/// `?protocol=`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// `tcp` or `udp` [default: tcp].
    pub protocol: Option<String>,
}

fn vm_of(v: Option<vmm::Vm>) -> Result<Json<Vm>, ApiError> {
    v.map(|v| Json(Vm::from(v)))
        .ok_or_else(|| ApiError::from(tonic::Status::internal("vmmd answered without a VM")))
}

/// The VMs.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = Vec<Vm>), (status = 503, body = ErrorBody)))]
pub async fn list(State(p): State<Peers>) -> Result<List<Vm>, ApiError> {
    let vms = p
        .vmm
        .clone()
        .list_vms(req(vmm::ListVmsRequest {}, READ))
        .await
        .by("vmmd")?;
    Ok(List(
        vms.into_inner().vms.into_iter().map(Vm::from).collect(),
    ))
}

/// Creates a VM and starts it; answers once its hypervisor runs.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = CreateVm,
    responses((status = 201, body = Vm), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 412, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(p): State<Peers>,
    Body(b): Body<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let r = vmm::CreateVmRequest {
        name: b.name,
        plugin: b.plugin,
        cpu_cores: b.cpu_cores.unwrap_or(0),
        memory_mb: b.memory_mb.unwrap_or(0),
        network: b.network.unwrap_or_default(),
        ip: b.ip.unwrap_or_default(),
        kernel_cmdline: b.kernel_cmdline.unwrap_or_default(),
    };
    tracing::Span::current().record("vm", r.name.as_str());
    let mut call = req(r, LIFECYCLE);
    let name = call.get_ref().name.clone();
    volant_services::telemetry::about_vm(&mut call, &name);
    let made = p.vmm.clone().create_vm(call).await.by("vmmd")?.into_inner();
    let Json(mut vm) = vm_of(made.vm)?;
    vm.notes = made.notes;
    Ok((StatusCode::CREATED, Json(vm)))
}

/// One VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 503, body = ErrorBody), (status = 200, body = Vm), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(State(p): State<Peers>, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    let vm = p
        .vmm
        .clone()
        .get_vm(req(vmm::GetVmRequest { name }, READ))
        .await
        .by("vmmd")?;
    vm_of(vm.into_inner().vm)
}

/// Deletes a VM and everything it holds; deleting what is not there succeeds too.
#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), Force),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn delete(
    State(p): State<Peers>,
    Path(name): Path<String>,
    Query(q): Query<Force>,
) -> Result<StatusCode, ApiError> {
    let r = vmm::DeleteVmRequest {
        name: name.clone(),
        force: q.force,
    };
    let deleted = p.vmm.clone().delete_vm(req(r, LIFECYCLE)).await;
    p.known.forget(&name);
    deleted.by("vmmd")?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a stopped or failed VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 400, body = ErrorBody), (status = 503, body = ErrorBody), (status = 200, body = Vm), (status = 404, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn start(State(p): State<Peers>, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    let vm = p
        .vmm
        .clone()
        .start_vm(req(vmm::StartVmRequest { name: name.clone() }, LIFECYCLE))
        .await;
    p.known.forget(&name);
    let vm = vm.by("vmmd")?;
    vm_of(vm.into_inner().vm)
}

/// Shuts a VM down cleanly (its address and TAP are kept).
#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 400, body = ErrorBody), (status = 503, body = ErrorBody), (status = 200, body = Vm), (status = 404, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn stop(State(p): State<Peers>, Path(name): Path<String>) -> Result<Json<Vm>, ApiError> {
    let vm = p
        .vmm
        .clone()
        .stop_vm(req(vmm::StopVmRequest { name: name.clone() }, LIFECYCLE))
        .await;
    p.known.forget(&name);
    let vm = vm.by("vmmd")?;
    vm_of(vm.into_inner().vm)
}

/// Stops and starts a VM.
#[utoipa::path(post, path = "/api/v1/vms/{name}/restart", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 400, body = ErrorBody), (status = 503, body = ErrorBody), (status = 200, body = Vm), (status = 404, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn restart(
    State(p): State<Peers>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    let vm = p
        .vmm
        .clone()
        .restart_vm(req(vmm::RestartVmRequest { name: name.clone() }, LIFECYCLE))
        .await;
    p.known.forget(&name);
    let vm = vm.by("vmmd")?;
    vm_of(vm.into_inner().vm)
}

/// The VM's serial console of this boot (`previous=true`: of the boot before); with
/// `follow=true`, streamed as it grows.
#[utoipa::path(get, path = "/api/v1/vms/{name}/logs", tag = "vms",
    params(("name" = String, Path, description = "VM name"), Follow),
    responses((status = 400, body = ErrorBody), (status = 503, body = ErrorBody), (status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(p): State<Peers>,
    Path(name): Path<String>,
    Query(q): Query<Follow>,
) -> Result<Response, ApiError> {
    let r = vmm::StreamLogsRequest {
        name,
        follow: q.follow,
        previous: q.previous,
    };
    let stream = open_stream(p.vmm.clone().stream_logs(r)).await.by("vmmd")?;
    let body = futures_util::StreamExt::map(stream, |chunk| {
        chunk
            .map(|c| bytes::Bytes::from(c.data))
            .map_err(|s| std::io::Error::other(s.message().to_string()))
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        HttpBody::from_stream(body),
    )
        .into_response())
}

/// The VM's port forwards.
#[utoipa::path(get, path = "/api/v1/vms/{name}/ports", tag = "ports",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 400, body = ErrorBody), (status = 503, body = ErrorBody), (status = 200, body = Vec<Port>), (status = 404, body = ErrorBody)))]
pub async fn ports(
    State(p): State<Peers>,
    Path(name): Path<String>,
) -> Result<List<Port>, ApiError> {
    let vm = p
        .vmm
        .clone()
        .get_vm(req(vmm::GetVmRequest { name }, READ))
        .await
        .by("vmmd")?
        .into_inner()
        .vm
        .unwrap_or_default();
    Ok(List(
        vm.port_forwards
            .iter()
            .map(|f| Port::of(&vm.name, &vm.ip_address, f))
            .collect(),
    ))
}

/// Forwards a host port to the VM (DNAT). The forward is kept with the VM and removed with it;
/// adding the same forward again answers 200.
#[utoipa::path(post, path = "/api/v1/vms/{name}/ports", tag = "ports", request_body = AddPort,
    params(("name" = String, Path, description = "VM name")),
    responses((status = 503, body = ErrorBody), (status = 201, body = Port), (status = 200, body = Port), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 412, body = ErrorBody)))]
pub async fn add_port(
    State(p): State<Peers>,
    Path(name): Path<String>,
    Body(b): Body<AddPort>,
) -> Result<(StatusCode, Json<Port>), ApiError> {
    let forward = vmm::PortForward {
        host_port: b.host_port,
        protocol: b.protocol.unwrap_or_else(|| "tcp".into()),
        guest_port: b.guest_port,
    };
    let added = p
        .vmm
        .clone()
        .add_port_forward(req(
            vmm::AddPortForwardRequest {
                vm: name.clone(),
                forward: Some(forward),
            },
            WRITE,
        ))
        .await
        .by("vmmd")?
        .into_inner();
    let f = added.forward.unwrap_or_default();
    let status = if added.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(Port::of(&name, &added.vm_ip, &f))))
}

/// Removes one of the VM's port forwards.
#[utoipa::path(delete, path = "/api/v1/vms/{name}/ports/{host_port}", tag = "ports",
    params(("name" = String, Path, description = "VM name"), ("host_port" = u32, Path, minimum = 1, maximum = 65535, description = "host port"), Protocol),
    responses((status = 503, body = ErrorBody), (status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_port(
    State(p): State<Peers>,
    Path((name, host_port)): Path<(String, u32)>,
    Query(q): Query<Protocol>,
) -> Result<StatusCode, ApiError> {
    p.vmm
        .clone()
        .remove_port_forward(req(
            vmm::RemovePortForwardRequest {
                vm: name,
                host_port,
                protocol: q.protocol.unwrap_or_else(|| "tcp".into()),
            },
            WRITE,
        ))
        .await
        .by("vmmd")?;
    Ok(StatusCode::NO_CONTENT)
}
