//! Metrics through OpenTelemetry: exported over OTLP/gRPC beside the spans when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`) is set and
//! `OTEL_METRICS_EXPORTER` is unset or `otlp`, every `OTEL_METRIC_EXPORT_INTERVAL` ms (default
//! 60 s), and served in Prometheus' text format at
//! `GET /metrics` on a service's `metrics_listen` address when one is configured.
//!
//! Services record through [`meter`]; instruments made before [`Metrics::init`] record nothing.
//! Names follow OpenTelemetry's semantic conventions where one exists
//! (`http.server.request.duration`); Volant's own are under `volant.`. The Prometheus names are
//! the usual translation: dots to underscores, the unit as a suffix (`_seconds`, `_bytes`),
//! `_total` on counters.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
pub use opentelemetry::KeyValue;
use opentelemetry::Value;
pub use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
};

use crate::addr::Addr;

/// The meter every Volant instrument comes from.
pub fn meter() -> Meter {
    opentelemetry::global::meter("volant")
}

/// Histogram bounds for request latencies, in seconds (OpenTelemetry's for HTTP servers).
pub const REQUEST_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Histogram bounds for operations that may take minutes (a VM's boot under emulation).
pub const OPERATION_SECONDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The method as OpenTelemetry records it: a known method, else `_OTHER` (a client may send
/// any token; each must not become a series of its own).
pub fn http_method(m: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    KNOWN.into_iter().find(|k| *k == m).unwrap_or("_OTHER")
}

/// Connections the metrics endpoint serves at once.
const MAX_SCRAPERS: usize = 16;

/// The installed meter provider and, when a Prometheus endpoint is wanted, the reader it scrapes.
pub struct Metrics {
    provider: SdkMeterProvider,
    scrape: Option<Scrape>,
}

/// A [`ManualReader`] shared between the provider and the Prometheus endpoint.
#[derive(Clone, Debug)]
struct Scrape(Arc<ManualReader>);

impl MetricReader for Scrape {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

impl Metrics {
    /// Installs the global meter provider of service `service`: exporting over OTLP when the
    /// environment asks for it, scraped by [`Metrics::serve`] when `prometheus`. Must be called
    /// inside a Tokio runtime.
    pub fn init(service: &'static str, prometheus: bool) -> anyhow::Result<Metrics> {
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let mut builder = SdkMeterProvider::builder().with_resource(resource.build());
        if crate::telemetry::otlp_requested("METRICS") {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()?;
            builder = builder.with_periodic_exporter(exporter);
        }
        let scrape = prometheus.then(|| Scrape(Arc::new(ManualReader::builder().build())));
        if let Some(s) = &scrape {
            builder = builder.with_reader(s.clone());
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Ok(Metrics { provider, scrape })
    }

    /// Every instrument's current value in Prometheus' text format (version 0.0.4); empty when
    /// no Prometheus endpoint was asked for.
    pub fn render(&self) -> String {
        let Some(scrape) = &self.scrape else {
            return String::new();
        };
        let mut rm = ResourceMetrics::default();
        if let Err(e) = scrape.collect(&mut rm) {
            tracing::warn!("metrics: collecting failed: {e}");
        }
        prometheus_text(&rm)
    }

    /// Serves `GET /metrics` on `addr` until the process ends; every other path is 404, every
    /// other method 405. A connection has 5 s to send its head and 30 s in all, and at most 16
    /// are served at once. Must be called inside a Tokio runtime.
    pub fn serve(self: Arc<Self>, addr: &Addr) -> anyhow::Result<()> {
        let listener = crate::daemon::bind(addr)?;
        tracing::info!(listen = %addr, "metrics served at /metrics");
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
        tokio::spawn(async move {
            loop {
                let io = match listener.accept().await {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::warn!("metrics: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Past the cap a connection is closed at once: scrapers are few.
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let me = self.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(me.answer(&req)) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(hyper_util::rt::TokioIo::new(io), service);
                    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                });
            }
        });
        Ok(())
    }

    fn answer<B>(&self, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
        let reply = |status: http::StatusCode, body: String| {
            http::Response::builder()
                .status(status)
                .header(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(Full::new(Bytes::from(body)))
                .expect("a valid response")
        };
        if req.uri().path() != "/metrics" {
            return reply(
                http::StatusCode::NOT_FOUND,
                "only /metrics is served here\n".into(),
            );
        }
        if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
            let mut r = reply(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "/metrics answers GET\n".into(),
            );
            r.headers_mut().insert(
                http::header::ALLOW,
                http::HeaderValue::from_static("GET, HEAD"),
            );
            return r;
        }
        reply(http::StatusCode::OK, self.render())
    }

    /// Exports what is not yet exported and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!("metrics shutdown: {e}");
        }
    }
}

/// A name Prometheus accepts: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The Prometheus name of an instrument: its name, its unit's suffix, `_total` on counters.
fn prometheus_name(name: &str, unit: &str, counter: bool) -> String {
    let mut out = sanitize(name);
    let suffix = match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push('_');
        out.push_str(suffix);
    }
    if counter {
        out.push_str("_total");
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.as_str().to_string(),
        other => other.to_string(),
    }
}

/// `{k="v",...}` from attributes and extra pairs; empty when there are none.
fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, extra: &[(&str, String)]) -> String {
    let mut pairs: Vec<(String, String)> = attrs
        .map(|kv| (sanitize(kv.key.as_str()), value_text(&kv.value)))
        .collect();
    pairs.sort();
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        v.to_string()
    }
}

trait AsF64: Copy {
    fn as_f64(self) -> f64;
}

impl AsF64 for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

impl AsF64 for u64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl AsF64 for i64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

fn write_data<T: AsF64>(
    out: &mut String,
    name: &str,
    unit: &str,
    help: &str,
    data: &MetricData<T>,
) {
    let head = |out: &mut String, full: &str, kind: &str| {
        if !help.is_empty() {
            let _ = writeln!(out, "# HELP {full} {}", help.replace('\n', " "));
        }
        let _ = writeln!(out, "# TYPE {full} {kind}");
    };
    match data {
        MetricData::Gauge(g) => {
            let full = prometheus_name(name, unit, false);
            head(out, &full, "gauge");
            for p in g.data_points() {
                let _ = writeln!(
                    out,
                    "{full}{} {}",
                    labels(p.attributes(), &[]),
                    number(p.value().as_f64())
                );
            }
        }
        MetricData::Sum(s) => {
            let monotonic = s.is_monotonic();
            let full = prometheus_name(name, unit, monotonic);
            head(out, &full, if monotonic { "counter" } else { "gauge" });
            for p in s.data_points() {
                let _ = writeln!(
                    out,
                    "{full}{} {}",
                    labels(p.attributes(), &[]),
                    number(p.value().as_f64())
                );
            }
        }
        MetricData::Histogram(h) => {
            let full = prometheus_name(name, unit, false);
            head(out, &full, "histogram");
            for p in h.data_points() {
                let mut seen = 0u64;
                let bounds = p.bounds().map(number).chain(["+Inf".to_string()]);
                for (le, count) in bounds.zip(p.bucket_counts()) {
                    seen += count;
                    let l = labels(p.attributes(), &[("le", le)]);
                    let _ = writeln!(out, "{full}_bucket{l} {seen}");
                }
                let l = labels(p.attributes(), &[]);
                let _ = writeln!(out, "{full}_sum{l} {}", number(p.sum().as_f64()));
                let _ = writeln!(out, "{full}_count{l} {}", p.count());
            }
        }
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// The text format of everything collected: a `target_info` line with the resource, then each
/// instrument with its `HELP` and `TYPE`.
fn prometheus_text(rm: &ResourceMetrics) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# HELP target_info The exporting service.");
    let _ = writeln!(out, "# TYPE target_info gauge");
    let resource: Vec<KeyValue> = rm
        .resource()
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    let _ = writeln!(out, "target_info{} 1", labels(resource.iter(), &[]));
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            let (name, unit, help) = (m.name(), m.unit(), m.description());
            match m.data() {
                AggregatedMetrics::F64(d) => write_data(&mut out, name, unit, help, d),
                AggregatedMetrics::U64(d) => write_data(&mut out, name, unit, help, d),
                AggregatedMetrics::I64(d) => write_data(&mut out, name, unit, help, d),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> (SdkMeterProvider, Scrape) {
        let scrape = Scrape(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(Resource::builder().with_service_name("test").build())
            .with_reader(scrape.clone())
            .build();
        (provider, scrape)
    }

    fn render(scrape: &Scrape) -> String {
        let mut rm = ResourceMetrics::default();
        scrape.collect(&mut rm).unwrap();
        prometheus_text(&rm)
    }

    #[test]
    fn names_units_and_kinds() {
        assert_eq!(
            prometheus_name("http.server.request.duration", "s", false),
            "http_server_request_duration_seconds"
        );
        assert_eq!(
            prometheus_name("volant.proxy.egress.io", "By", true),
            "volant_proxy_egress_io_bytes_total"
        );
        assert_eq!(prometheus_name("volant.vms", "{vm}", false), "volant_vms");
        assert_eq!(sanitize("9a-b"), "_9a_b");
    }

    #[test]
    fn counters_gauges_and_histograms_in_text() {
        use opentelemetry::metrics::MeterProvider as _;
        let (provider, scrape) = provider();
        let meter = provider.meter("volant");
        let c = meter
            .u64_counter("volant.things")
            .with_description("Things.")
            .build();
        c.add(2, &[KeyValue::new("reason", "a \"quoted\"\nline")]);
        let h = meter
            .f64_histogram("volant.op.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        h.record(0.05, &[KeyValue::new("op", "create")]);
        h.record(0.5, &[KeyValue::new("op", "create")]);
        h.record(5.0, &[KeyValue::new("op", "create")]);
        let _g = meter
            .i64_observable_gauge("volant.pool.size")
            .with_callback(|o| o.observe(155, &[KeyValue::new("volant.pool", "volant0")]))
            .build();
        let text = render(&scrape);
        for want in [
            "target_info{service_name=\"test\"",
            "# HELP volant_things_total Things.",
            "# TYPE volant_things_total counter",
            "volant_things_total{reason=\"a \\\"quoted\\\"\\nline\"} 2",
            "# TYPE volant_op_duration_seconds histogram",
            "volant_op_duration_seconds_bucket{op=\"create\",le=\"0.1\"} 1",
            "volant_op_duration_seconds_bucket{op=\"create\",le=\"1\"} 2",
            "volant_op_duration_seconds_bucket{op=\"create\",le=\"+Inf\"} 3",
            "volant_op_duration_seconds_sum{op=\"create\"} 5.55",
            "volant_op_duration_seconds_count{op=\"create\"} 3",
            "# TYPE volant_pool_size gauge",
            "volant_pool_size{volant_pool=\"volant0\"} 155",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }

    #[test]
    fn the_endpoint_serves_only_get_metrics() {
        let (provider, scrape) = provider();
        let m = Metrics {
            provider,
            scrape: Some(scrape),
        };
        let req = |method: &str, path: &str| {
            http::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        assert_eq!(m.answer(&req("GET", "/metrics")).status(), 200);
        assert_eq!(m.answer(&req("GET", "/")).status(), 404);
        assert_eq!(m.answer(&req("GET", "/metrics/../x")).status(), 404);
        let post = m.answer(&req("POST", "/metrics"));
        assert_eq!(post.status(), 405);
        assert_eq!(post.headers()["allow"], "GET, HEAD");
    }

    #[tokio::test]
    async fn idle_connections_cannot_shut_the_endpoint_out_for_long() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.sock");
        let (provider, scrape) = provider();
        let m = Arc::new(Metrics {
            provider,
            scrape: Some(scrape),
        });
        m.serve(&Addr::Unix(path.clone())).unwrap();
        let mut idle = Vec::new();
        for _ in 0..MAX_SCRAPERS {
            idle.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "past the cap a connection is closed at once"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("target_info"), "{answer}");
    }
}
