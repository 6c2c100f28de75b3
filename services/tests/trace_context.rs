//! One gRPC call over a real Unix socket: the client span and the server span share a trace id,
//! and the server span is the child of the client span.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio_stream::wrappers::UnixListenerStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing_subscriber::layer::SubscriberExt;
use volant_services::telemetry::{GrpcTraceLayer, Side};
use volant_services::{Addr, dial};

fn span(spans: &[SpanData], kind: opentelemetry::trace::SpanKind) -> &SpanData {
    spans
        .iter()
        .find(|s| s.span_kind == kind && s.name == "grpc.health.v1.Health/Check")
        .unwrap_or_else(|| panic!("no {kind:?} span among {spans:#?}"))
}

#[tokio::test(flavor = "current_thread")]
async fn client_and_server_spans_share_the_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("svc.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .layer(GrpcTraceLayer(Side::Server))
        .add_service(health)
        .serve_with_incoming(UnixListenerStream::new(listener));
    let server = tokio::spawn(server);

    let mut client = HealthClient::new(dial(&Addr::Unix(sock)).unwrap());
    let reply = client.check(HealthCheckRequest::default()).await.unwrap();
    assert_eq!(reply.into_inner().status, 1, "SERVING");
    server.abort();

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let client = span(&spans, opentelemetry::trace::SpanKind::Client);
    let server = span(&spans, opentelemetry::trace::SpanKind::Server);
    assert_eq!(
        client.span_context.trace_id(),
        server.span_context.trace_id(),
        "one trace"
    );
    assert_eq!(
        server.parent_span_id,
        client.span_context.span_id(),
        "server is the client's child"
    );
    assert_ne!(client.span_context.span_id(), server.span_context.span_id());
    let status = server
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "rpc.grpc.status_code");
    assert!(status.is_none() || status.unwrap().value.as_str() == "0");
}
