//! `koo.schedule.v1.ScheduleService`: converts requests to the domain calls
//! of [`crate::schedule::Schedules`] and views back to messages.

use std::time::Duration;

use prost_types::value::Kind;
use tonic::{Request, Response, Status};

use super::deadline;
use super::json;
use super::status::invalid_argument;
use super::tasks::{
    category, pb_duration_ms, priority, timestamp, to_pb_category, to_pb_priority, to_pb_state,
    to_pb_task,
};
use super::time;
use crate::auth::audit;
use crate::domain::schedule::{MissedPolicy, Schedule, Source, Template};
use crate::domain::task::{Category, MAX_RETRIES, Priority};
use crate::pb::schedule::v1 as pb;
use crate::schedule::{Patch, ScheduleError, Schedules, View};
use crate::store::Deadline;

/// Default and largest ListSchedules pages.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// The ScheduleService implementation.
pub struct ScheduleApi {
    schedules: Schedules,
    request_timeout: Duration,
}

impl ScheduleApi {
    /// Serves `schedules`.
    pub fn new(schedules: Schedules, request_timeout: Duration) -> Self {
        Self {
            schedules,
            request_timeout,
        }
    }

    fn deadline<T>(&self, r: &Request<T>) -> Deadline {
        deadline::from_metadata(r.metadata(), self.request_timeout)
    }
}

fn policy(raw: i32) -> Result<MissedPolicy, Status> {
    match pb::MissedTickPolicy::try_from(raw) {
        Ok(pb::MissedTickPolicy::Unspecified | pb::MissedTickPolicy::Skip) => {
            Ok(MissedPolicy::Skip)
        }
        Ok(pb::MissedTickPolicy::RunOnce) => Ok(MissedPolicy::RunOnce),
        Err(_) => Err(invalid_argument(
            "missed_tick_policy",
            &format!("{raw} is not a missed-tick policy"),
        )),
    }
}

fn millis(
    field: &str,
    d: Option<prost_types::Duration>,
    range: time::Range,
) -> Result<Option<u64>, Status> {
    Ok(time::duration(field, d, range)?.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

/// A template as sent, checked field by field.
fn template(t: Option<pb::TaskTemplate>) -> Result<Template, Status> {
    let t = t.ok_or_else(|| invalid_argument("schedule.task", "is required"))?;
    let category: Category = category(t.category)
        .map_err(|_| invalid_argument("schedule.task.category", "is required (a TaskCategory)"))?;
    let priority: Priority = priority(t.priority)
        .map_err(|e| invalid_argument("schedule.task.priority", e.message()))?;
    let args = json::to_serde(&prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue { values: t.args })),
    })
    .map_err(|e| invalid_argument("schedule.task.args", &e))?;
    let kwargs = json::to_serde(&prost_types::Value {
        kind: Some(Kind::StructValue(t.kwargs.unwrap_or_default())),
    })
    .map_err(|e| invalid_argument("schedule.task.kwargs", &e))?;
    if let Some(r) = t.max_retries
        && !u32::try_from(r).is_ok_and(|r| r <= MAX_RETRIES)
    {
        return Err(invalid_argument(
            "schedule.task.max_retries",
            &format!("must be 0 to {MAX_RETRIES}, got {r}"),
        ));
    }
    Ok(Template {
        name: t.name,
        category: category.as_str().to_owned(),
        args,
        kwargs,
        priority: priority.as_str().to_owned(),
        max_retries: t.max_retries.map(|r| r as u32),
        queue: (!t.queue.is_empty()).then_some(t.queue),
        soft_ms: millis(
            "schedule.task.soft_time_limit",
            t.soft_time_limit,
            time::SOFT_TIME_LIMIT,
        )?,
        hard_ms: millis("schedule.task.time_limit", t.time_limit, time::TIME_LIMIT)?,
        expire_after_ms: millis(
            "schedule.task.expire_after",
            t.expire_after,
            time::EXPIRE_AFTER,
        )?,
        // empty means none; the engine checks the rest (as a submit's)
        rate_limit_key: (!t.rate_limit_key.is_empty()).then_some(t.rate_limit_key),
        concurrency_key: (!t.concurrency_key.is_empty()).then_some(t.concurrency_key),
    })
}

fn to_pb_template(t: &Template) -> pb::TaskTemplate {
    let values = match json::from_json(&t.args.to_string())
        .ok()
        .and_then(|v| v.kind)
    {
        Some(Kind::ListValue(l)) => l.values,
        _ => Vec::new(),
    };
    let kwargs = match json::from_json(&t.kwargs.to_string())
        .ok()
        .and_then(|v| v.kind)
    {
        Some(Kind::StructValue(s)) => Some(s),
        _ => None,
    };
    pb::TaskTemplate {
        name: t.name.clone(),
        category: Category::parse(&t.category).map_or(0, |c| to_pb_category(c) as i32),
        args: values,
        kwargs,
        priority: Priority::parse(&t.priority).map_or(0, |p| to_pb_priority(p) as i32),
        max_retries: t.max_retries.map(|r| r as i32),
        queue: t.queue.clone().unwrap_or_default(),
        soft_time_limit: t.soft_ms.and_then(pb_duration_ms),
        time_limit: t.hard_ms.and_then(pb_duration_ms),
        expire_after: t.expire_after_ms.and_then(pb_duration_ms),
        rate_limit_key: t.rate_limit_key.clone().unwrap_or_default(),
        concurrency_key: t.concurrency_key.clone().unwrap_or_default(),
    }
}

fn to_pb(v: View) -> pb::Schedule {
    let s = v.schedule;
    let last_run = v.run.map(|r| {
        let task = v.run_task.as_ref().filter(|t| t.id.as_str() == r.task_id);
        pb::ScheduleRun {
            tick_time: timestamp(r.tick_ms),
            task_id: r.task_id,
            state: task.map_or(0, |t| to_pb_state(t.state) as i32),
            end_time: task.and_then(|t| timestamp(t.finished_ms)),
            error: task
                .and_then(|t| t.error.as_deref())
                .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                .and_then(|e| e["message"].as_str().map(str::to_owned))
                .unwrap_or_default(),
            triggered: r.triggered,
        }
    });
    pb::Schedule {
        name: s.name,
        cron: s.cron,
        time_zone: if s.zone.is_empty() {
            "UTC".to_owned()
        } else {
            s.zone
        },
        task: Some(to_pb_template(&s.task)),
        missed_tick_policy: match s.policy {
            MissedPolicy::Skip => pb::MissedTickPolicy::Skip,
            MissedPolicy::RunOnce => pb::MissedTickPolicy::RunOnce,
        } as i32,
        paused: s.paused,
        source: match s.source {
            Source::Api => pb::ScheduleSource::Api,
            Source::Config => pb::ScheduleSource::Config,
        } as i32,
        next_fire_times: v
            .next
            .into_iter()
            .map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            })
            .collect(),
        last_run,
        create_time: timestamp(Some(s.created_ms)),
        update_time: timestamp(Some(s.updated_ms)),
    }
}

/// A request's schedule, for create: every client field.
fn schedule(s: Option<pb::Schedule>) -> Result<Schedule, Status> {
    let s = s.ok_or_else(|| invalid_argument("schedule", "is required"))?;
    Ok(Schedule {
        name: s.name,
        // stored as it is read: surrounding whitespace (a trailing newline
        // from a shell) would otherwise show in every listing
        cron: s.cron.trim().to_owned(),
        zone: s.time_zone.trim().to_owned(),
        task: template(s.task)?,
        policy: policy(s.missed_tick_policy)?,
        paused: false,
        source: Source::Api,
        config_hash: None,
        created_ms: 0,
        updated_ms: 0,
    })
}

/// A domain error about a request's `schedule` message: its fields are
/// named from there (`schedule.cron`).
fn in_schedule(e: ScheduleError) -> Status {
    e.within("schedule").into()
}

/// A schedule as an audit line names it.
fn schedule_target(name: &str) -> String {
    format!("schedule {}", crate::quote::quote(name))
}

#[tonic::async_trait]
impl pb::schedule_service_server::ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::CreateScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            let name = request.get_ref().schedule.as_ref().map(|s| s.name.as_str());
            schedule_target(name.unwrap_or(""))
        });
        let r = request.into_inner();
        let s = schedule(r.schedule)?;
        let view = self
            .schedules
            .create(s, r.paused, deadline)
            .await
            .map_err(in_schedule)?;
        Ok(Response::new(pb::CreateScheduleResponse {
            schedule: Some(to_pb(view)),
        }))
    }

    async fn get_schedule(
        &self,
        request: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::GetScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        let view = self
            .schedules
            .get(&request.into_inner().name, deadline)
            .await?;
        Ok(Response::new(pb::GetScheduleResponse {
            schedule: Some(to_pb(view)),
        }))
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let size = super::page_size(r.page_size, DEFAULT_PAGE, MAX_PAGE)?;
        let after = super::page_after("ListSchedules", &r.page_token)?;
        let (views, more) = self.schedules.list(after, size, deadline).await?;
        let next_page_token = if more {
            views
                .last()
                .map(|v| super::page_token(&v.schedule.name))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: views.into_iter().map(to_pb).collect(),
            next_page_token,
        }))
    }

    async fn update_schedule(
        &self,
        request: Request<pb::UpdateScheduleRequest>,
    ) -> Result<Response<pb::UpdateScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            let name = request.get_ref().schedule.as_ref().map(|s| s.name.as_str());
            schedule_target(name.unwrap_or(""))
        });
        let r = request.into_inner();
        let s = r
            .schedule
            .ok_or_else(|| invalid_argument("schedule", "is required"))?;
        let paths: Vec<String> = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let all = paths.is_empty();
        let mut patch = Patch::default();
        for p in &paths {
            match p.as_str() {
                "cron" | "time_zone" | "task" | "missed_tick_policy" => {}
                "name" | "paused" | "source" | "next_fire_times" | "last_run" | "create_time"
                | "update_time" => {
                    return Err(invalid_argument(
                        "update_mask",
                        &format!(
                            "{p} cannot be updated (pause and resume with PauseSchedule and ResumeSchedule)"
                        ),
                    ));
                }
                other => {
                    return Err(invalid_argument(
                        "update_mask",
                        &format!(
                            "{other} is not a field of Schedule (cron, time_zone, task, missed_tick_policy)"
                        ),
                    ));
                }
            }
        }
        let wants = |f: &str| all || paths.iter().any(|p| p == f);
        if wants("cron") {
            patch.cron = Some(s.cron.trim().to_owned());
        }
        if wants("time_zone") {
            patch.zone = Some(s.time_zone.trim().to_owned());
        }
        if wants("task") {
            patch.task = Some(template(s.task)?);
        }
        if wants("missed_tick_policy") {
            patch.policy = Some(policy(s.missed_tick_policy)?);
        }
        let view = self
            .schedules
            .update(&s.name, patch, deadline)
            .await
            .map_err(in_schedule)?;
        Ok(Response::new(pb::UpdateScheduleResponse {
            schedule: Some(to_pb(view)),
        }))
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::PauseScheduleRequest>,
    ) -> Result<Response<pb::PauseScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            schedule_target(&request.get_ref().name)
        });
        let view = self
            .schedules
            .set_paused(&request.into_inner().name, true, deadline)
            .await?;
        Ok(Response::new(pb::PauseScheduleResponse {
            schedule: Some(to_pb(view)),
        }))
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::ResumeScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            schedule_target(&request.get_ref().name)
        });
        let view = self
            .schedules
            .set_paused(&request.into_inner().name, false, deadline)
            .await?;
        Ok(Response::new(pb::ResumeScheduleResponse {
            schedule: Some(to_pb(view)),
        }))
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            schedule_target(&request.get_ref().name)
        });
        self.schedules
            .delete(&request.into_inner().name, deadline)
            .await?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    async fn trigger_schedule(
        &self,
        request: Request<pb::TriggerScheduleRequest>,
    ) -> Result<Response<pb::TriggerScheduleResponse>, Status> {
        let deadline = self.deadline(&request);
        audit::target(request.extensions(), || {
            schedule_target(&request.get_ref().name)
        });
        let task = self
            .schedules
            .trigger(&request.into_inner().name, deadline)
            .await?;
        Ok(Response::new(pb::TriggerScheduleResponse {
            task: Some(to_pb_task(task)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use crate::tasks::engine::TaskError;
    use tonic::Code;

    /// Each schedule error lands on the code and message clients had when
    /// schedules borrowed the task errors; fields are named from `schedule`
    /// once.
    #[test]
    fn schedule_errors_keep_their_codes_and_messages() {
        let cases: Vec<(ScheduleError, Code, &str)> = vec![
            (
                ScheduleError::invalid("cron", "bad"),
                Code::InvalidArgument,
                "schedule.cron: bad",
            ),
            (
                ScheduleError::invalid("schedule.task.time_limit", "too long"),
                Code::InvalidArgument,
                "schedule.task.time_limit: too long",
            ),
            (
                ScheduleError::NotFound("nightly".into()),
                Code::NotFound,
                "schedule \"nightly\" not found",
            ),
            (
                ScheduleError::AlreadyExists("nightly".into()),
                Code::AlreadyExists,
                "schedule \"nightly\" already exists",
            ),
            (
                ScheduleError::ConfigDefault {
                    name: "cache-cleanup".into(),
                    variable: "KOO_SCHEDULE_CACHE_CLEANUP",
                },
                Code::FailedPrecondition,
                "schedule \"cache-cleanup\" is a default of the configuration: switch it off there (KOO_SCHEDULE_CACHE_CLEANUP=off) or pause it",
            ),
            (
                StoreError::Unavailable("down".into()).into(),
                Code::Unavailable,
                "backend unavailable: down",
            ),
            (
                TaskError::NotFound(
                    crate::domain::task::TaskId::parse("research~0190aaaaaaaaaaaaaaaaaaaaaaaaaaaa")
                        .unwrap(),
                )
                .into(),
                Code::NotFound,
                "task research~0190aaaaaaaaaaaaaaaaaaaaaaaaaaaa not found (unknown, or its result expired)",
            ),
        ];
        for (e, code, message) in cases {
            let status = in_schedule(e);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
