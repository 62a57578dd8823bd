//! `koo.tasks.v1.TaskService`: converts requests, calls the [`TaskEngine`],
//! converts replies.

mod limits;
mod listing;
mod metrics;
mod model;
mod queues;
mod submit;
mod watch;

use std::time::Duration;

use prost_types::value::Kind;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub(crate) use self::model::{
    category, pb_duration_ms, priority, timestamp, to_pb_category, to_pb_priority, to_pb_state,
    to_pb_task,
};
use self::submit::{MAX_BATCH, new_task};
use self::watch::{EventStream, TaskStream, event_stream, task_stream};
use super::deadline;
use super::status::{after_partial_batch, invalid_argument, task_error_in};
use super::time::{self, duration};
use crate::auth::audit;
use crate::cache::Cache;
use crate::domain::task::{Category, Priority, TaskId, names};
use crate::pb::tasks::v1 as pb;
use crate::store::Deadline;
use crate::tasks::engine::{NewTask, TaskEngine};
use crate::trace::Carried;
use crate::watch::{Hub, Kind as WatchKind, QueuesFilter, Ticker};

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
        let metrics = metrics::ticker(engine.1.clone(), request_timeout, shutdown.clone());
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
        let trace = Carried::of_call(request.metadata());
        let engine = self.engine();
        let (task, deduplicated) = engine
            .submit_keyed(
                new_task(request.into_inner(), &self.cache, trace)?,
                deadline,
            )
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
        let (queues, workers, times_window) =
            metrics::pb_metrics(self.engine().metrics(deadline).await?);
        Ok(Response::new(pb::GetTaskMetricsResponse {
            queues,
            workers: Some(workers),
            streams: Some(metrics::stream_metrics(self.hub())),
            times_window,
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
        let trace = Carried::of_call(request.metadata());
        let r = request.into_inner();
        if r.provider.is_empty() {
            return Err(invalid_argument("provider", "is required"));
        }
        if r.provider.len() > MAX_PROVIDER {
            return Err(invalid_argument(
                "provider",
                &format!(
                    "{} is over the limit of {MAX_PROVIDER} bytes",
                    crate::quote::quote_sized(&r.provider)
                ),
            ));
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
            .submit(new_task(submit, &self.cache, trace)?, deadline)
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
        new.trace = Carried::of_call(request.metadata());
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
        let filter = listing::active_filter(self.engine(), r.category, &r.queue, r.name)?;
        let (tasks, next) = self
            .engine()
            .list_active(
                &filter,
                listing::page_size(r.page_size)?,
                &r.page_token,
                deadline,
            )
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
        let filter = listing::history_filter(self.engine(), &r)?;
        let (entries, next) = self
            .engine()
            .list_history(
                &filter,
                listing::page_size(r.page_size)?,
                &r.page_token,
                deadline,
            )
            .await?;
        Ok(Response::new(pb::ListTaskHistoryResponse {
            tasks: entries.into_iter().map(listing::to_pb_summary).collect(),
            next_page_token: next,
        }))
    }

    async fn submit_tasks(
        &self,
        request: Request<pb::SubmitTasksRequest>,
    ) -> Result<Response<pb::SubmitTasksResponse>, Status> {
        let deadline = self.deadline(&request);
        let engine = self.engine();
        let trace = Carried::of_call(request.metadata());
        let news = submit::batch(request.into_inner().tasks, &self.cache, trace)?;
        let results = engine
            .submit_many(news, deadline)
            .await
            .map_err(|(i, e)| task_error_in(&format!("tasks[{i}]."), e))?;
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
            return Err(after_partial_batch(
                e,
                &format!("tasks[{i}]"),
                "tasks stored",
                &stored,
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
            name: listing::name_filter(r.name)?,
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
                "older_than {:?}, hours_old {}, dead letters {}",
                r.older_than, r.hours_old, r.include_dead_letters
            )
        });
        let r = request.into_inner();
        let older_than = match (
            duration("older_than", r.older_than, time::OLDER_THAN)?,
            r.hours_old,
        ) {
            (Some(_), h) if h != 0 => {
                return Err(invalid_argument(
                    "hours_old",
                    "set with older_than: give one of them",
                ));
            }
            (Some(d), _) => d,
            (None, h) => hours_old(h)?,
        };
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
                self.engine().retry_each(&r.task_ids, deadline).await?
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
        // (any task by id, for a scoped worker key too: a handler reads its
        // dependencies' results, which may be in any queue; ids reach such
        // a key only with its tasks, ListWorkers shows it none of others)
        let task = engine.get(&request.into_inner().task_id, deadline).await?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    async fn pause_queue(
        &self,
        request: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            format!("queue {}", request.get_ref().queue)
        });
        let by = crate::auth::Caller::of(request.extensions()).principal;
        let r = request.into_inner();
        let queue = self
            .engine()
            .pause_queue(&r.queue, &by, &r.reason, deadline)
            .await?;
        Ok(Response::new(pb::PauseQueueResponse {
            queue: Some(queues::pb_queue(queue)),
        }))
    }

    async fn resume_queue(
        &self,
        request: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            format!("queue {}", request.get_ref().queue)
        });
        let queue = self
            .engine()
            .resume_queue(&request.into_inner().queue, deadline)
            .await?;
        Ok(Response::new(pb::ResumeQueueResponse {
            queue: Some(queues::pb_queue(queue)),
        }))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let deadline = self.deadline(&request);
        let queues = self.engine().list_queues(deadline).await?;
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.into_iter().map(queues::pb_queue).collect(),
        }))
    }

    async fn set_rate_limit(
        &self,
        request: Request<pb::SetRateLimitRequest>,
    ) -> Result<Response<pb::SetRateLimitResponse>, Status> {
        limits::set_rate_limit(self, request).await
    }

    async fn get_rate_limit(
        &self,
        request: Request<pb::GetRateLimitRequest>,
    ) -> Result<Response<pb::GetRateLimitResponse>, Status> {
        limits::get_rate_limit(self, request).await
    }

    async fn list_rate_limits(
        &self,
        request: Request<pb::ListRateLimitsRequest>,
    ) -> Result<Response<pb::ListRateLimitsResponse>, Status> {
        limits::list_rate_limits(self, request).await
    }

    async fn delete_rate_limit(
        &self,
        request: Request<pb::DeleteRateLimitRequest>,
    ) -> Result<Response<pb::DeleteRateLimitResponse>, Status> {
        limits::delete_rate_limit(self, request).await
    }

    async fn set_concurrency_limit(
        &self,
        request: Request<pb::SetConcurrencyLimitRequest>,
    ) -> Result<Response<pb::SetConcurrencyLimitResponse>, Status> {
        limits::set_concurrency_limit(self, request).await
    }

    async fn get_concurrency_limit(
        &self,
        request: Request<pb::GetConcurrencyLimitRequest>,
    ) -> Result<Response<pb::GetConcurrencyLimitResponse>, Status> {
        limits::get_concurrency_limit(self, request).await
    }

    async fn list_concurrency_limits(
        &self,
        request: Request<pb::ListConcurrencyLimitsRequest>,
    ) -> Result<Response<pb::ListConcurrencyLimitsResponse>, Status> {
        limits::list_concurrency_limits(self, request).await
    }

    async fn delete_concurrency_limit(
        &self,
        request: Request<pb::DeleteConcurrencyLimitRequest>,
    ) -> Result<Response<pb::DeleteConcurrencyLimitResponse>, Status> {
        limits::delete_concurrency_limit(self, request).await
    }
}

/// The longest AI provider name (`claude`, `openai`...): a name, not a
/// payload (the prompt is bounded by the task's arguments).
const MAX_PROVIDER: usize = 256;

/// The most `hours_old` a cleanup takes: ten years, as `older_than`.
const MAX_HOURS_OLD: i32 = 87_600;

/// `CleanupTasks`'s `hours_old` (the seed's query parameter) as an age; 0
/// (absent) is the default, 24 h.
fn hours_old(hours: i32) -> Result<Duration, Status> {
    match hours {
        0 => Ok(Duration::from_secs(24 * 3600)),
        h @ 1..=MAX_HOURS_OLD => Ok(Duration::from_secs(u64::from(h.unsigned_abs()) * 3600)),
        h => Err(invalid_argument(
            "hours_old",
            &format!("must be 0 to {MAX_HOURS_OLD} (got {h})"),
        )),
    }
}
