//! Traces (issue 16): `koo serve` exports OTLP spans to a real OTLP/gRPC
//! receiver (the `opentelemetry-proto` crate's `TraceService`) that the test
//! runs on a free port. A submit with a `traceparent` gets a server span of
//! the caller's trace, and the built-in handler's `task.run` span is its
//! child, on the embedded store and on Redis.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::common::tasks::{is_final, submit, wait_task};
use crate::common::{self, EVENT_TIMEOUT, TestRedis};
use koo::pb::tasks::v1 as pb;
use koo::pb::tasks::v1::task_service_client::TaskServiceClient;

/// The caller's span: trace id and span id.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER}-01")
}

/// What the receiver got: spans, and each export's `service.name`.
#[derive(Clone, Default)]
pub struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) if kv.key == "service.name" => Some(s.clone()),
                    _ => None,
                });
            self.services.lock().unwrap().extend(service);
            for ss in rs.scope_spans {
                self.spans.lock().unwrap().extend(ss.spans);
            }
        }
        self.arrived.notify_waiters();
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves OTLP/gRPC on a free loopback port until the test ends.
    pub async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    /// Waits until the spans received satisfy `check`.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let until = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let arrived = self.arrived.notified();
            {
                let spans = self.spans.lock().unwrap();
                if check(&spans) {
                    return spans.clone();
                }
            }
            if tokio::time::timeout_at(until, arrived).await.is_err() {
                panic!("no {what}; spans: {:#?}", self.spans.lock().unwrap());
            }
        }
    }

    /// How many spans arrived so far.
    pub fn count(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}

/// Lower-case hex of an id.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A string attribute of a span.
pub fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

/// `koo serve` exporting to `receiver` with `env`, and a task client.
async fn koo_exporting(
    receiver: SocketAddr,
    env: &[(&str, &str)],
) -> (
    common::ChildGuard,
    TaskServiceClient<tonic::transport::Channel>,
    String,
) {
    let endpoint = format!("http://{receiver}");
    let mut all = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_SERVICE_NAME", "koo-under-test"),
        // export each batch at once: the test waits on the receiver
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
    ];
    all.extend_from_slice(env);
    let (koo, lines) = common::serve_logged(&all);
    let addr = common::logged_addr(&lines, "koo serving gRPC").expect("koo started");
    let client = TaskServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (koo, client, format!("http://{addr}"))
}

/// A SubmitTask of the no-op handler, with `traceparent` metadata.
fn traced_submit(parent: &str) -> Request<pb::SubmitTaskRequest> {
    let mut request = Request::new(submit("koo.diagnostics.noop", serde_json::json!({})));
    request
        .metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    request
}

/// The caller's trace reaches the built-in handler: the SubmitTask server
/// span is a child of the caller's span, the `task.run` span a child of
/// the server span, with the task's attributes and outcome.
async fn submit_to_run(redis: Option<&TestRedis>) {
    let (receiver, at) = Receiver::start().await;
    let url = redis.map(TestRedis::url);
    let env: Vec<(&str, &str)> = url.iter().map(|u| ("REDIS_URL", u.as_str())).collect();
    let (_koo, mut c, _) = koo_exporting(at, &env).await;
    let task = c
        .submit_task(traced_submit(&traceparent()))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert!(
        task.trace_parent.contains(TRACE_ID),
        "{}",
        task.trace_parent
    );
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    let run_name = "task.run koo.diagnostics.noop";
    let spans = receiver
        .wait_for("server and run spans", |spans| {
            spans.iter().any(|s| s.name == run_name)
                && spans
                    .iter()
                    .any(|s| s.name == "koo.tasks.v1.TaskService/SubmitTask")
        })
        .await;
    let server = spans
        .iter()
        .find(|s| s.name == "koo.tasks.v1.TaskService/SubmitTask")
        .unwrap();
    assert_eq!(hex(&server.trace_id), TRACE_ID);
    assert_eq!(hex(&server.parent_span_id), CALLER);
    assert_eq!(attr(server, "rpc.method").as_deref(), Some("SubmitTask"));
    let run = spans.iter().find(|s| s.name == run_name).unwrap();
    assert_eq!(hex(&run.trace_id), TRACE_ID);
    assert_eq!(run.parent_span_id, server.span_id, "task.run's parent");
    assert_eq!(attr(run, "koo.task.id"), Some(task.id.clone()));
    assert_eq!(attr(run, "koo.task.outcome").as_deref(), Some("succeeded"));
    assert_eq!(attr(run, "koo.task.attempt").as_deref(), Some("1"));
    // an error's status is on its span
    let mut missing = Request::new(pb::GetTaskRequest {
        task_id: common::tasks::unknown_task_id(),
    });
    missing
        .metadata_mut()
        .insert("traceparent", traceparent().parse().unwrap());
    assert_eq!(
        c.get_task(missing).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let spans = receiver
        .wait_for("the failed GetTask's span", |spans| {
            spans.iter().any(|s| {
                s.name == "koo.tasks.v1.TaskService/GetTask" && hex(&s.parent_span_id) == CALLER
            })
        })
        .await;
    let failed = spans
        .iter()
        .find(|s| s.name == "koo.tasks.v1.TaskService/GetTask" && hex(&s.parent_span_id) == CALLER)
        .unwrap();
    assert_eq!(attr(failed, "rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(2),
        "error status"
    );
    assert!(
        receiver
            .services
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "koo-under-test")
    );
}

/// On the embedded store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_to_run_memory() {
    submit_to_run(None).await;
}

/// On Redis (the carried context goes through the task hash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_to_run_redis() {
    let redis = TestRedis::start().await;
    submit_to_run(Some(&redis)).await;
}

/// A malformed `traceparent` is ignored: the submit succeeds and its span
/// starts a new trace (no parent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_traceparent_starts_a_new_trace() {
    let (receiver, at) = Receiver::start().await;
    let (_koo, mut c, _) = koo_exporting(at, &[]).await;
    let bad = format!("00-{TRACE_ID}-zz-01");
    let task = c
        .submit_task(traced_submit(&bad))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let spans = receiver
        .wait_for("the submit's span", |spans| {
            spans
                .iter()
                .any(|s| s.name == "koo.tasks.v1.TaskService/SubmitTask")
        })
        .await;
    let server = spans
        .iter()
        .find(|s| s.name == "koo.tasks.v1.TaskService/SubmitTask")
        .unwrap();
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_ne!(hex(&server.trace_id), TRACE_ID);
    // the task carries koo's new trace
    assert!(task.trace_parent.contains(&hex(&server.trace_id)));
}

/// `OTEL_SDK_DISABLED=true` (with an endpoint set): nothing is exported, not
/// even at shutdown, yet the caller's `traceparent` is still carried in the
/// task for an external worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_exports_nothing_but_carries_the_callers_context() {
    let (receiver, at) = Receiver::start().await;
    let (koo, mut c, _) = koo_exporting(at, &[("OTEL_SDK_DISABLED", "true")]).await;
    let task = c
        .submit_task(traced_submit(&traceparent()))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.trace_parent, traceparent());
    let done = wait_task(&mut c, &task.id, is_final).await;
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    // stop koo: an enabled exporter flushes at shutdown
    let mut koo = koo;
    common::tasks::signal(&koo.0, "TERM");
    assert!(common::tasks::exits_within(&mut koo.0, Duration::from_secs(10)).await);
    assert_eq!(receiver.count(), 0, "nothing exported");
}

/// TriggerSchedule carries its call's context: the triggered task's run is
/// a child of the TriggerSchedule server span, in the caller's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggered_schedule_joins_the_callers_trace() {
    use koo::pb::schedule::v1::{self as spb, schedule_service_client::ScheduleServiceClient};
    let (receiver, at) = Receiver::start().await;
    // quiet: serve_logged stops reading koo's log after start-up, and a
    // later log line (CreateSchedule logs at info) would find no reader
    let (_koo, mut c, url) = koo_exporting(at, &[("KOO_LOG", "warn,koo::server=info")]).await;
    let mut schedules = ScheduleServiceClient::connect(url).await.unwrap();
    let schedule = spb::Schedule {
        name: "traced".into(),
        cron: "@daily".into(),
        task: Some(spb::TaskTemplate {
            name: "koo.diagnostics.noop".into(),
            category: pb::TaskCategory::Research as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    schedules
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(schedule),
            paused: false,
        })
        .await
        .unwrap();
    let mut trigger = Request::new(spb::TriggerScheduleRequest {
        name: "traced".into(),
    });
    trigger
        .metadata_mut()
        .insert("traceparent", traceparent().parse().unwrap());
    let task = schedules
        .trigger_schedule(trigger)
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    wait_task(&mut c, &task.id, is_final).await;
    let trigger_name = "koo.schedule.v1.ScheduleService/TriggerSchedule";
    let spans = receiver
        .wait_for("the trigger's and the run's spans", |spans| {
            spans.iter().any(|s| s.name == trigger_name)
                && spans
                    .iter()
                    .any(|s| attr(s, "koo.task.id").as_deref() == Some(task.id.as_str()))
        })
        .await;
    let server = spans.iter().find(|s| s.name == trigger_name).unwrap();
    assert_eq!(hex(&server.parent_span_id), CALLER);
    let run = spans
        .iter()
        .find(|s| attr(s, "koo.task.id").as_deref() == Some(task.id.as_str()))
        .unwrap();
    assert_eq!(hex(&run.trace_id), TRACE_ID);
    assert_eq!(run.parent_span_id, server.span_id);
}
