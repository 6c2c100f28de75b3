//! An OTLP/gRPC receiver of traces and metrics for tests and benchmarks: the daemons export to
//! it exactly as they would to a collector, and the test reads back the spans and the names of
//! the metrics each service sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

use crate::Netns;

/// A span as received.
#[derive(Clone, Debug)]
pub struct Span {
    /// The exporting service's `service.name`.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex; empty for a root.
    pub parent: String,
    /// Start and end, in nanoseconds since the epoch.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// String forms of the attributes.
    pub attributes: BTreeMap<String, String>,
}

impl Span {
    /// Its duration.
    pub fn duration(&self) -> Duration {
        Duration::from_nanos(self.end_ns.saturating_sub(self.start_ns))
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

/// `(service.name, metric name)` of every metric received.
#[derive(Clone, Default)]
struct MetricNames(Arc<Mutex<std::collections::BTreeSet<(String, String)>>>);

fn service_of(r: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    r.iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .map(|kv| text(&kv.value))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl MetricsService for MetricNames {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.0.lock().expect("lock");
        for rm in req.into_inner().resource_metrics {
            let service = service_of(&rm.resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    names.insert((service.clone(), m.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("lock");
        for rs in req.into_inner().resource_spans {
            let service = service_of(&rs.resource);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A running receiver.
pub struct Receiver {
    /// `http://127.0.0.1:<port>`, for `OTEL_EXPORTER_OTLP_ENDPOINT` inside the namespace.
    pub endpoint: String,
    spans: Collector,
    metrics: MetricNames,
}

impl Receiver {
    /// Listens on loopback inside `ns` (where the daemons run). Needs a Tokio runtime.
    pub fn start(ns: &Netns) -> Receiver {
        let listener = ns.enter(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let spans = Collector::default();
        let metrics = MetricNames::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(spans.clone()))
            .add_service(MetricsServiceServer::new(metrics.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        Receiver {
            endpoint,
            spans,
            metrics,
        }
    }

    /// `(service, metric)` of every metric received so far.
    pub fn metric_names(&self) -> std::collections::BTreeSet<(String, String)> {
        self.metrics.0.lock().expect("lock").clone()
    }

    /// Everything received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.0.lock().expect("lock").clone()
    }

    /// Waits until `done` holds for the spans received, at most `limit`.
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
