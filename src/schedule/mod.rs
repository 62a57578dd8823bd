//! Cron-driven periodic jobs: schedules stored with the tasks, managed at
//! run time, fired by every koo instance that runs the scheduler.
//!
//! Exactly once per tick: each instance computes every schedule's ticks
//! itself ([`spec`]) and submits a tick's task through the task engine's
//! idempotent submit, keyed `schedule:{name}:{tick}` where `tick` names the
//! *scheduled* local time ([`spec::Tick::key`]). However many instances fire
//! a tick, and whichever of them dies while firing, one task is stored (a
//! claim left by a dead instance is taken over by the next submit, see
//! `TaskEngine::submit_keyed`).
//!
//! Timing: the runner sleeps until the next tick of any schedule. It does
//! not use `tokio-cron-scheduler`'s jobs: in 0.15 a job's time zone is
//! applied with the UTC offset frozen at the job's creation, so after a
//! daylight-saving change it fires an hour off (upstream issues #87 and
//! #107). The expressions are parsed by `croner`, the parser that crate
//! uses, so the syntax is the same.

pub mod checks;
pub mod defaults;
pub mod error;
mod runner;
pub mod spec;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use self::checks::{check_name, new_task};
pub use self::error::ScheduleError;
pub use self::runner::run;
use self::spec::CronSpec;
use crate::domain::schedule::{MissedPolicy, Run, Schedule, Source, Template};
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::store::clock::Clock;
pub use crate::store::schedules::ScheduleStore;
use crate::tasks::engine::{TaskEngine, TaskError};
/// Next fire times shown by GetSchedule.
const SHOWN_TICKS: usize = 5;

/// A schedule as shown: its definition, next fire times, latest run and
/// that run's task (if its record has not expired).
#[derive(Debug, Clone)]
pub struct View {
    /// The definition.
    pub schedule: Schedule,
    /// The next fire times (none while paused).
    pub next: Vec<DateTime<Utc>>,
    /// The latest run.
    pub run: Option<Run>,
    /// That run's task.
    pub run_task: Option<Task>,
}

/// What an update changes.
#[derive(Debug, Clone, Default)]
pub struct Patch {
    /// A new expression.
    pub cron: Option<String>,
    /// A new zone.
    pub zone: Option<String>,
    /// A new task template.
    pub task: Option<Template>,
    /// A new missed-tick policy.
    pub policy: Option<MissedPolicy>,
}

/// Schedules: the run-time API over the store.
#[derive(Clone)]
pub struct Schedules {
    store: ScheduleStore,
    engine: TaskEngine,
    /// Wakes this process's runner at once after a local change.
    changed: Arc<Notify>,
    /// The scheduler's now: the real clock, unless a test moves it ahead.
    clock: Clock,
    /// What this process's runner did, for `/metrics`.
    figures: Arc<ScheduleFigures>,
}

/// Ticks this process's scheduler handled (per instance; not by schedule:
/// schedule names are the users', and would make the label set unbounded).
#[derive(Debug, Default)]
pub struct ScheduleFigures {
    /// Ticks whose task this process submitted.
    pub fired: AtomicU64,
    /// Ticks found missed after downtime (each policy decides whether the
    /// latest one still runs).
    pub missed: AtomicU64,
    /// Ticks whose task could not be submitted.
    pub failed: AtomicU64,
}

impl Schedules {
    /// Schedules in `store`, submitting through `engine`.
    pub fn new(store: ScheduleStore, engine: TaskEngine) -> Self {
        Self {
            store,
            engine,
            changed: Arc::new(Notify::new()),
            clock: Clock::system(),
            figures: Arc::default(),
        }
    }

    /// What this process's scheduler did.
    pub fn figures(&self) -> &ScheduleFigures {
        &self.figures
    }

    /// The same, on `clock`: ticks are computed and fired by its time, so
    /// that tests move it ahead instead of waiting for ticks in real time.
    /// The runner sees a moved clock at its next wake, within the reload
    /// interval (a `Clock` has no wake-up of its own to offer).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The store.
    pub fn store(&self) -> &ScheduleStore {
        &self.store
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Now, by the scheduler's clock.
    fn now(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_else(Utc::now)
    }

    /// Creates a schedule (from the API).
    pub async fn create(
        &self,
        mut s: Schedule,
        paused: bool,
        deadline: Deadline,
    ) -> Result<View, ScheduleError> {
        self.validate(&s)?;
        let now = self.now_ms();
        s.source = Source::Api;
        s.config_hash = None;
        s.paused = paused;
        s.created_ms = now;
        s.updated_ms = now;
        if !self.store.create(&s, deadline).await? {
            return Err(ScheduleError::AlreadyExists(s.name));
        }
        self.changed.notify_waiters();
        self.view(s, None, deadline).await
    }

    /// A schedule's own checks, and its template checked as the task
    /// engine would check each tick's submit (the engine's defaults apply:
    /// a `time_limit` below the default soft limit can never be submitted).
    fn validate(&self, s: &Schedule) -> Result<(), ScheduleError> {
        checks::validate(s)?;
        self.engine
            .check(new_task(&s.task, &s.name)?, "schedule.task")
            .map_err(ScheduleError::of_template)
    }

    /// Reads a schedule.
    pub async fn get(&self, name: &str, deadline: Deadline) -> Result<View, ScheduleError> {
        let (s, run) = self.load(name, deadline).await?;
        self.view(s, run, deadline).await
    }

    /// A schedule and its latest run, or NOT_FOUND.
    async fn load(
        &self,
        name: &str,
        deadline: Deadline,
    ) -> Result<(Schedule, Option<Run>), ScheduleError> {
        check_name(name)?;
        self.store
            .get(name, deadline)
            .await?
            .ok_or_else(|| ScheduleError::NotFound(name.to_owned()))
    }

    /// Schedules by name, after `after` (exclusive), at most `limit`; and
    /// whether more follow.
    pub async fn list(
        &self,
        after: &str,
        limit: usize,
        deadline: Deadline,
    ) -> Result<(Vec<View>, bool), ScheduleError> {
        let snap = self.store.snapshot(deadline).await?;
        let mut names = snap
            .schedules
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .map(|(n, _)| n.clone());
        let page: Vec<String> = names.by_ref().take(limit).collect();
        let more = names.next().is_some();
        let mut out = Vec::with_capacity(page.len());
        for name in page {
            let s = snap.schedules[&name].clone();
            let run = snap.runs.get(&name).cloned();
            out.push(self.view(s, run, deadline).await?);
        }
        Ok((out, more))
    }

    /// Changes a schedule.
    pub async fn update(
        &self,
        name: &str,
        patch: Patch,
        deadline: Deadline,
    ) -> Result<View, ScheduleError> {
        self.modify(name, deadline, |s| {
            if let Some(c) = patch.cron {
                s.cron = c;
            }
            if let Some(z) = patch.zone {
                s.zone = z;
            }
            if let Some(t) = patch.task {
                s.task = t;
            }
            if let Some(p) = patch.policy {
                s.policy = p;
            }
        })
        .await
    }

    /// Pauses (or resumes) a schedule. Resuming does not run the ticks
    /// missed while paused.
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        deadline: Deadline,
    ) -> Result<View, ScheduleError> {
        self.modify(name, deadline, |s| s.paused = paused).await
    }

    async fn modify(
        &self,
        name: &str,
        deadline: Deadline,
        change: impl FnOnce(&mut Schedule),
    ) -> Result<View, ScheduleError> {
        let (mut s, run) = self.load(name, deadline).await?;
        change(&mut s);
        self.validate(&s)?;
        s.updated_ms = self.now_ms();
        if !self.store.replace(&s, deadline).await? {
            return Err(ScheduleError::NotFound(name.to_owned()));
        }
        self.changed.notify_waiters();
        self.view(s, run, deadline).await
    }

    /// Deletes a schedule. Configuration defaults are switched off in the
    /// configuration instead (or paused): deleted here, they would come back
    /// at the next start.
    pub async fn delete(&self, name: &str, deadline: Deadline) -> Result<(), ScheduleError> {
        let (s, _) = self.load(name, deadline).await?;
        if s.source == Source::Config {
            return Err(ScheduleError::ConfigDefault {
                name: name.to_owned(),
                variable: defaults::variable_of(name).unwrap_or("KOO_SCHEDULE_*"),
            });
        }
        if !self.store.delete(name, deadline).await? {
            return Err(ScheduleError::NotFound(name.to_owned()));
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Submits a schedule's task now, outside its ticks (paused or not).
    pub async fn trigger(&self, name: &str, deadline: Deadline) -> Result<Task, ScheduleError> {
        let (s, _) = self.load(name, deadline).await?;
        let mut new = new_task(&s.task, &s.name)?;
        // a trigger joins the trace of its call (exported traces only)
        if crate::trace::tracer().is_some() {
            new.trace = crate::trace::Carried::of_context(&opentelemetry::Context::current());
        }
        let task = self.engine.submit(new, deadline).await?;
        let run = Run {
            tick_ms: None,
            task_id: task.id.to_string(),
            triggered: true,
            fired_ms: self.now_ms(),
        };
        if let Err(e) = self.store.record_run(name, &run, deadline).await {
            tracing::warn!(schedule = name, error = %e, "cannot record a triggered run");
        }
        Ok(task)
    }

    async fn view(
        &self,
        schedule: Schedule,
        run: Option<Run>,
        deadline: Deadline,
    ) -> Result<View, ScheduleError> {
        let next = match (
            schedule.paused,
            CronSpec::parse(&schedule.cron, &schedule.zone),
        ) {
            (false, Ok(spec)) => spec
                .next_after(self.now(), SHOWN_TICKS)
                .into_iter()
                .map(|t| t.at)
                .collect(),
            _ => Vec::new(),
        };
        let run_task = match &run {
            Some(r) => match self.engine.get(&r.task_id, deadline).await {
                Ok(t) => Some(t),
                Err(TaskError::NotFound(_) | TaskError::InvalidArgument { .. }) => None,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        Ok(View {
            schedule,
            next,
            run,
            run_task,
        })
    }

    /// Stores the configuration's defaults: a default not stored yet is
    /// created; one whose configured definition changed is replaced
    /// (run-time edits to it are dropped); one stored from an unchanged
    /// definition keeps its run-time edits (pauses included); one switched
    /// off is removed. A schedule of the same name created through the API
    /// is left alone.
    pub async fn apply_defaults(
        &self,
        defaults: &[defaults::Default],
        deadline: Deadline,
    ) -> Result<(), ScheduleError> {
        let snap = self.store.snapshot(deadline).await?;
        for d in defaults {
            let stored = snap.schedules.get(&d.name);
            if let Some(s) = stored.filter(|s| s.source == Source::Api) {
                // the operator's schedule wins, but the default it hides
                // (a maintenance task that then never runs) is said
                if d.cron.is_some() {
                    tracing::warn!(
                        schedule = %d.name,
                        task = %s.task.name,
                        variable = d.variable,
                        "a schedule created through the API has a default schedule's name: it is kept, and the default ({}) does not run; rename or delete it to get the default back",
                        d.task.name
                    );
                }
                continue;
            }
            match (&d.cron, stored) {
                (None, Some(_)) => {
                    self.store.delete(&d.name, deadline).await?;
                    tracing::info!(schedule = %d.name, "default schedule switched off by configuration");
                }
                (None, None) => {}
                (Some(_), Some(s)) if s.config_hash.as_deref() == Some(d.hash().as_str()) => {}
                (Some(_), old) => {
                    let now = self.now_ms();
                    let mut s = d.schedule(now).expect("validated at start-up");
                    if let Some(old) = old {
                        s.created_ms = old.created_ms;
                    }
                    self.store.upsert(&s, deadline).await?;
                    tracing::info!(schedule = %d.name, cron = %s.cron, "default schedule stored");
                }
            }
        }
        self.changed.notify_waiters();
        Ok(())
    }
}
