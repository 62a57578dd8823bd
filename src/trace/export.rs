//! The tracer provider: an OTLP/gRPC exporter behind the SDK's batch
//! processor, whose bounded queue drops spans rather than block a call when
//! the collector is slow or away (`OTEL_BSP_*` tune it), and a bounded flush
//! at shutdown.

use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use super::settings::{Root, Sampling, TraceSettings};

/// How long the final flush may take at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the provider to flush it at shutdown (nothing when export is off).
#[must_use = "flush it with `shutdown` when the process stops"]
#[derive(Debug, Default)]
pub struct TraceGuard(Option<SdkTracerProvider>);

impl TraceGuard {
    /// Exports the spans still queued, waiting at most [`FLUSH_TIMEOUT`].
    pub async fn shutdown(self) {
        let Some(provider) = self.0 else { return };
        // the SDK's shutdown blocks its thread until the flush ends
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT))
                .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "traces: the final export failed"),
            Err(e) => tracing::warn!(error = %e, "traces: the final export panicked"),
        }
    }
}

/// Starts exporting when `settings` names an endpoint (inside the Tokio
/// runtime: the exporter's channel lives there). Called once per process.
pub fn install(settings: &TraceSettings) -> anyhow::Result<TraceGuard> {
    let Some(endpoint) = &settings.endpoint else {
        return Ok(TraceGuard(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .with_context(|| format!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export to {endpoint:?}"))?;
    let resource = Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_attributes(
            settings
                .resource
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .with_service_name(settings.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler(settings.sampling))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("koo");
    anyhow::ensure!(
        super::TRACER.set(tracer).is_ok(),
        "trace export is already installed"
    );
    tracing::info!(%endpoint, service = %settings.service_name, "exporting traces over OTLP");
    Ok(TraceGuard(Some(provider)))
}

/// The SDK's sampler for `sampling`.
fn sampler(sampling: Sampling) -> Sampler {
    let root = match sampling.root {
        Root::AlwaysOn => Sampler::AlwaysOn,
        Root::AlwaysOff => Sampler::AlwaysOff,
        Root::Ratio(r) => Sampler::TraceIdRatioBased(r),
    };
    if sampling.parent_based {
        Sampler::ParentBased(Box::new(root))
    } else {
        root
    }
}
