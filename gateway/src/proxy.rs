//! `ANY /api/v1/vms/{name}/proxy/{path...}`: HTTP and WebSocket to a VM's workload. A vsock VM is
//! reached through proxyd's ingress (which speaks hybrid vsock to kestrel); a bridge VM directly
//! at its address and workload port. The body streams both ways; an upgrade is spliced.
//! Connections to proxyd are kept and reused ([`Ingress`]); one to a bridge VM serves one request.
//!
//! The gateway's credentials never reach a workload: the `Authorization` field (the API key it
//! checked) and `Cookie` (cookies of the gateway's origin, which every VM's workload shares) are
//! removed. A client that has credentials for the workload itself sends them as
//! `X-Volant-Workload-Authorization` and `X-Volant-Workload-Cookie`, which arrive as
//! `Authorization` and `Cookie`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use hyper::body::Body as HttpBody;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use volant_services::api::vmm::v1 as vmm;
use volant_services::hop;

use crate::error::{ApiError, By, ErrorBody, Path};
use crate::ingress::Ingress;
use crate::peers::{LIFECYCLE, Peers, READ};

/// How long an upgraded connection may live.
const UPGRADED_LIMIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

fn bad_gateway(name: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "BAD_GATEWAY",
        format!("vm {name:?}: {e}"),
    )
}

/// The fields a client addresses to the workload itself, and what they arrive as.
const FOR_THE_WORKLOAD: [(&str, header::HeaderName); 2] = [
    ("x-volant-workload-authorization", header::AUTHORIZATION),
    ("x-volant-workload-cookie", header::COOKIE),
];

/// Removes the gateway's credentials from a request to a workload and puts what the client
/// addressed to the workload in their place.
fn workload_credentials(h: &mut HeaderMap) {
    h.remove(header::AUTHORIZATION);
    h.remove(header::COOKIE);
    for (theirs, as_named) in FOR_THE_WORKLOAD {
        let values: Vec<_> = h.get_all(theirs).iter().cloned().collect();
        h.remove(theirs);
        for v in values {
            h.append(as_named.clone(), v);
        }
    }
}

/// What became of a request on a connection.
enum Sent {
    Answered(Response),
    /// The connection closed before the request went out; here it is back.
    Unsent(Request),
    /// The connection closed after the request went out, before any answer came.
    Unanswered(hyper::Error),
}

impl Sent {
    /// The answer; a request that got none is the VM's failure to answer.
    fn answer(self, name: &str) -> Result<Response, ApiError> {
        match self {
            Sent::Answered(res) => Ok(res),
            Sent::Unsent(_) => Err(bad_gateway(
                name,
                "the connection closed before the request went out",
            )),
            Sent::Unanswered(e) => Err(bad_gateway(name, e)),
        }
    }
}

/// A copy of `req` to send again if the first went out but got no answer: only for an idempotent
/// method without a body (RFC 9110, 9.2.2), the case of a kept connection closed as it was used.
fn replayable(req: &Request) -> Option<Request> {
    if !req.method().is_idempotent() || HttpBody::size_hint(req.body()).exact() != Some(0) {
        return None;
    }
    let mut copy = Request::new(Body::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Sends `req` on `sender` and splices an accepted upgrade. A connection that answered an
/// ordinary request goes back to `keep`.
async fn exchange(
    mut sender: SendRequest<Body>,
    mut req: Request,
    name: &str,
    keep: Option<&Ingress>,
) -> Result<Sent, ApiError> {
    let upgrade = hop::wants_upgrade(req.headers());
    let incoming = upgrade.then(|| hyper::upgrade::on(&mut req));
    hop::strip(req.headers_mut(), upgrade);
    let sent = tokio::time::timeout(LIFECYCLE, sender.try_send_request(req))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "GATEWAY_TIMEOUT",
                format!("vm {name:?} did not answer within {LIFECYCLE:?}"),
            )
        })?;
    let mut res = match sent {
        Ok(res) => res,
        Err(mut e) => {
            return match e.take_message() {
                Some(req) => Ok(Sent::Unsent(req)),
                None if e.error().is_incomplete_message() => Ok(Sent::Unanswered(e.into_error())),
                None => Err(bad_gateway(name, e.into_error())),
            };
        }
    };
    if let Some(incoming) = incoming {
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
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
            return Ok(Sent::Answered(res.map(Body::new)));
        }
    } else if let Some(keep) = keep {
        keep.give_back(sender);
    }
    hop::strip(res.headers_mut(), false);
    Ok(Sent::Answered(res.map(Body::new)))
}

/// Sends `req` through proxyd's ingress: on a kept connection when one is ready, else on a new
/// one. If the kept one closes before the request went out, or before its answer for a request
/// that may be sent twice, the request goes again on a new connection.
async fn through_ingress(
    ingress: &Ingress,
    mut req: Request,
    name: &str,
) -> Result<Response, ApiError> {
    if !hop::wants_upgrade(req.headers())
        && let Some(kept) = ingress.take()
    {
        let again = replayable(&req);
        match exchange(kept, req, name, Some(ingress)).await? {
            Sent::Answered(res) => return Ok(res),
            Sent::Unsent(back) => req = back,
            Sent::Unanswered(e) => req = again.ok_or_else(|| bad_gateway(name, e))?,
        }
    }
    let fresh = ingress.connect().await?;
    exchange(fresh, req, name, Some(ingress))
        .await?
        .answer(name)
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
    let vm = p.known.get(&p.vmm, &name).await.by("vmmd")?;
    if vm.status != vmm::VmStatus::Running as i32 {
        let why = match vmm::VmStatus::try_from(vm.status) {
            Ok(vmm::VmStatus::Booting) => "is booting: its guest is not ready yet; retry shortly",
            _ => "is not running; start it first",
        };
        return Err(ApiError::from(tonic::Status::failed_precondition(format!(
            "vm {name:?} {why}"
        ))));
    }
    workload_credentials(req.headers_mut());
    // The request goes on in this request's trace (proxyd's ingress span joins it).
    volant_services::telemetry::inject_trace(&tracing::Span::current(), req.headers_mut());
    let original = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    if vm.network_mode == "vsock" {
        // proxyd reads the VM and the path from the original path.
        return through_ingress(&p.ingress, req, &name).await;
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
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| bad_gateway(&name, e))?;
    tokio::spawn(conn.with_upgrades());
    exchange(sender, req, &name, None).await?.answer(&name)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use volant_services::addr::Addr;

    use super::*;

    /// When the test server closes a connection, without saying so.
    #[derive(Clone, Copy, PartialEq)]
    enum Close {
        Never,
        AfterAnswer,
        /// On reading a second request, unanswered: a kept connection closed as it is used.
        AtSecondRequest,
    }

    /// An HTTP/1.1 server on a Unix socket answering `ok` to each request head (4 MiB to a path
    /// ending in `big`); it counts its connections and the requests it reads.
    fn server(path: &std::path::Path, close: Close) -> (Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let (count, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (seen, read) = (count.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                seen.fetch_add(1, Ordering::SeqCst);
                let read = read.clone();
                tokio::spawn(async move {
                    let mut served = 0;
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while let Ok(n @ 1..) = s.read(&mut b).await {
                        head.extend_from_slice(&b[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            let big = head.starts_with(b"GET /api/v1/vms/web/proxy/big ");
                            head.drain(..end + 4);
                            read.fetch_add(1, Ordering::SeqCst);
                            served += 1;
                            if close == Close::AtSecondRequest && served == 2 {
                                return;
                            }
                            let answer = if big {
                                let mut a =
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n".to_vec();
                                a.resize(a.len() + (4 << 20), b'x');
                                a
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                            };
                            if s.write_all(&answer).await.is_err() || close == Close::AfterAnswer {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (count, requests)
    }

    async fn send(ingress: &Ingress, method: &str, path: &str) -> Result<Response, ApiError> {
        let req = Request::builder()
            .method(method)
            .uri(format!("/api/v1/vms/web/proxy/{path}"))
            .body(Body::empty())
            .unwrap();
        through_ingress(ingress, req, "web").await
    }

    async fn get(ingress: &Ingress, path: &str) -> Response {
        send(ingress, "GET", path).await.unwrap()
    }

    async fn text(res: Response) -> String {
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into()
    }

    #[test]
    fn the_gateways_credentials_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer operator-key"),
            ("cookie", "session=operator"),
            ("cookie", "other=1"),
            ("x-volant-workload-authorization", "Basic d29yazpsb2Fk"),
            ("x-volant-workload-cookie", "app=1"),
            ("x-other", "kept"),
        ] {
            h.append(k, v.parse().unwrap());
        }
        workload_credentials(&mut h);
        let mut all: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("authorization".into(), "Basic d29yazpsb2Fk".into()),
                ("cookie".into(), "app=1".into()),
                ("x-other".into(), "kept".into()),
            ]
        );
    }

    #[tokio::test]
    async fn connections_to_the_ingress_are_kept_and_replaced() {
        let dir = std::env::temp_dir().join(format!("volant-gateway-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (steady, closing) = (dir.join("steady.sock"), dir.join("closing.sock"));
        let _ = std::fs::remove_file(&steady);
        let _ = std::fs::remove_file(&closing);

        // Answered requests one after another share one connection.
        let (count, _) = server(&steady, Close::Never);
        let ingress = Ingress::new(Addr::Unix(steady));
        for _ in 0..5 {
            assert_eq!(text(get(&ingress, "").await).await, "ok");
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // One whose answer is still being read is not lent to the next request.
        let unread = get(&ingress, "big").await;
        assert!(ingress.take().is_none(), "the only kept connection is busy");
        assert_eq!(text(get(&ingress, "").await).await, "ok");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert_eq!(text(unread).await.len(), 4 << 20);

        // Connections the other side closed are dropped, not used.
        let (count, _) = server(&closing, Close::AfterAnswer);
        let ingress = Ingress::new(Addr::Unix(closing));
        for _ in 0..3 {
            assert_eq!(text(get(&ingress, "").await).await, "ok");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(count.load(Ordering::SeqCst), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_kept_connection_closed_as_it_is_used_resends_only_what_may_be_sent_twice() {
        let dir =
            std::env::temp_dir().join(format!("volant-gateway-resend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("drop.sock");
        let _ = std::fs::remove_file(&path);
        let (count, requests) = server(&path, Close::AtSecondRequest);
        let ingress = Ingress::new(Addr::Unix(path));

        // A GET on the kept connection is read, then the connection closes: sent again on a new one.
        assert_eq!(text(get(&ingress, "").await).await, "ok");
        assert_eq!(text(get(&ingress, "").await).await, "ok");
        assert_eq!(
            (
                count.load(Ordering::SeqCst),
                requests.load(Ordering::SeqCst)
            ),
            (2, 3)
        );

        // A POST there is not sent twice: the workload may have acted on it.
        let err = send(&ingress, "POST", "")
            .await
            .unwrap_err()
            .into_response();
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            (
                count.load(Ordering::SeqCst),
                requests.load(Ordering::SeqCst)
            ),
            (2, 4)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
