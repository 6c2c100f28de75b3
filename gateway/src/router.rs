//! The routes, the OpenAPI document generated from the handlers, request tracing, limits, and
//! JSON answers for unknown paths and methods.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use volant_services::metrics;

use crate::doors::{self, Doors};
use crate::error::ApiError;
use crate::peers::{self, Peers};
use crate::{networks, openapi, plugins, proxy, system, vms};

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Volant",
        description = "Run microVMs on a Linux host and network them: bridge mode (a TAP on a \
                       bridge, NAT to the outside) or vsock mode (no network device; an ingress \
                       and an egress proxy). Errors are `{\"error\", \"details\"}`."
    ),
    tags(
        (name = "vms", description = "VMs and their lifecycle"),
        (name = "ports", description = "port forwards to VMs"),
        (name = "networks", description = "bridges, address pools and leases"),
        (name = "plugins", description = "VM templates"),
        (name = "system", description = "health and events"),
    ),
    paths(proxy::proxy)
)]
struct Doc;

/// Wraps every routed request in a span named for the route (`GET /api/v1/vms/{name}`) that
/// continues the caller's W3C trace, and records the status.
async fn trace(req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = metrics::http_method(req.method().as_str());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{} {route}", req.method()),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
        vm = tracing::field::Empty,
    );
    volant_services::telemetry::continue_trace(&span, req.headers());
    let vm = req
        .uri()
        .path()
        .strip_prefix("/api/v1/vms/")
        .and_then(|rest| rest.split('/').next())
        .filter(|name| !name.is_empty())
        .unwrap_or_default()
        .to_string();
    if !vm.is_empty() {
        span.record("vm", vm.as_str());
    }
    let res = peers::VM
        .scope(vm, next.run(req))
        .instrument(span.clone())
        .await;
    let status = res.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_client_error() || status.is_server_error() {
        span.record("outcome", status.as_str());
    } else {
        span.record("outcome", "ok");
    }
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let mut attrs = vec![
        metrics::KeyValue::new("http.request.method", method),
        metrics::KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
    ];
    if !route.is_empty() {
        attrs.push(metrics::KeyValue::new("http.route", route));
    }
    REQUESTS.record(started.elapsed().as_secs_f64(), &attrs);
    res
}

/// `http.server.request.duration`, OpenTelemetry's histogram of HTTP server requests: by method,
/// route (the template, never the path asked for) and status.
static REQUESTS: std::sync::LazyLock<metrics::Histogram<f64>> = std::sync::LazyLock::new(|| {
    metrics::meter()
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTP server requests.")
        .with_boundaries(metrics::REQUEST_SECONDS.to_vec())
        .build()
});

async fn unknown_path(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {} {}; GET /api/v1/openapi.json lists them",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let res = next.run(req).await;
    if res.status() == StatusCode::METHOD_NOT_ALLOWED {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!(
                "{method} is not allowed on {path}; GET /api/v1/openapi.json lists the methods"
            ),
        )
        .into_response();
    }
    res
}

/// The gateway's router over `peers`, behind `doors`.
pub fn router(peers: Peers, doors: Arc<Doors>) -> Router {
    let (routes, api) = OpenApiRouter::with_openapi(Doc::openapi())
        .routes(routes!(system::health))
        .routes(routes!(system::events))
        .routes(routes!(vms::list, vms::create))
        .routes(routes!(vms::get, vms::delete))
        .routes(routes!(vms::start))
        .routes(routes!(vms::stop))
        .routes(routes!(vms::restart))
        .routes(routes!(vms::logs))
        .routes(routes!(vms::ports, vms::add_port))
        .routes(routes!(vms::remove_port))
        .routes(routes!(networks::list, networks::create))
        .routes(routes!(networks::get, networks::update, networks::delete))
        .routes(routes!(networks::leases))
        .routes(routes!(plugins::list, plugins::install))
        .routes(routes!(plugins::get, plugins::remove))
        .split_for_parts();
    let doc = openapi::complete(api.to_json().expect("the OpenAPI document serializes"));
    routes
        .route(
            "/api/v1/schemas/manifest.json",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/schema+json")],
                    openapi::MANIFEST_SCHEMA,
                )
            }),
        )
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    doc,
                )
            }),
        )
        .route(
            "/api/v1/vms/{name}/proxy",
            axum::routing::any(proxy::proxy_root),
        )
        .route(
            "/api/v1/vms/{name}/proxy/",
            axum::routing::any(proxy::proxy_root),
        )
        .route(
            "/api/v1/vms/{name}/proxy/{*path}",
            axum::routing::any(proxy::proxy),
        )
        .route_layer(axum::middleware::from_fn(trace))
        .fallback(unknown_path)
        .layer(axum::middleware::from_fn(method_not_allowed))
        .layer(axum::middleware::from_fn_with_state(doors, doors::guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(peers)
}
