//! `/api/v1/health` and `/api/v1/events`.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use volant_services::api::vmm::v1 as vmm;

use crate::error::{ApiError, By, ErrorBody};
use crate::model::{Event, Health};
use crate::peers::{Peers, READ, open_stream, req};

/// The gateway and each service behind it: 200 when all serve, else 503.
#[utoipa::path(get, path = "/api/v1/health", tag = "system",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn health(State(p): State<Peers>) -> (StatusCode, Json<Health>) {
    let checks = p.health.iter().map(|(name, client)| {
        let mut client = client.clone();
        async move {
            let state = match client.check(req(HealthCheckRequest::default(), READ)).await {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => "ok".to_string(),
                Ok(_) => "not serving".to_string(),
                Err(s) => format!("unavailable: {}", s.message()),
            };
            (name.to_string(), state)
        }
    });
    let services: std::collections::BTreeMap<String, String> =
        futures_util::future::join_all(checks)
            .await
            .into_iter()
            .collect();
    let ok = services.values().all(|s| s == "ok");
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ok { "ok" } else { "degraded" }.into(),
            services,
        }),
    )
}

/// VM state changes as server-sent events (`event: vm`, data: an Event).
#[utoipa::path(get, path = "/api/v1/events", tag = "system",
    responses((status = 200, content_type = "text/event-stream", body = Event), (status = 503, body = ErrorBody)))]
pub async fn events(
    State(p): State<Peers>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let stream = open_stream(
        p.vmm
            .clone()
            .watch_events(vmm::WatchEventsRequest::default()),
    )
    .await
    .by("vmmd")?;
    let events = futures_util::StreamExt::map(stream, |item| {
        Ok(match item {
            Ok(e) => SseEvent::default()
                .event("vm")
                .json_data(Event::from(e))
                .unwrap_or_default(),
            Err(s) => SseEvent::default().event("error").data(s.message()),
        })
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
