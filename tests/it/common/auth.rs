//! Helpers for the authentication tests: keys files, clients of every
//! service sending one bearer key, and one call per service by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use koo::auth::keys::digest;
use koo::pb::cache::v1::{self as cpb, cache_service_client::CacheServiceClient};
use koo::pb::schedule::v1::{self as spb, schedule_service_client::ScheduleServiceClient};
use koo::pb::tasks::v1::{self as tpb, task_service_client::TaskServiceClient};
use koo::pb::worker::v1::{self as wpb, worker_service_client::WorkerServiceClient};
use koo::server::Settings;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use super::TestServer;
use super::tasks::{Backend, Koo, start_on_with, submit};

pub const READER: &str = "koo_reader-key-for-tests-0000000000000000000";
pub const WRITER: &str = "koo_writer-key-for-tests-0000000000000000000";
pub const ADMIN: &str = "koo_admin-key-for-tests-00000000000000000000";
pub const WORKER: &str = "koo_worker-key-for-tests-0000000000000000000";
pub const PDF_WORKER: &str = "koo_pdf-worker-key-for-tests-000000000000000";

/// A `[[key]]` entry for `key`.
pub fn entry(name: &str, role: &str, key: &str, extra: &str) -> String {
    format!(
        "[[key]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n{extra}\n",
        hex::encode(digest(key.as_bytes()))
    )
}

/// The keys file of most tests: one key per role, and a worker key scoped
/// to the pdf_processing queue.
pub fn all_roles() -> String {
    [
        entry("ci-reader", "reader", READER, ""),
        entry("ci-writer", "writer", WRITER, ""),
        entry("ci-admin", "admin", ADMIN, ""),
        entry("ci-worker", "worker", WORKER, ""),
        entry(
            "pdf-worker",
            "worker",
            PDF_WORKER,
            "queues = [\"pdf_processing\"]",
        ),
    ]
    .concat()
}

/// A keys file in a temporary directory.
pub struct KeysFile {
    pub dir: tempfile::TempDir,
}

impl KeysFile {
    pub fn new(text: &str) -> Self {
        let file = KeysFile {
            dir: tempfile::tempdir().unwrap(),
        };
        file.write(text);
        file
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// Replaces the file as a secret rotation does: a new file renamed over
    /// the old (a new inode, so the change is seen whatever the clock).
    pub fn write(&self, text: &str) {
        let tmp = self.dir.path().join("keys.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }
}

/// koo on the embedded store with `keys` as its keys file, no built-in
/// workers (tests lease tasks themselves), the keys file polled often.
pub async fn start(keys: &Path, adjust: impl FnOnce(&mut Settings)) -> Koo {
    let path = keys.to_owned();
    start_on_with(Backend::Memory, 0, move |s| {
        s.auth.file = Some(path);
        s.auth.reload_interval = Duration::from_millis(50);
        s.schedule.enabled = false;
        adjust(s);
    })
    .await
}

/// Adds `authorization: Bearer <key>` to every call (no header for `None`).
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

pub fn bearer(key: Option<&str>) -> Bearer {
    Bearer(key.map(|k| format!("Bearer {k}").parse().unwrap()))
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// Clients of every service, all sending one key.
pub struct Clients {
    pub cache: CacheServiceClient<Authed>,
    pub tasks: TaskServiceClient<Authed>,
    pub schedules: ScheduleServiceClient<Authed>,
    pub workers: WorkerServiceClient<Authed>,
}

pub fn clients(server: &TestServer, key: Option<&str>) -> Clients {
    let ch = server.channel.clone();
    Clients {
        cache: CacheServiceClient::with_interceptor(ch.clone(), bearer(key)),
        tasks: TaskServiceClient::with_interceptor(ch.clone(), bearer(key)),
        schedules: ScheduleServiceClient::with_interceptor(ch.clone(), bearer(key)),
        workers: WorkerServiceClient::with_interceptor(ch, bearer(key)),
    }
}

/// Makes the named call with `c`; only its status matters.
pub async fn call(c: &mut Clients, rpc: &str) -> Result<(), Status> {
    match rpc {
        "cache.Get" => c
            .cache
            .get(cpb::GetRequest {
                key: "k".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        "cache.Set" => c
            .cache
            .set(cpb::SetRequest {
                key: "k".into(),
                value: Some(cpb::CacheValue {
                    kind: Some(cpb::cache_value::Kind::Text("v".into())),
                }),
                ..Default::default()
            })
            .await
            .map(drop),
        "cache.ClearLevel" => c
            .cache
            .clear_level(cpb::ClearLevelRequest {
                level: cpb::CacheLevel::App as i32,
            })
            .await
            .map(drop),
        "tasks.GetTaskMetrics" => c
            .tasks
            .get_task_metrics(tpb::GetTaskMetricsRequest {})
            .await
            .map(drop),
        "tasks.GetTask" => c
            .tasks
            .get_task(tpb::GetTaskRequest {
                task_id: super::tasks::unknown_task_id(),
            })
            .await
            .map(drop),
        "tasks.SubmitTask" => c
            .tasks
            .submit_task(submit("koo.tests.noop", serde_json::json!({})))
            .await
            .map(drop),
        "tasks.CleanupTasks" => c
            .tasks
            .cleanup_tasks(tpb::CleanupTasksRequest::default())
            .await
            .map(drop),
        "schedule.ListSchedules" => c
            .schedules
            .list_schedules(spb::ListSchedulesRequest::default())
            .await
            .map(drop),
        "schedule.DeleteSchedule" => c
            .schedules
            .delete_schedule(spb::DeleteScheduleRequest {
                name: "no-such-schedule".into(),
            })
            .await
            .map(drop),
        "worker.ListWorkers" => c
            .workers
            .list_workers(wpb::ListWorkersRequest::default())
            .await
            .map(drop),
        "worker.LeaseTask" => c
            .workers
            .lease_task(wpb::LeaseTaskRequest {
                worker_name: "w".into(),
                queues: vec!["research".into()],
                ..Default::default()
            })
            .await
            .map(drop),
        other => panic!("no call {other}"),
    }
}

/// Whether the auth layer let the call through (the handler may still
/// have refused it: an unknown task or schedule is NOT_FOUND).
pub fn passed(r: &Result<(), Status>) -> bool {
    !matches!(r, Err(s) if matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated))
}
