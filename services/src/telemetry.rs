//! Logging through `tracing`, OpenTelemetry spans exported over OTLP/gRPC when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and W3C trace
//! context carried in gRPC metadata by [`GrpcTraceLayer`] on the client and the server side.
//!
//! Spans always get OpenTelemetry ids, exported or not, so that a service without an exporter
//! still passes its callers' trace on to its peers.

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use opentelemetry::trace::SpanKind;

/// The installed telemetry pipeline; [`Telemetry::shutdown`] flushes spans not yet exported.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Whether the environment asks for `signal` (`TRACES`, `METRICS`) to be exported over OTLP: an
/// endpoint set (`OTEL_EXPORTER_OTLP_ENDPOINT` or the signal's own), the SDK not disabled, and
/// `OTEL_<signal>_EXPORTER` unset or `otlp`.
pub(crate) fn otlp_requested(signal: &str) -> bool {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter = var(&format!("OTEL_{signal}_EXPORTER")).unwrap_or_else(|| "otlp".into());
    let endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || var(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some();
    !disabled && exporter == "otlp" && endpoint
}

/// The tracer provider of service `service`: exporting in batches over OTLP/gRPC when asked to,
/// exporting nothing otherwise. Must be called inside a Tokio runtime.
pub fn tracer_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    if otlp_requested("TRACES") {
        if let Ok(p) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
            && p != "grpc"
        {
            anyhow::bail!("OTEL_EXPORTER_OTLP_PROTOCOL={p}: Volant exports OTLP over grpc only");
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

impl Telemetry {
    /// Installs the global subscriber: log lines on stderr filtered by `RUST_LOG` (default
    /// `info`), and OpenTelemetry spans. Must be called inside a Tokio runtime.
    pub fn init(service: &'static str) -> anyhow::Result<Telemetry> {
        let provider = tracer_provider(service)?;
        // The data planes' spans ([`DataSpan`]) come from the global provider.
        opentelemetry::global::set_tracer_provider(provider.clone());
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // RUST_LOG filters the log lines only; spans reach OpenTelemetry whatever it says, so a
        // quiet service still carries its callers' traces.
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_filter(filter),
            )
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer(service))
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
            .try_init()?;
        Ok(Telemetry { provider })
    }

    /// Exports what is still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("telemetry shutdown: {e}");
        }
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The gRPC metadata key that names the VM a call is about; the trace layer records it on the
/// call's spans (client and server) as the `vm` attribute.
pub const VM_KEY: &str = "volant-vm";

/// Names the VM a call is about, for the trace (see [`VM_KEY`]).
pub fn about_vm<T>(req: &mut tonic::Request<T>, vm: &str) {
    if let Ok(v) = vm.parse() {
        req.metadata_mut().insert(VM_KEY, v);
    }
}

/// The outcome attribute of a gRPC status code: `ok`, or the code's name.
fn outcome(code: &str) -> String {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "ok".into(),
        Ok(c) => format!("{c:?}"),
        Err(_) => code.into(),
    }
}

/// Makes `span` continue the W3C trace context found in `headers` (a request without one starts
/// a new trace).
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// A span of a data plane (a request proxied, an egress decision), made with OpenTelemetry
/// directly: a `tracing` span costs proxyd's ingress several microseconds of CPU per request
/// more. It ends when dropped.
pub struct DataSpan(opentelemetry::global::BoxedSpan);

impl DataSpan {
    /// Starts span `name` of `kind` with `attributes`, continuing the W3C trace context in
    /// `parent` (none: a trace of its own).
    pub fn start(
        name: String,
        kind: SpanKind,
        parent: &http::HeaderMap,
        attributes: Vec<opentelemetry::KeyValue>,
    ) -> DataSpan {
        use opentelemetry::trace::Tracer as _;
        let tracer = opentelemetry::global::tracer("volant");
        let cx = if parent.is_empty() {
            opentelemetry::Context::new()
        } else {
            TraceContextPropagator::new().extract(&HeaderExtractor(parent))
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&tracer, &cx);
        DataSpan(span)
    }

    /// Sets an attribute.
    pub fn set(&mut self, attribute: opentelemetry::KeyValue) {
        use opentelemetry::trace::Span as _;
        self.0.set_attribute(attribute);
    }

    /// Marks the span failed.
    pub fn failed(&mut self, why: String) {
        use opentelemetry::trace::Span as _;
        self.0.set_status(opentelemetry::trace::Status::error(why));
    }
}

/// Writes the W3C trace context of `span` into `headers`.
pub fn inject_trace(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Which end of a call a [`GrpcTraceLayer`] sits on.
#[derive(Clone, Copy, Debug)]
pub enum Side {
    /// Injects the current span's context into the outgoing request.
    Client,
    /// Continues the trace found in the incoming request.
    Server,
}

/// A tower layer that wraps every gRPC call in a span named `<service>/<method>` and carries W3C
/// trace context (`traceparent`, `tracestate`) across the wire.
#[derive(Clone, Copy, Debug)]
pub struct GrpcTraceLayer(pub Side);

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> GrpcTrace<S> {
        GrpcTrace {
            inner,
            side: self.0,
        }
    }
}

/// The service made by [`GrpcTraceLayer`].
#[derive(Clone, Debug)]
pub struct GrpcTrace<S> {
    inner: S,
    side: Side,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for GrpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let kind = match self.side {
            Side::Client => "client",
            Side::Server => "server",
        };
        let vm = req
            .headers()
            .get(VM_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path,
            otel.kind = kind,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            outcome = tracing::field::Empty,
            vm = tracing::field::Empty,
        );
        if !vm.is_empty() {
            span.record("vm", vm.as_str());
        }
        match self.side {
            Side::Client => inject_trace(&span, req.headers_mut()),
            Side::Server => continue_trace(&span, req.headers()),
        }
        let call = self.inner.call(req);
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = call.await;
                if let Ok(res) = &result {
                    // Unary errors travel as trailers-only responses: the status is a header.
                    if let Some(code) = res
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                    {
                        recorder.record("rpc.grpc.status_code", code);
                        recorder.record("outcome", outcome(code).as_str());
                        if code != "0" {
                            recorder.record("otel.status_code", "ERROR");
                        }
                    } else {
                        // Errors of unary calls come as headers (trailers-only); an answer
                        // without one is a success (a stream's end status is not waited for).
                        recorder.record("rpc.grpc.status_code", "0");
                        recorder.record("outcome", "ok");
                    }
                } else {
                    recorder.record("otel.status_code", "ERROR");
                    recorder.record("outcome", "transport error");
                }
                result
            }
            .instrument(span),
        )
    }
}
