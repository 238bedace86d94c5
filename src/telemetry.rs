//! Logging and tracing: a `tracing` subscriber writing one event per line to stdout,
//! as JSON or as human-readable text (`lines`), and, when built with the `otlp`
//! feature and asked to by the standard `OTEL_EXPORTER_OTLP_*` environment, each
//! request's span exported over OTLP/HTTP (protobuf), parented to the caller's W3C
//! `traceparent`.

mod lines;

pub use lines::{ACCESS, flush};
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    #[default]
    Pretty,
}

/// One layer of the subscriber.
type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// What must be flushed before the process exits.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
#[derive(Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    traces: Option<otlp::Traces>,
}

impl Telemetry {
    /// Writes out the log lines held back, and flushes spans not yet exported (bounded
    /// by the exporter's own timeout).
    pub fn shutdown(self) {
        flush();
        #[cfg(feature = "otlp")]
        if let Some(traces) = self.traces {
            traces.shutdown();
        }
    }
}

/// Installs the global subscriber. `level` is a level (`info`) or a `RUST_LOG`-style
/// filter (`spillway=debug,hyper=warn`); without one, `RUST_LOG` applies, then `info`.
/// Call it inside the tokio runtime: the flush of held-back lines (and, with the
/// `otlp` feature, the exporter) runs on it.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<Telemetry, String> {
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).map_err(|error| format!("invalid log level {level:?}: {error}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Colour codes only for a person at a terminal, never in a file or a collector's
    // pipe; `NO_COLOR` (no-color.org) turns them off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let json = format == LogFormat::Json;
    let lines: BoxedLayer = tracing_subscriber::fmt::layer()
        .with_writer(lines::Stdout)
        .fmt_fields(lines::SpanFields { json })
        .event_format(lines::Lines { json, colour })
        .boxed();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        // Held-back access lines go out within FLUSH_EVERY, however busy the workers.
        runtime.spawn(async {
            let mut ticks = tokio::time::interval(lines::FLUSH_EVERY);
            loop {
                ticks.tick().await;
                flush();
            }
        });
    }
    #[allow(unused_mut)]
    let mut layers = vec![lines];
    #[allow(unused_mut)]
    let mut telemetry = Telemetry::default();
    #[cfg(feature = "otlp")]
    if let Some((traces, layer)) = otlp::Traces::from_env()? {
        layers.push(layer);
        telemetry.traces = Some(traces);
    }
    tracing_subscriber::registry().with(layers).with(filter).try_init().map_err(|error| error.to_string())?;
    Ok(telemetry)
}

/// Makes `span` a child of the trace the caller's `traceparent` header names, when
/// spans are exported; otherwise does nothing.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otlp")]
    otlp::continue_trace(span, headers);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, headers);
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::{propagation::TextMapPropagator, trace::TracerProvider as _};
    use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
    use opentelemetry_sdk::{
        Resource,
        propagation::TraceContextPropagator,
        runtime,
        trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;

    /// How long the exit waits for the last spans to be exported.
    const FLUSH_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(2);

    /// The exporter's pipeline, kept to flush it at exit.
    pub struct Traces(SdkTracerProvider);

    impl Traces {
        /// Export is on when an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
        /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not `true`;
        /// every other `OTEL_*` variable is read by the exporter itself.
        pub fn from_env() -> Result<Option<(Self, super::BoxedLayer)>, String> {
            let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
            let disabled =
                std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value.eq_ignore_ascii_case("true"));
            if disabled || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            {
                return Ok(None);
            }
            let exporter = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .build()
                .map_err(|error| format!("OTLP exporter: {error}"))?;
            let processor = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(Resource::builder().with_service_name("spillway").build())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("spillway")).boxed();
            Ok(Some((Self(provider), layer)))
        }

        /// Flushes what is buffered, waiting at most [`FLUSH_AT_EXIT`] for the
        /// collector: an unreachable one must not hold up the exit. The flush runs on
        /// a thread of its own, since the SDK's own bound does not cover an export
        /// already waiting on a silent collector.
        pub fn shutdown(self) {
            let (done, finished) = std::sync::mpsc::channel();
            let provider = self.0;
            std::thread::spawn(move || {
                let _ = done.send(provider.shutdown_with_timeout(FLUSH_AT_EXIT));
            });
            match finished.recv_timeout(FLUSH_AT_EXIT) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("warning: could not flush OTLP spans: {error}"),
                Err(_) => eprintln!(
                    "warning: the OTLP collector did not take the last spans within {FLUSH_AT_EXIT:?}"
                ),
            }
        }
    }

    /// Parents `span` to the W3C trace context in `headers`, if there is one.
    pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
        if !headers.contains_key("traceparent") {
            return;
        }
        let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        // Fails only when the span is not exported (filtered out): nothing to parent.
        let _ = span.set_parent(context);
    }

    struct HeaderExtractor<'a>(&'a http::HeaderMap);

    impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|value| value.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
}
