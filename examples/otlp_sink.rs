//! A minimal OTLP/gRPC trace receiver: counts the spans it is sent and
//! prints each span (`--print`) or a count per second. For trying koo's
//! trace export without a collector, and for measuring export's cost
//! (README, Traces):
//!
//! ```text
//! cargo run --example otlp_sink -- 127.0.0.1:4317 --print
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 koo serve
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

/// The spans received, and whether to print them.
struct Sink {
    spans: Arc<AtomicU64>,
    print: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                self.spans.fetch_add(1, Relaxed);
                if self.print {
                    let attrs: Vec<String> = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            format!(
                                "{}={:?}",
                                kv.key,
                                kv.value.as_ref().and_then(|v| v.value.clone())
                            )
                        })
                        .collect();
                    println!(
                        "trace={} span={} parent={} {:.3}ms {:?} [{}] {service}",
                        hex(&span.trace_id),
                        hex(&span.span_id),
                        if span.parent_span_id.is_empty() {
                            "-".to_owned()
                        } else {
                            hex(&span.parent_span_id)
                        },
                        span.end_time_unix_nano
                            .saturating_sub(span.start_time_unix_nano)
                            as f64
                            / 1e6,
                        span.name,
                        attrs.join(" "),
                    );
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4317".to_owned());
    let print = args.any(|a| a == "--print");
    let spans = Arc::new(AtomicU64::new(0));
    if !print {
        let spans = spans.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = spans.load(Relaxed);
                if now != last {
                    eprintln!("{now} spans ({}/s)", now - last);
                    last = now;
                }
            }
        });
    }
    eprintln!("OTLP/gRPC receiver on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Sink { spans, print }))
        .serve(addr.parse()?)
        .await?;
    Ok(())
}
