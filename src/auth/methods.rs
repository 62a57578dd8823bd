//! The one table of what each RPC needs: its role and whether it is unary
//! or streaming, one explicit row per RPC of every service koo serves.
//!
//! No name patterns: `DeleteSchedule` is an admin's although `Delete` is a
//! writer's. A test walks every method of every descriptor set koo serves,
//! so that a new RPC without a row (or a row without an RPC) fails the
//! tests; README.md prints this table (another test compares them).

use std::collections::HashMap;
use std::sync::LazyLock;

use super::Role;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (grpc.health.v1: probes carry no credentials).
    Open,
    /// Server reflection: per `KOO_REFLECTION` (any key, open, or not
    /// served).
    Reflection,
    /// This role or one above it (`Worker` only: the worker role).
    Role(Role),
    /// A reader (or above) or a worker: `GetTask` (a worker reads its
    /// dependencies' results), `ListWorkers` and `GetCaller`.
    ReaderOrWorker,
}

impl Access {
    /// Whether a caller with `role` may make the call (`Open` and
    /// `Reflection` are decided before a caller is needed).
    pub fn allows(self, role: Role) -> bool {
        match self {
            Access::Open | Access::Reflection => true,
            Access::Role(Role::Worker) => role == Role::Worker,
            Access::Role(need) => role != Role::Worker && role >= need,
            Access::ReaderOrWorker => true,
        }
    }

    /// How README.md and refusals name it.
    pub fn label(self) -> &'static str {
        match self {
            Access::Open => "open",
            Access::Reflection => {
                "reader or worker (KOO_REFLECTION=on), open (public) or not served (off)"
            }
            Access::Role(r) => r.as_str(),
            Access::ReaderOrWorker => "reader or worker",
        }
    }
}

/// How the call's messages flow (load shedding counts unary calls only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses.
    ServerStreaming,
    /// Streams both ways.
    Bidi,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStreaming => "server stream",
            Kind::Bidi => "bidi stream",
        }
    }
}

/// One RPC's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// `/package.Service/Method`, the HTTP/2 path.
    pub path: &'static str,
    /// What it needs.
    pub access: Access,
    /// Unary or streaming.
    pub kind: Kind,
}

impl Method {
    /// Whether a (role-checked) call of this method is written to the audit
    /// log.
    pub fn audited(&self) -> bool {
        self.access == Access::Role(Role::Admin)
    }
}

const fn row(path: &'static str, access: Access, kind: Kind) -> Method {
    Method { path, access, kind }
}

use Access::{Open, ReaderOrWorker, Reflection};
use Kind::{Bidi, ServerStreaming as Stream, Unary};
const READER: Access = Access::Role(Role::Reader);
const WRITER: Access = Access::Role(Role::Writer);
const ADMIN: Access = Access::Role(Role::Admin);
const WORKER: Access = Access::Role(Role::Worker);

/// Every RPC koo serves.
#[rustfmt::skip]
pub const METHODS: &[Method] = &[
    row("/koo.cache.v1.CacheService/Get", READER, Unary),
    row("/koo.cache.v1.CacheService/Set", WRITER, Unary),
    row("/koo.cache.v1.CacheService/Delete", WRITER, Unary),
    row("/koo.cache.v1.CacheService/GetMany", READER, Unary),
    row("/koo.cache.v1.CacheService/SetMany", WRITER, Unary),
    row("/koo.cache.v1.CacheService/DeleteMany", WRITER, Unary),
    row("/koo.cache.v1.CacheService/ListKeys", READER, Unary),
    row("/koo.cache.v1.CacheService/ClearLevel", ADMIN, Unary),
    row("/koo.cache.v1.CacheService/GetHealth", READER, Unary),
    row("/koo.cache.v1.CacheService/GetMetrics", READER, Unary),
    row("/koo.cache.v1.CacheService/WatchMetrics", READER, Stream),
    row("/koo.cache.v1.CacheService/StartMaintenance", ADMIN, Unary),
    row("/koo.cache.v1.CacheService/Warm", WRITER, Unary),
    row("/koo.cache.v1.CacheService/Cleanup", ADMIN, Unary),
    row("/koo.cache.v1.CacheService/InvalidateTags", WRITER, Unary),
    row("/koo.cache.v1.CacheService/GetOrLock", WRITER, Unary),
    row("/koo.cache.v1.CacheService/Fill", WRITER, Unary),
    row("/koo.cache.v1.CacheService/GetOrCompute", WRITER, Unary),
    row("/koo.cache.v1.CacheService/WatchInvalidations", READER, Stream),
    row("/koo.tasks.v1.TaskService/SubmitTask", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/SubmitTasks", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/GetTask", ReaderOrWorker, Unary),
    row("/koo.tasks.v1.TaskService/WatchTask", READER, Stream),
    row("/koo.tasks.v1.TaskService/GetTaskMetrics", READER, Unary),
    row("/koo.tasks.v1.TaskService/WatchTaskMetrics", READER, Stream),
    row("/koo.tasks.v1.TaskService/SubmitAiQuery", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/SubmitHealthCheck", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/ListActiveTasks", READER, Unary),
    row("/koo.tasks.v1.TaskService/ListTaskHistory", READER, Unary),
    row("/koo.tasks.v1.TaskService/WatchTasks", READER, Stream),
    row("/koo.tasks.v1.TaskService/CancelTask", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/RetryTask", WRITER, Unary),
    row("/koo.tasks.v1.TaskService/CleanupTasks", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/RequeueDeadLetters", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/PauseQueue", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/ResumeQueue", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/ListQueues", READER, Unary),
    row("/koo.tasks.v1.TaskService/SetRateLimit", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/GetRateLimit", READER, Unary),
    row("/koo.tasks.v1.TaskService/ListRateLimits", READER, Unary),
    row("/koo.tasks.v1.TaskService/DeleteRateLimit", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/SetConcurrencyLimit", ADMIN, Unary),
    row("/koo.tasks.v1.TaskService/GetConcurrencyLimit", READER, Unary),
    row("/koo.tasks.v1.TaskService/ListConcurrencyLimits", READER, Unary),
    row("/koo.tasks.v1.TaskService/DeleteConcurrencyLimit", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/CreateSchedule", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/GetSchedule", READER, Unary),
    row("/koo.schedule.v1.ScheduleService/ListSchedules", READER, Unary),
    row("/koo.schedule.v1.ScheduleService/UpdateSchedule", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/PauseSchedule", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/ResumeSchedule", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/DeleteSchedule", ADMIN, Unary),
    row("/koo.schedule.v1.ScheduleService/TriggerSchedule", ADMIN, Unary),
    row(WORK, WORKER, Bidi),
    row("/koo.worker.v1.WorkerService/LeaseTask", WORKER, Unary),
    row("/koo.worker.v1.WorkerService/HeartbeatTask", WORKER, Unary),
    row("/koo.worker.v1.WorkerService/ReportProgress", WORKER, Unary),
    row("/koo.worker.v1.WorkerService/CompleteTask", WORKER, Unary),
    row("/koo.worker.v1.WorkerService/FailTask", WORKER, Unary),
    row("/koo.worker.v1.WorkerService/ListWorkers", ReaderOrWorker, Unary),
    row("/koo.auth.v1.AuthService/GetCaller", ReaderOrWorker, Unary),
    row("/grpc.health.v1.Health/Check", Open, Unary),
    row("/grpc.health.v1.Health/Watch", Open, Stream),
    row("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Reflection, Bidi),
    row("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Reflection, Bidi),
];

/// WorkerService's path prefix (`KOO_WORKER_TOKEN` alone guards it).
pub const WORKER_SERVICE: &str = "/koo.worker.v1.WorkerService/";
/// A worker's session, the one stream whose credentials are checked again
/// while it lasts ([`super::Recheck`]).
pub const WORK: &str = "/koo.worker.v1.WorkerService/Work";

/// grpc.health.v1's path prefix (never refused, never shed).
pub const HEALTH_SERVICE: &str = "/grpc.health.v1.Health/";

static BY_PATH: LazyLock<HashMap<&'static str, &'static Method>> =
    LazyLock::new(|| METHODS.iter().map(|m| (m.path, m)).collect());

/// The row of the RPC at `path` (`None`: no such RPC).
pub fn find(path: &str) -> Option<&'static Method> {
    BY_PATH.get(path).copied()
}

/// The table as Markdown, for README.md.
pub fn markdown() -> String {
    let mut out = String::from("| RPC | role needed | kind |\n|---|---|---|\n");
    for m in METHODS {
        let name = m.path.trim_start_matches('/');
        out.push_str(&format!(
            "| `{name}` | {} | {} |\n",
            m.access.label(),
            m.kind.label()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use prost_types::FileDescriptorSet;

    /// Every method of every service in the descriptor sets koo serves has
    /// exactly one row, with the right kind, and every row names one of
    /// them: a new RPC without a role fails here.
    #[test]
    fn every_served_rpc_has_exactly_one_row() {
        let sets = [
            crate::pb::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut served = Vec::new();
        for bytes in sets {
            let set = FileDescriptorSet::decode(bytes).expect("a descriptor set");
            for file in set.file {
                for service in &file.service {
                    for m in &service.method {
                        let path = format!("/{}.{}/{}", file.package(), service.name(), m.name());
                        let kind = match (m.client_streaming(), m.server_streaming()) {
                            (false, false) => Kind::Unary,
                            (false, true) => Kind::ServerStreaming,
                            (true, true) => Kind::Bidi,
                            (true, false) => panic!("{path}: client streaming has no kind yet"),
                        };
                        served.push((path, kind));
                    }
                }
            }
        }
        served.sort();
        served.dedup();
        for (path, kind) in &served {
            let row = find(path).unwrap_or_else(|| panic!("{path} has no row in auth::methods"));
            assert_eq!(row.kind, *kind, "{path}");
        }
        for m in METHODS {
            assert!(
                served.iter().any(|(p, _)| p == m.path),
                "{} is a row without an RPC",
                m.path
            );
        }
        assert_eq!(BY_PATH.len(), METHODS.len(), "a path has two rows");
    }

    /// README.md prints this table between its markers.
    #[test]
    fn readme_prints_the_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let begin = "<!-- roles:begin -->\n";
        let start = readme.find(begin).expect("README has <!-- roles:begin -->") + begin.len();
        let end = readme[start..]
            .find("<!-- roles:end -->")
            .expect("README has <!-- roles:end -->");
        assert_eq!(
            readme[start..start + end].trim(),
            markdown().trim(),
            "README.md's role table differs from auth::methods; paste the output of auth::methods::markdown()"
        );
    }

    /// Roles include the ones before them; worker is apart.
    #[test]
    fn role_order() {
        assert!(READER.allows(Role::Admin) && WRITER.allows(Role::Admin));
        assert!(!ADMIN.allows(Role::Writer) && !READER.allows(Role::Worker));
        assert!(!WORKER.allows(Role::Admin) && WORKER.allows(Role::Worker));
        assert!(ReaderOrWorker.allows(Role::Worker) && ReaderOrWorker.allows(Role::Reader));
    }
}
