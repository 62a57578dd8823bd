//! `koo.tasks.v1.TaskService`: converts requests, calls the [`TaskEngine`],
//! converts replies.

use std::time::{Duration, SystemTime};

use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use super::deadline;
use super::json;
use super::status::{at_index, invalid_argument};
use super::time::{self, duration};
use crate::auth::audit;
use crate::cache::Cache;
use crate::domain::Count;
use crate::domain::task::{CacheTarget, Category, Priority, QueueName, State, Task, TaskId, names};
use crate::pb::tasks::v1 as pb;
use crate::store::Deadline;
use crate::tasks::engine::{NewTask, TaskEngine};
use crate::tasks::listing::{ActiveFilter, HistoryFilter};
use crate::tasks::metrics::TaskMetrics;
use crate::watch::{Hub, Kind as WatchKind, QueuesFilter, Ticker};
use tokio_util::sync::CancellationToken;

use super::watch::{EventStream, TaskStream, event_stream, task_stream};

/// The TaskService implementation.
pub struct TaskApi {
    engine: (TaskEngine, Hub),
    /// For the default TTL of a cached result.
    cache: Cache,
    request_timeout: Duration,
    shutdown: CancellationToken,
    /// `WatchTaskMetrics` snapshots, taken once per interval and shared.
    metrics: Ticker<Result<pb::WatchTaskMetricsResponse, Status>>,
    watch_buffer: usize,
}

impl TaskApi {
    /// Serves `engine`; watch streams end on `shutdown`.
    pub fn new(
        engine: (TaskEngine, Hub),
        cache: Cache,
        request_timeout: Duration,
        watch_buffer: usize,
        shutdown: CancellationToken,
    ) -> Self {
        let (reader, hub) = (engine.1.engine().clone(), engine.1.clone());
        let budget = request_timeout;
        let metrics = Ticker::new(shutdown.clone(), move |interval: Duration| {
            let (engine, hub) = (reader.clone(), hub.clone());
            let f: futures::future::BoxFuture<'static, _> = Box::pin(async move {
                let deadline = Deadline::after(budget.min(interval));
                let (queues, workers) = pb_metrics(engine.metrics(deadline).await?);
                Ok(pb::WatchTaskMetricsResponse {
                    queues,
                    time: Some(prost_types::Timestamp::from(SystemTime::now())),
                    workers: Some(workers),
                    streams: Some(stream_metrics(&hub)),
                })
            });
            f
        });
        Self {
            engine,
            cache,
            request_timeout,
            shutdown,
            metrics,
            watch_buffer,
        }
    }

    fn engine(&self) -> &TaskEngine {
        &self.engine.0
    }

    fn hub(&self) -> &Hub {
        &self.engine.1
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }
}

pub(crate) fn category(raw: i32) -> Result<Category, Status> {
    use pb::TaskCategory as C;
    match C::try_from(raw) {
        Ok(C::AiService) => Ok(Category::AiService),
        Ok(C::PdfProcessing) => Ok(Category::PdfProcessing),
        Ok(C::Database) => Ok(Category::Database),
        Ok(C::HealthCheck) => Ok(Category::HealthCheck),
        Ok(C::Research) => Ok(Category::Research),
        Ok(C::Cache) => Ok(Category::Cache),
        Ok(C::Unspecified) => Err(invalid_argument("category", "is required")),
        Err(_) => Err(invalid_argument(
            "category",
            &format!("{raw} is not a task category"),
        )),
    }
}

pub(crate) fn to_pb_category(c: Category) -> pb::TaskCategory {
    use pb::TaskCategory as C;
    match c {
        Category::AiService => C::AiService,
        Category::PdfProcessing => C::PdfProcessing,
        Category::Database => C::Database,
        Category::HealthCheck => C::HealthCheck,
        Category::Research => C::Research,
        Category::Cache => C::Cache,
    }
}

pub(crate) fn priority(raw: i32) -> Result<Priority, Status> {
    use pb::TaskPriority as P;
    match P::try_from(raw) {
        Ok(P::Unspecified | P::Normal) => Ok(Priority::Normal),
        Ok(P::Low) => Ok(Priority::Low),
        Ok(P::High) => Ok(Priority::High),
        Ok(P::Critical) => Ok(Priority::Critical),
        Err(_) => Err(invalid_argument(
            "priority",
            &format!("{raw} is not a task priority"),
        )),
    }
}

pub(crate) fn to_pb_priority(p: Priority) -> pb::TaskPriority {
    match p {
        Priority::Low => pb::TaskPriority::Low,
        Priority::Normal => pb::TaskPriority::Normal,
        Priority::High => pb::TaskPriority::High,
        Priority::Critical => pb::TaskPriority::Critical,
    }
}

pub(crate) fn to_pb_state(s: State) -> pb::TaskState {
    use pb::TaskState as S;
    match s {
        State::Pending => S::Pending,
        State::Scheduled => S::Scheduled,
        State::Queued => S::Queued,
        State::Running => S::Running,
        State::Succeeded => S::Succeeded,
        State::Failed => S::Failed,
        State::Cancelled => S::Cancelled,
        State::TimedOut => S::TimedOut,
    }
}

pub(crate) fn timestamp(ms: Option<i64>) -> Option<prost_types::Timestamp> {
    ms.map(|ms| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

pub(crate) fn pb_duration_ms(ms: u64) -> Option<prost_types::Duration> {
    (ms > 0).then(|| prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

fn json_value(text: &str) -> Option<prost_types::Value> {
    json::from_json(text).ok()
}

fn json_struct(text: &str) -> Option<prost_types::Struct> {
    match json::from_json(text).ok()?.kind? {
        Kind::StructValue(s) => Some(s),
        _ => None,
    }
}

/// Default and largest list page sizes.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

fn page_size(raw: i32) -> Result<usize, Status> {
    super::page_size(raw, DEFAULT_PAGE, MAX_PAGE)
}

/// The queues a list request covers: a named queue, a category's, or all.
fn queues_for(
    engine: &TaskEngine,
    category_raw: i32,
    queue: &str,
) -> Result<Vec<QueueName>, Status> {
    if !queue.is_empty() {
        return Ok(vec![
            QueueName::parse(queue).map_err(|e| invalid_argument("queue", &e.to_string()))?,
        ]);
    }
    Ok(match category_raw {
        0 => engine.config().queues(),
        c => vec![category(c)?.default_queue()],
    })
}

/// This process's watch streams.
fn stream_metrics(hub: &Hub) -> pb::StreamMetrics {
    let f = hub.watchers().figures();
    let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    pb::StreamMetrics {
        watch_task: n(f.by_kind[WatchKind::Task as usize]),
        watch_tasks: n(f.by_kind[WatchKind::Tasks as usize]),
        watch_task_metrics: n(f.by_kind[WatchKind::TaskMetrics as usize]),
        watch_metrics: n(f.by_kind[WatchKind::CacheMetrics as usize]),
        max_watchers: n(f.max),
        queue_readers: n(f.readers),
        events_fanned_out: i64::try_from(f.fanned_out).unwrap_or(i64::MAX),
        watchers_fallen_behind: i64::try_from(f.fell_behind).unwrap_or(i64::MAX),
    }
}

/// A stored progress report as the API shows it.
pub(crate) fn progress(json: &str) -> Option<pb::TaskProgress> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(pb::TaskProgress {
        percent: v["percent"].as_f64().unwrap_or(0.0),
        message: v["message"].as_str().unwrap_or_default().to_owned(),
        metadata: json_struct(&v["metadata"].to_string()),
    })
}

/// The task figures as `GetTaskMetrics` and `WatchTaskMetrics` show them
/// (without the process's stream figures).
fn pb_metrics(m: TaskMetrics) -> (Vec<pb::QueueMetrics>, pb::WorkerMetrics) {
    let n = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    let workers = pb::WorkerMetrics {
        live: n(m.workers.live),
        external: n(m.workers.external),
        slots: n(m.workers.slots),
        busy: n(m.workers.busy),
    };
    let queues = m
        .queues
        .into_iter()
        .map(|(queue, s)| {
            let count = |c: Count| s.counts.get(c) as i64;
            pb::QueueMetrics {
                queue: queue.to_string(),
                queued: s.ready as i64,
                scheduled: s.scheduled as i64,
                running: s.running as i64,
                dead_letters: s.dead as i64,
                pending: s.pending as i64,
                oldest_wait: s
                    .oldest_wait
                    .and_then(|d| prost_types::Duration::try_from(d).ok()),
                submitted: count(Count::Submitted),
                succeeded: count(Count::Succeeded),
                failed: count(Count::Failed),
                timed_out: count(Count::TimedOut),
                retried: count(Count::Retried),
                lost: count(Count::Lost),
            }
        })
        .collect();
    (queues, workers)
}

/// A stored task as the API shows it.
pub(crate) fn to_pb_task(t: Task) -> pb::Task {
    let args = match json_value(&t.args).and_then(|v| v.kind) {
        Some(Kind::ListValue(l)) => l.values,
        _ => Vec::new(),
    };
    let progress = t.progress.as_deref().and_then(progress);
    let error = t.error.as_deref().and_then(|e| {
        let v: serde_json::Value = serde_json::from_str(e).ok()?;
        Some(pb::TaskError {
            message: v["message"].as_str().unwrap_or_default().to_owned(),
            retryable: v["retryable"].as_bool().unwrap_or(false),
            details: v.get("details").and_then(|d| json_struct(&d.to_string())),
        })
    });
    let attempt_log = t
        .log
        .iter()
        .filter_map(|entry| {
            let v: serde_json::Value = serde_json::from_str(entry).ok()?;
            Some(pb::TaskAttempt {
                attempt: v["attempt"].as_i64().unwrap_or(0) as i32,
                worker: v["worker"].as_str().unwrap_or_default().to_owned(),
                outcome: v["outcome"].as_str().unwrap_or_default().to_owned(),
                error: v["error"].as_str().unwrap_or_default().to_owned(),
                end_time: timestamp(v["ended_ms"].as_i64()),
                retry_time: timestamp(v["retry_at_ms"].as_i64()),
            })
        })
        .collect();
    pb::Task {
        queue: t.id.queue().to_string(),
        id: t.id.to_string(),
        name: t.name,
        category: to_pb_category(t.category) as i32,
        priority: to_pb_priority(t.priority) as i32,
        args,
        kwargs: json_struct(&t.kwargs),
        state: to_pb_state(t.state) as i32,
        attempts: t.attempts as i32,
        max_retries: t.max_retries as i32,
        worker: t.worker.unwrap_or_default(),
        progress,
        result: t.result.as_deref().and_then(json_value),
        error,
        create_time: timestamp(Some(t.created_ms)),
        start_time: timestamp(t.started_ms),
        end_time: timestamp(t.finished_ms),
        soft_time_limit: pb_duration_ms(t.soft_ms),
        time_limit: pb_duration_ms(t.hard_ms),
        attempt_log,
        depends_on: t.depends_on,
        schedule: t.schedule.unwrap_or_default(),
        schedule_time: timestamp(t.schedule_tick_ms),
        cache_result: t
            .cache_result
            .as_deref()
            .and_then(CacheTarget::from_json)
            .map(|c| pb::CacheTarget {
                level: super::cache::to_pb_level(c.level) as i32,
                key: c.key,
                ttl: pb_duration_ms(c.ttl_ms),
            }),
    }
}

/// A submit request as the engine takes it.
/// A submit as the engine takes it; `cache` resolves a cached result's
/// default TTL.
fn new_task(r: pb::SubmitTaskRequest, cache: &Cache) -> Result<NewTask, Status> {
    let cache_result = match r.cache_result {
        None => None,
        Some(c) => {
            let level = super::cache::level("cache_result.level", c.level)?;
            let ttl = duration("cache_result.ttl", c.ttl, time::CACHE_TTL)?
                .unwrap_or(cache.default_ttl(level));
            Some(CacheTarget {
                level,
                key: c.key,
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            })
        }
    };
    let args = prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue { values: r.args })),
    };
    let kwargs = prost_types::Value {
        kind: Some(Kind::StructValue(r.kwargs.unwrap_or_default())),
    };
    let max_retries = match r.max_retries {
        Some(n) if n < 0 => return Err(invalid_argument("max_retries", "must not be negative")),
        Some(n) => Some(n as u32),
        None => None,
    };
    let queue = match r.queue.as_str() {
        "" => None,
        q => Some(QueueName::parse(q).map_err(|e| invalid_argument("queue", &e.to_string()))?),
    };
    let countdown = duration("countdown", r.countdown, time::COUNTDOWN)?;
    let eta = time::time("eta", r.eta, Some((time::COUNTDOWN.max(), "365 days")))?;
    let delay = match (countdown, eta) {
        (Some(_), Some(_)) => {
            return Err(invalid_argument(
                "eta",
                "give either countdown or eta, not both",
            ));
        }
        (Some(d), None) => d,
        // an ETA in the past means now
        (None, Some(eta)) => eta.duration_since(SystemTime::now()).unwrap_or_default(),
        (None, None) => Duration::ZERO,
    };
    Ok(NewTask {
        name: r.name,
        category: category(r.category)?,
        queue,
        priority: priority(r.priority)?,
        args: json::to_json(&args).map_err(|e| invalid_argument("args", &e))?,
        kwargs: json::to_json(&kwargs).map_err(|e| invalid_argument("kwargs", &e))?,
        max_retries,
        delay,
        soft_time_limit: duration("soft_time_limit", r.soft_time_limit, time::SOFT_TIME_LIMIT)?,
        time_limit: duration("time_limit", r.time_limit, time::TIME_LIMIT)?,
        result_ttl: duration("result_ttl", r.result_ttl, time::RESULT_TTL)?,
        cache_result,
        idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
        depends_on: r.depends_on,
        schedule: None,
        schedule_tick_ms: None,
    })
}

/// Most tasks in one SubmitTasks.
const MAX_BATCH: usize = 100;

#[tonic::async_trait]
impl pb::task_service_server::TaskService for TaskApi {
    type WatchTaskStream = TaskStream;

    async fn watch_task(
        &self,
        request: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let deadline = self.deadline(&request);
        let id = request.into_inner().task_id;
        let id = TaskId::parse(&id).map_err(|e| invalid_argument("task_id", &e.to_string()))?;
        let watch = self
            .hub()
            .watch_task(&id, self.shutdown.clone(), self.request_timeout, deadline)
            .await?;
        Ok(Response::new(task_stream(watch)))
    }

    async fn submit_task(
        &self,
        request: Request<pb::SubmitTaskRequest>,
    ) -> Result<Response<pb::SubmitTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let engine = self.engine();
        let (task, deduplicated) = engine
            .submit_keyed(new_task(request.into_inner(), &self.cache)?, deadline)
            .await?;
        Ok(Response::new(pb::SubmitTaskResponse {
            task: Some(to_pb_task(task)),
            deduplicated,
        }))
    }

    async fn get_task_metrics(
        &self,
        request: Request<pb::GetTaskMetricsRequest>,
    ) -> Result<Response<pb::GetTaskMetricsResponse>, Status> {
        let deadline = self.deadline(&request);
        let (queues, workers) = pb_metrics(self.engine().metrics(deadline).await?);
        Ok(Response::new(pb::GetTaskMetricsResponse {
            queues,
            workers: Some(workers),
            streams: Some(stream_metrics(self.hub())),
        }))
    }

    type WatchTaskMetricsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::WatchTaskMetricsResponse, Status>> + Send>,
    >;

    async fn watch_task_metrics(
        &self,
        request: Request<pb::WatchTaskMetricsRequest>,
    ) -> Result<Response<Self::WatchTaskMetricsStream>, Status> {
        let interval = duration(
            "interval",
            request.into_inner().interval,
            time::WATCH_INTERVAL,
        )?
        .unwrap_or(Duration::from_secs(1));
        let permit = self.hub().watchers().admit(WatchKind::TaskMetrics)?;
        let follower = self.metrics.follow(interval);
        // Every watcher of one interval shares one snapshot per tick; the
        // stream ends after an error, as each watcher's used to.
        let stream = futures::stream::unfold(
            (follower, permit, false),
            |(mut follower, permit, failed)| async move {
                if failed {
                    return None;
                }
                let snapshot = follower.next().await?;
                let item = snapshot.value.clone();
                let failed = item.is_err();
                Some((item, (follower, permit, failed)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn submit_ai_query(
        &self,
        request: Request<pb::SubmitAiQueryRequest>,
    ) -> Result<Response<pb::SubmitAiQueryResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        if r.provider.is_empty() {
            return Err(invalid_argument("provider", "is required"));
        }
        if r.prompt.is_empty() {
            return Err(invalid_argument("prompt", "is required"));
        }
        let submit = pb::SubmitTaskRequest {
            name: names::AI_QUERY.to_owned(),
            category: pb::TaskCategory::AiService as i32,
            priority: pb::TaskPriority::High as i32,
            args: vec![
                prost_types::Value {
                    kind: Some(Kind::StringValue(r.provider)),
                },
                prost_types::Value {
                    kind: Some(Kind::StringValue(r.prompt)),
                },
            ],
            kwargs: r.options,
            max_retries: r.max_retries,
            ..Default::default()
        };
        let task = self
            .engine()
            .submit(new_task(submit, &self.cache)?, deadline)
            .await?;
        Ok(Response::new(pb::SubmitAiQueryResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    async fn submit_health_check(
        &self,
        request: Request<pb::SubmitHealthCheckRequest>,
    ) -> Result<Response<pb::SubmitHealthCheckResponse>, Status> {
        let deadline = self.deadline(&request);
        let mut new = NewTask::new(names::HEALTH_CHECK, Category::HealthCheck);
        new.priority = Priority::High;
        new.time_limit = Some(Duration::from_secs(60));
        new.soft_time_limit = Some(Duration::from_secs(30));
        let task = self.engine().submit(new, deadline).await?;
        Ok(Response::new(pb::SubmitHealthCheckResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    async fn list_active_tasks(
        &self,
        request: Request<pb::ListActiveTasksRequest>,
    ) -> Result<Response<pb::ListActiveTasksResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let filter = ActiveFilter {
            queues: queues_for(self.engine(), r.category, &r.queue)?,
            name: (!r.name.is_empty()).then_some(r.name),
        };
        let (tasks, next) = self
            .engine()
            .list_active(&filter, page_size(r.page_size)?, &r.page_token, deadline)
            .await?;
        Ok(Response::new(pb::ListActiveTasksResponse {
            tasks: tasks.into_iter().map(to_pb_task).collect(),
            next_page_token: next,
        }))
    }

    async fn list_task_history(
        &self,
        request: Request<pb::ListTaskHistoryRequest>,
    ) -> Result<Response<pb::ListTaskHistoryResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let state = match pb::TaskState::try_from(r.state) {
            Ok(pb::TaskState::Unspecified) => None,
            Ok(pb::TaskState::Succeeded) => Some(State::Succeeded),
            Ok(pb::TaskState::Failed) => Some(State::Failed),
            Ok(pb::TaskState::Cancelled) => Some(State::Cancelled),
            Ok(pb::TaskState::TimedOut) => Some(State::TimedOut),
            _ => {
                return Err(invalid_argument(
                    "state",
                    "history holds only end states (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)",
                ));
            }
        };
        let category = match r.category {
            0 => None,
            c => Some(category(c)?),
        };
        let ms = |field: &str, t: Option<prost_types::Timestamp>, default: i64| {
            Ok::<_, Status>(time::time(field, t, None)?.map_or(default, crate::store::unix_millis))
        };
        let filter = HistoryFilter {
            queues: match category {
                Some(c) => vec![c.default_queue()],
                None => self.engine().config().queues(),
            },
            state,
            category,
            name: (!r.name.is_empty()).then_some(r.name),
            since_ms: ms("start_time", r.start_time, 0)?,
            before_ms: ms("end_time", r.end_time, i64::MAX / 2)?,
        };
        let (entries, next) = self
            .engine()
            .list_history(&filter, page_size(r.page_size)?, &r.page_token, deadline)
            .await?;
        Ok(Response::new(pb::ListTaskHistoryResponse {
            tasks: entries
                .into_iter()
                .map(|e| pb::TaskSummary {
                    id: e.id,
                    name: e.name,
                    category: e.category.map_or(0, |c| to_pb_category(c) as i32),
                    state: e.state.map_or(0, |s| to_pb_state(s) as i32),
                    attempts: e.attempts as i32,
                    end_time: timestamp(Some(e.finished_ms)),
                    schedule: e.schedule.unwrap_or_default(),
                })
                .collect(),
            next_page_token: next,
        }))
    }

    async fn submit_tasks(
        &self,
        request: Request<pb::SubmitTasksRequest>,
    ) -> Result<Response<pb::SubmitTasksResponse>, Status> {
        let deadline = self.deadline(&request);
        let engine = self.engine();
        let requests = request.into_inner().tasks;
        if requests.len() > MAX_BATCH {
            return Err(invalid_argument(
                "tasks",
                &format!(
                    "has {} tasks, over the limit of {MAX_BATCH}",
                    requests.len()
                ),
            ));
        }
        let news = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| new_task(r, &self.cache).map_err(|s| at_index("tasks", i, &s)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(i) = news.iter().position(|n| n.idempotency_key.is_some()) {
            return Err(invalid_argument(
                &format!("tasks[{i}].idempotency_key"),
                "only SubmitTask takes an idempotency key",
            ));
        }
        if let Some(i) = news.iter().position(|n| !n.depends_on.is_empty()) {
            return Err(invalid_argument(
                &format!("tasks[{i}].depends_on"),
                "only SubmitTask takes dependencies",
            ));
        }
        let results = engine
            .submit_many(news, deadline)
            .await
            .map_err(|(i, e)| match e {
                crate::tasks::engine::TaskError::InvalidArgument { field, reason } => {
                    invalid_argument(&format!("tasks[{i}].{field}"), &reason)
                }
                other => other.into(),
            })?;
        let mut tasks = Vec::with_capacity(results.len());
        let mut failure = None;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(task) => tasks.push(to_pb_task(task)),
                Err(e) => {
                    failure.get_or_insert((i, e));
                }
            }
        }
        if let Some((i, e)) = failure {
            let stored: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
            let status = Status::from(e);
            return Err(Status::new(
                status.code(),
                format!(
                    "tasks[{i}]: {}; tasks stored: {}",
                    status.message(),
                    if stored.is_empty() {
                        "none".to_owned()
                    } else {
                        stored.join(", ")
                    }
                ),
            ));
        }
        Ok(Response::new(pb::SubmitTasksResponse { tasks }))
    }

    type WatchTasksStream = EventStream;

    async fn watch_tasks(
        &self,
        request: Request<pb::WatchTasksRequest>,
    ) -> Result<Response<Self::WatchTasksStream>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let filter = QueuesFilter {
            queues: r
                .categories
                .iter()
                .map(|c| Ok(category(*c)?.default_queue()))
                .collect::<Result<_, Status>>()?,
            name: (!r.name.is_empty()).then_some(r.name),
        };
        let watch = self
            .hub()
            .watch_queues(
                filter,
                &r.resume_token,
                self.watch_buffer,
                self.shutdown.clone(),
                deadline,
            )
            .await?;
        Ok(Response::new(event_stream(watch)))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let task = self
            .engine()
            .cancel(&r.task_id, &r.reason, deadline)
            .await?;
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let id = request.into_inner().task_id;
        let task = self.engine().retry(&id, deadline).await?;
        Ok(Response::new(pb::RetryTaskResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    async fn cleanup_tasks(
        &self,
        request: Request<pb::CleanupTasksRequest>,
    ) -> Result<Response<pb::CleanupTasksResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            let r = request.get_ref();
            format!(
                "older_than {:?}, dead letters {}",
                r.older_than, r.include_dead_letters
            )
        });
        let r = request.into_inner();
        let older_than = duration("older_than", r.older_than, time::OLDER_THAN)?
            .unwrap_or(Duration::from_secs(24 * 3600));
        let removed = self
            .engine()
            .cleanup(
                &self.engine().config().queues(),
                older_than,
                r.include_dead_letters,
                deadline,
            )
            .await?;
        Ok(Response::new(pb::CleanupTasksResponse {
            removed_tasks: removed.iter().map(|(_, t)| t.history as i64).sum(),
            removed_dead_letters: removed.iter().map(|(_, t)| t.dead as i64).sum(),
        }))
    }

    async fn requeue_dead_letters(
        &self,
        request: Request<pb::RequeueDeadLettersRequest>,
    ) -> Result<Response<pb::RequeueDeadLettersResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            let r = request.get_ref();
            if r.all {
                "all".to_owned()
            } else {
                format!("task_ids {}", r.task_ids.join(","))
            }
        });
        let r = request.into_inner();
        let task_ids = match (r.all, r.task_ids.is_empty()) {
            (true, true) => {
                self.engine()
                    .requeue_dead_letters(&self.engine().config().queues(), 1000, deadline)
                    .await?
            }
            (false, false) => {
                if r.task_ids.len() > MAX_BATCH {
                    return Err(invalid_argument(
                        "task_ids",
                        &format!("at most {MAX_BATCH} per call"),
                    ));
                }
                let mut requeued = Vec::with_capacity(r.task_ids.len());
                for (i, id) in r.task_ids.iter().enumerate() {
                    match self.engine().retry(id, deadline).await {
                        Ok(task) => requeued.push(task.id.to_string()),
                        Err(crate::tasks::engine::TaskError::InvalidArgument {
                            reason, ..
                        }) => {
                            return Err(invalid_argument(&format!("task_ids[{i}]"), &reason));
                        }
                        Err(e) => {
                            let status = Status::from(e);
                            return Err(Status::new(
                                status.code(),
                                format!(
                                    "task_ids[{i}]: {}; requeued before it: {}",
                                    status.message(),
                                    if requeued.is_empty() {
                                        "none".to_owned()
                                    } else {
                                        requeued.join(", ")
                                    }
                                ),
                            ));
                        }
                    }
                }
                requeued
            }
            _ => {
                return Err(invalid_argument(
                    "task_ids",
                    "name the tasks, or set all (not both)",
                ));
            }
        };
        Ok(Response::new(pb::RequeueDeadLettersResponse { task_ids }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let deadline = self.deadline(&request);
        let engine = self.engine();
        let task = engine.get(&request.into_inner().task_id, deadline).await?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(to_pb_task(task)),
        }))
    }
}
