//! Task vocabulary: categories, priorities, states and their transitions,
//! queue names and task ids.
//!
//! These types are shared by every backend, so the rules live here once: a
//! backend never decides on its own whether a transition is legal, how a
//! priority orders, or how a task id names its queue.

use std::fmt;
use std::time::SystemTime;

/// The seed's six task categories. Each routes to its own queue unless a
/// submit names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// AI queries and batch operations.
    AiService,
    /// Document processing, text extraction, indexing.
    PdfProcessing,
    /// Maintenance, cleanup, optimisation, backups.
    Database,
    /// System monitoring.
    HealthCheck,
    /// Data synchronisation, knowledge-base updates.
    Research,
    /// Cache warming, cleanup, maintenance.
    Cache,
}

impl Category {
    /// Every category.
    pub const ALL: [Category; 6] = [
        Category::AiService,
        Category::PdfProcessing,
        Category::Database,
        Category::HealthCheck,
        Category::Research,
        Category::Cache,
    ];

    /// The category's name, which is also its default queue.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::AiService => "ai_service",
            Category::PdfProcessing => "pdf_processing",
            Category::Database => "database",
            Category::HealthCheck => "health_check",
            Category::Research => "research",
            Category::Cache => "cache",
        }
    }

    /// Parses a stored or requested category name.
    pub fn parse(s: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Every category's default queue, the queues koo serves and sweeps.
    pub fn queues() -> Vec<QueueName> {
        Category::ALL.iter().map(|c| c.default_queue()).collect()
    }

    /// The queue a task of this category goes to when the submit names none.
    pub fn default_queue(self) -> QueueName {
        QueueName(self.as_str().to_owned())
    }
}

/// Most retries a task may ask for. Each attempt adds an entry to the
/// task's attempt log, which lives as long as the task: the bound is what
/// keeps it bounded (1,000 retries at the longest backoff, 10 minutes, are
/// about a week of trying).
pub const MAX_RETRIES: u32 = 1000;

/// Width of one priority band of a ready score: a ready task's score is
/// `band * BAND_WIDTH + enqueue ms` (higher priority first, FIFO within a
/// band), on both backends and in the Lua scripts. 2^42 ms is some 139
/// years: no enqueue time spills into the next band.
pub const BAND_WIDTH: u64 = 1 << 42;

/// How urgent a task is. Within a queue, higher priority runs first and equal
/// priorities run in submission order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Background work.
    Low,
    /// The default.
    Normal,
    /// Ahead of normal work.
    High,
    /// Ahead of everything.
    Critical,
}

impl Priority {
    /// Every priority, lowest first.
    pub const ALL: [Priority; 4] = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Critical,
    ];

    /// Its band in ready-queue scores: 0 for critical, 3 for low.
    pub fn band(self) -> u64 {
        3 - self as u64
    }

    /// Parses `low`, `normal`, `high` or `critical` (any case, with or
    /// without the `TASK_PRIORITY_` prefix).
    pub fn parse(s: &str) -> Option<Priority> {
        let s = s.to_ascii_lowercase();
        match s.strip_prefix("task_priority_").unwrap_or(&s) {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            "critical" => Some(Priority::Critical),
            _ => None,
        }
    }

    /// The name [`Self::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// Parses a band back.
    pub fn from_band(band: u64) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.band() == band)
    }

    /// The sort score of a ready task: lower runs first (see
    /// [`BAND_WIDTH`]). The priority band
    /// sits above the enqueue time in milliseconds, and the sum stays below
    /// 2^53 so that a Redis sorted-set score (a double) holds it exactly.
    pub fn ready_score(self, enqueued: SystemTime) -> f64 {
        let band = self.band();
        let ms = enqueued
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .min(BAND_WIDTH - 1);
        (band * BAND_WIDTH + ms) as f64
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for its dependencies.
    Pending,
    /// Waiting for its start time (countdown, ETA, or retry backoff).
    Scheduled,
    /// Ready to run.
    Queued,
    /// Leased by a worker.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error after its retries (dead-lettered).
    Failed,
    /// Stopped on request, or because a dependency did not succeed.
    Cancelled,
    /// Stopped at its hard time limit.
    TimedOut,
}

/// What moves a task from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Its dependencies succeeded.
    Release,
    /// Its start time came.
    Due,
    /// A worker leased it.
    Lease,
    /// Its worker completed it.
    Complete,
    /// Its worker failed it and it will be retried after a backoff.
    RetryLater,
    /// Its worker failed it for good, or its retries are spent.
    FailFinally,
    /// Its lease lapsed and it goes back to its queue.
    Requeue,
    /// It passed its hard time limit.
    TimeOut,
    /// Someone cancelled it, or a dependency did not succeed.
    Cancel,
    /// `RetryTask`: run a finished-unsuccessfully task again.
    Rerun,
}

impl State {
    /// Whether the task has ended (a result or error is final until
    /// `RetryTask`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::Cancelled | State::TimedOut
        )
    }

    /// The state `t` leads to from this one, or `None` when `t` does not
    /// apply here. Every backend checks this before it writes.
    pub fn apply(self, t: Transition) -> Option<State> {
        use State::*;
        use Transition::*;
        Some(match (self, t) {
            (Pending, Release) => Queued,
            (Scheduled, Due) => Queued,
            (Queued, Lease) => Running,
            (Running, Complete) => Succeeded,
            (Running, RetryLater) => Scheduled,
            (Running, FailFinally) => Failed,
            (Running, Requeue) => Queued,
            (Running, TimeOut) => TimedOut,
            (s, Cancel) if !s.is_final() => Cancelled,
            (Failed | TimedOut | Cancelled, Rerun) => Queued,
            _ => return None,
        })
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<State> {
        use State::*;
        [
            Pending, Scheduled, Queued, Running, Succeeded, Failed, Cancelled, TimedOut,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    /// The state's name in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Scheduled => "scheduled",
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
            State::TimedOut => "timed_out",
        }
    }
}

/// Checks a task name: 1 to 256 bytes of printable UTF-8, that is without
/// control characters (U+0000 to U+001F, U+007F to U+009F). Names end up in
/// logs, metrics labels and dashboards, where a NUL or a newline breaks
/// lines and labels; the reason says what is wrong.
pub fn check_task_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 {
        return Err(format!(
            "must be 1 to 256 bytes, got {}",
            crate::quote::quote(name)
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "must be printable: no control characters (U+0000 to U+001F, U+007F to U+009F), got {}",
            crate::quote::quote(name)
        ));
    }
    Ok(())
}

/// A validated queue name: 1 to 64 of `a-z 0-9 _ . -`, so that it is safe
/// inside Redis key names, hash tags and task ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// A queue name with characters or a length koo does not accept.
    #[error("queue name {} must be 1 to 64 of a-z, 0-9, '_', '.', '-'", crate::quote::quote(.0))]
    Queue(String),
    /// A string that is not a task id koo issued.
    #[error("{} is not a task id", crate::quote::quote(.0))]
    TaskId(String),
}

impl QueueName {
    /// Validates a queue name.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if ok {
            Ok(QueueName(name.to_owned()))
        } else {
            Err(NameError::Queue(name.to_owned()))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task id: `{queue}~{uuid v7}`. The queue is part of the id so that every
/// key of a task can be derived from its id alone (and so sits in its queue's
/// Redis Cluster slot); the v7 uuid sorts by creation time. Clients treat it
/// as opaque.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(String);

impl TaskId {
    /// A new id in `queue`.
    pub fn generate(queue: &QueueName) -> Self {
        TaskId(format!("{}~{}", queue, uuid::Uuid::now_v7().simple()))
    }

    /// Parses an id a client sent back.
    pub fn parse(id: &str) -> Result<Self, NameError> {
        let bad = || NameError::TaskId(id.to_owned());
        let (queue, unique) = id.rsplit_once('~').ok_or_else(bad)?;
        QueueName::parse(queue).map_err(|_| bad())?;
        if unique.len() != 32
            || !unique
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(bad());
        }
        Ok(TaskId(id.to_owned()))
    }

    /// The queue the task belongs to.
    pub fn queue(&self) -> QueueName {
        let (queue, _) = self.0.rsplit_once('~').expect("validated id");
        QueueName(queue.to_owned())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task as stored. JSON-valued fields (arguments, progress, result, error)
/// stay JSON text here: the engine moves them, handlers and clients read them.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// The handler name, e.g. `koo.tasks.ai_service.process_query`.
    pub name: String,
    /// Its category.
    pub category: Category,
    /// Its priority.
    pub priority: Priority,
    /// Positional arguments, a JSON array.
    pub args: String,
    /// Keyword arguments, a JSON object.
    pub kwargs: String,
    /// Where it is.
    pub state: State,
    /// Where a successful result is also cached (JSON `{level, key,
    /// ttl_ms}`), if anywhere.
    pub cache_result: Option<String>,
    /// The tasks it waited on before it could run.
    pub depends_on: Vec<String>,
    /// The schedule that submitted it, if one did.
    pub schedule: Option<String>,
    /// The tick it was submitted for (ms since the epoch), if a schedule's
    /// tick submitted it.
    pub schedule_tick_ms: Option<i64>,
    /// Attempts so far, counted when leased (a hand-back at shutdown
    /// gives its attempt back).
    pub attempts: u32,
    /// The fencing token of the latest lease: it grows with every lease, so
    /// no two leases of a task ever share one.
    pub token: u32,
    /// How many times a worker re-attached a running attempt to a new
    /// stream (each took the lease over under the next token): not a
    /// give-back, see [`Task::given_back`].
    pub takeovers: u32,
    /// Retries allowed after the first attempt.
    pub max_retries: u32,
    /// The worker holding the lease, while running.
    pub worker: Option<String>,
    /// Latest progress report, JSON `{percent, message, metadata}`.
    pub progress: Option<String>,
    /// The result (JSON), once succeeded.
    pub result: Option<String>,
    /// The latest error, JSON `{message, retryable, ...}`.
    pub error: Option<String>,
    /// When it was submitted (ms since the epoch).
    pub created_ms: i64,
    /// When its latest attempt started.
    pub started_ms: Option<i64>,
    /// When it ended.
    pub finished_ms: Option<i64>,
    /// Soft time limit in ms (0: none).
    pub soft_ms: u64,
    /// Hard time limit in ms (0: none).
    pub hard_ms: u64,
    /// How long the result stays readable after the end, ms.
    pub result_ttl_ms: u64,
    /// One JSON object per ended attempt.
    pub log: Vec<String>,
    /// The trace context of the span that submitted it, if any.
    pub trace: Option<TraceContext>,
    /// The debounce key it was submitted with: while it has not started,
    /// a submit with the key to its queue replaces it.
    pub debounce_key: Option<String>,
    /// When it expires (ms since the epoch), if it does: still waiting then,
    /// it ends CANCELLED ("cancelled: expired") instead of running late.
    pub expire_ms: Option<i64>,
    /// Its rate-limit key (a provider, a tenant): it starts only when the
    /// key's rate limit has a token and no back-off holds the key.
    pub rate_limit_key: Option<String>,
    /// Its concurrency key: at most the key's cap of its tasks run at
    /// once, and a queue serves its keys round robin.
    pub concurrency_key: Option<String>,
}

impl Task {
    /// A running task of the research queue for unit tests: `attempts`
    /// counted, lease `token`.
    #[cfg(test)]
    pub(crate) fn sample(attempts: u32, token: u32) -> Self {
        Task {
            id: TaskId::generate(&QueueName::parse("research").unwrap()),
            name: "koo.examples.job".into(),
            category: Category::Research,
            priority: Priority::Normal,
            args: "[]".into(),
            kwargs: "{}".into(),
            state: State::Running,
            depends_on: vec![],
            schedule: None,
            schedule_tick_ms: None,
            cache_result: None,
            attempts,
            token,
            takeovers: 0,
            max_retries: 3,
            worker: None,
            progress: None,
            result: None,
            error: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            soft_ms: 0,
            hard_ms: 0,
            result_ttl_ms: 0,
            log: vec![],
            trace: None,
            debounce_key: None,
            expire_ms: None,
            rate_limit_key: None,
            concurrency_key: None,
        }
    }

    /// How many of this task's leases were given back (handed back
    /// unstarted, or released by a stopping worker or koo): every lease adds
    /// one to the token, every attempt that counted one to the attempts,
    /// and a take-over one to the token alone.
    pub fn given_back(&self) -> u32 {
        self.token
            .saturating_sub(self.attempts)
            .saturating_sub(self.takeovers)
    }
}

/// The W3C trace context a task carries from the call that submitted it to
/// whoever runs it (`crate::trace` reads and writes it; here it is text, as
/// stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent` (`00-<trace id>-<span id>-<flags>`).
    pub parent: String,
    /// `tracestate`, when the caller sent one.
    pub state: Option<String>,
}

/// Where a successful task's result is also cached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheTarget {
    /// The cache level.
    pub level: super::Level,
    /// The key.
    pub key: String,
    /// The entry's TTL (ms).
    pub ttl_ms: u64,
    /// The entry's tags (absent from the JSON when none, so that targets
    /// stored before tags existed read back the same).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The entry's soft TTL (ms), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_ttl_ms: Option<u64>,
}

impl CacheTarget {
    /// The stored form (JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads the stored form.
    pub fn from_json(json: &str) -> Option<Self> {
        serde_json::from_str(json).ok()
    }
}

/// The task names the seed uses, which work as written.
pub mod names {
    /// The seed's AI query task.
    pub const AI_QUERY: &str = "koo.tasks.ai_service.process_query";
    /// The seed's PDF processing task.
    pub const PDF_PROCESS: &str = "koo.tasks.pdf_processing.process_document";
    /// The built-in health check.
    pub const HEALTH_CHECK: &str = "koo.tasks.health_check.run";
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Higher priority sorts first; within a priority, earlier first; and the
    /// score is exact in a double.
    #[test]
    fn ready_scores_order_by_priority_then_time() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t1 = t0 + Duration::from_millis(1);
        assert!(Priority::Critical.ready_score(t1) < Priority::High.ready_score(t0));
        assert!(Priority::High.ready_score(t1) < Priority::Normal.ready_score(t0));
        assert!(Priority::Low.ready_score(t0) < Priority::Low.ready_score(t1));
        let max = Priority::Low
            .ready_score(SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64 * 1000));
        assert!(max < (1u64 << 53) as f64);
        assert_eq!(max as u64 as f64, max);
    }

    /// The transition table: legal moves land where expected, final states
    /// only move by Rerun, and nothing else moves.
    #[test]
    fn transitions() {
        use State::*;
        use Transition::*;
        assert_eq!(Queued.apply(Lease), Some(Running));
        assert_eq!(Running.apply(Complete), Some(Succeeded));
        assert_eq!(Running.apply(RetryLater), Some(Scheduled));
        assert_eq!(Scheduled.apply(Due), Some(Queued));
        assert_eq!(Running.apply(Requeue), Some(Queued));
        assert_eq!(Pending.apply(Cancel), Some(Cancelled));
        assert_eq!(Failed.apply(Rerun), Some(Queued));
        assert_eq!(Succeeded.apply(Rerun), None);
        for s in [Succeeded, Failed, Cancelled, TimedOut] {
            assert!(s.is_final());
            assert_eq!(s.apply(Cancel), None, "{s:?}");
            assert_eq!(s.apply(Complete), None, "{s:?}");
            assert_eq!(s.apply(Lease), None, "{s:?}");
        }
        assert_eq!(Queued.apply(Complete), None);
        assert_eq!(Scheduled.apply(Lease), None);
    }

    /// Ids carry their queue, round-trip, and refuse anything else.
    #[test]
    fn task_ids() {
        let q = QueueName::parse("ai_service").unwrap();
        let id = TaskId::generate(&q);
        let parsed = TaskId::parse(id.as_str()).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.queue(), q);
        assert!(TaskId::generate(&q) > id, "v7 ids sort by creation");
        for bad in [
            "",
            "x",
            "ai_service~",
            "~0123",
            "AI~0190aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "q~XYZ",
            "q~0190AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(TaskId::parse(bad).is_err(), "{bad}");
        }
        assert!(QueueName::parse("pdf-processing.v2").is_ok());
        assert!(QueueName::parse("Has Space").is_err());
        assert!(QueueName::parse(&"q".repeat(65)).is_err());
        assert_eq!(Category::AiService.default_queue().as_str(), "ai_service");
    }
}
