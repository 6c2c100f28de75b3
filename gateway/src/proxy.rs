//! `ANY /api/v1/vms/{name}/proxy/{path...}`: HTTP and WebSocket to a VM's workload. A vsock VM is
//! reached through proxyd's ingress (which speaks hybrid vsock to kestrel); a bridge VM directly
//! at its address and workload port. The body streams both ways; an upgrade is spliced.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use volant_services::addr::Addr;
use volant_services::api::vmm::v1 as vmm;
use volant_services::daemon::Io;
use volant_services::hop;

use crate::error::{ApiError, By, ErrorBody, Path};
use crate::peers::{LIFECYCLE, Peers, READ, req};

/// How long an upgraded connection may live.
const UPGRADED_LIMIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn bad_gateway(name: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "BAD_GATEWAY",
        format!("vm {name:?}: {e}"),
    )
}

/// Sends `req` over `io` on a fresh HTTP/1.1 connection; splices an accepted upgrade.
async fn send<I>(io: I, mut req: Request, name: &str) -> Result<Response, ApiError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let upgrade = hop::wants_upgrade(req.headers());
    let incoming = upgrade.then(|| hyper::upgrade::on(&mut req));
    hop::strip(req.headers_mut(), upgrade);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| bad_gateway(name, e))?;
    tokio::spawn(conn.with_upgrades());
    let mut res = tokio::time::timeout(LIFECYCLE, sender.send_request(req))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "GATEWAY_TIMEOUT",
                format!("vm {name:?} did not answer within {LIFECYCLE:?}"),
            )
        })?
        .map_err(|e| bad_gateway(name, e))?;
    if let Some(incoming) = incoming
        && res.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let outgoing = hyper::upgrade::on(&mut res);
        tokio::spawn(async move {
            if let (Ok(a), Ok(b)) = (incoming.await, outgoing.await) {
                let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                let _ = tokio::time::timeout(
                    UPGRADED_LIMIT,
                    tokio::io::copy_bidirectional(&mut a, &mut b),
                )
                .await;
            }
        });
    } else {
        hop::strip(res.headers_mut(), false);
    }
    Ok(res.map(Body::new))
}

/// HTTP and WebSocket to the VM's workload.
#[utoipa::path(method(get, post, put, patch, delete), path = "/api/v1/vms/{name}/proxy/{path}", tag = "vms",
    params(("name" = String, Path, description = "The VM"),
           ("path" = String, Path, description = "The workload's path")),
    responses((status = 200, description = "The workload's answer, whatever its status and type",
               body = String, content_type = "*/*"),
              (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 412, body = ErrorBody), (status = 502, body = ErrorBody),
              (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn proxy(
    State(p): State<Peers>,
    Path((name, _path)): Path<(String, String)>,
    req: Request,
) -> Response {
    forward(p, name, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `…/proxy` without a path: the workload's `/`.
pub async fn proxy_root(
    State(p): State<Peers>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    forward(p, name, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn forward(p: Peers, name: String, mut req: Request) -> Result<Response, ApiError> {
    let vm = p
        .vmm
        .clone()
        .get_vm(req_of(&name))
        .await
        .by("vmmd")?
        .into_inner()
        .vm
        .ok_or_else(|| ApiError::from(tonic::Status::internal("vmmd answered without a VM")))?;
    if vm.status != vmm::VmStatus::Running as i32 {
        return Err(ApiError::from(tonic::Status::failed_precondition(format!(
            "vm {name:?} is not running; start it first"
        ))));
    }
    let original = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    if vm.network_mode == "vsock" {
        // proxyd reads the VM and the path from the original path.
        let io: Box<dyn Io> = match &p.ingress {
            Addr::Unix(path) => {
                Box::new(tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        format!("proxyd's ingress at {}: {e}", path.display()),
                    )
                })?)
            }
            Addr::Tcp(hp) => Box::new(tokio::net::TcpStream::connect(hp).await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    format!("proxyd's ingress at {hp}: {e}"),
                )
            })?),
        };
        return send(io, req, &name).await;
    }
    if vm.http_port == 0 || vm.ip_address.is_empty() {
        return Err(ApiError::from(tonic::Status::failed_precondition(format!(
            "vm {name:?} has no workload HTTP port to proxy to"
        ))));
    }
    let marker = format!("/api/v1/vms/{name}/proxy");
    let rest = original.strip_prefix(&marker).unwrap_or("/");
    let target = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    *req.uri_mut() = target.parse::<Uri>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            format!("{target:?} is not a valid path"),
        )
    })?;
    let tcp = tokio::time::timeout(
        READ,
        tokio::net::TcpStream::connect((vm.ip_address.as_str(), vm.http_port as u16)),
    )
    .await
    .map_err(|_| bad_gateway(&name, "its workload did not accept a connection in time"))?
    .map_err(|e| bad_gateway(&name, e))?;
    let _ = tcp.set_nodelay(true);
    send(tcp, req, &name).await
}

fn req_of(name: &str) -> tonic::Request<vmm::GetVmRequest> {
    req(
        vmm::GetVmRequest {
            name: name.to_string(),
        },
        READ,
    )
}
