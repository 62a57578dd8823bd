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

pub mod defaults;
pub mod model;
pub mod spec;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::model::{MissedPolicy, Run, Schedule, Source, check_name};
use self::spec::{CronSpec, DEFAULT_MISSED_CAP, Tick};
use self::store::{ScheduleStore, Snapshot};
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::tasks::engine::{TaskEngine, TaskError};

/// How long each store call may take.
const CALL: Duration = Duration::from_secs(5);
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
    pub task: Option<model::Template>,
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
}

impl Schedules {
    /// Schedules in `store`, submitting through `engine`.
    pub fn new(store: ScheduleStore, engine: TaskEngine) -> Self {
        Self {
            store,
            engine,
            changed: Arc::new(Notify::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &ScheduleStore {
        &self.store
    }

    fn now_ms() -> i64 {
        crate::store::unix_millis(std::time::SystemTime::now())
    }

    /// Creates a schedule (from the API).
    pub async fn create(&self, mut s: Schedule, deadline: Deadline) -> Result<View, TaskError> {
        self.validate(&s)?;
        let now = Self::now_ms();
        s.source = Source::Api;
        s.config_hash = None;
        s.paused = false;
        s.created_ms = now;
        s.updated_ms = now;
        if !self.store.create(&s, deadline).await? {
            return Err(TaskError::AlreadyExists(format!(
                "schedule {} already exists",
                crate::quote::quote(&s.name)
            )));
        }
        self.changed.notify_waiters();
        self.view(s, None, deadline).await
    }

    /// A schedule's own checks, and its template checked as the task
    /// engine would check each tick's submit (the engine's defaults apply:
    /// a `time_limit` below the default soft limit can never be submitted).
    fn validate(&self, s: &Schedule) -> Result<(), TaskError> {
        s.validate()?;
        self.engine
            .check(s.task.to_new_task(&s.name)?, "schedule.task")
    }

    /// Reads a schedule.
    pub async fn get(&self, name: &str, deadline: Deadline) -> Result<View, TaskError> {
        let (s, run) = self.load(name, deadline).await?;
        self.view(s, run, deadline).await
    }

    /// A schedule and its latest run, or NOT_FOUND.
    async fn load(
        &self,
        name: &str,
        deadline: Deadline,
    ) -> Result<(Schedule, Option<Run>), TaskError> {
        check_name(name)?;
        self.store
            .get(name, deadline)
            .await?
            .ok_or_else(|| not_found(name))
    }

    /// Schedules by name, after `after` (exclusive), at most `limit`; and
    /// whether more follow.
    pub async fn list(
        &self,
        after: &str,
        limit: usize,
        deadline: Deadline,
    ) -> Result<(Vec<View>, bool), TaskError> {
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
    ) -> Result<View, TaskError> {
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
    ) -> Result<View, TaskError> {
        self.modify(name, deadline, |s| s.paused = paused).await
    }

    async fn modify(
        &self,
        name: &str,
        deadline: Deadline,
        change: impl FnOnce(&mut Schedule),
    ) -> Result<View, TaskError> {
        let (mut s, run) = self.load(name, deadline).await?;
        change(&mut s);
        self.validate(&s)?;
        s.updated_ms = Self::now_ms();
        if !self.store.replace(&s, deadline).await? {
            return Err(not_found(name));
        }
        self.changed.notify_waiters();
        self.view(s, run, deadline).await
    }

    /// Deletes a schedule. Configuration defaults are switched off in the
    /// configuration instead (or paused): deleted here, they would come back
    /// at the next start.
    pub async fn delete(&self, name: &str, deadline: Deadline) -> Result<(), TaskError> {
        let (s, _) = self.load(name, deadline).await?;
        if s.source == Source::Config {
            return Err(TaskError::FailedPrecondition(format!(
                "schedule {} is a default of the configuration: switch it off there ({}=off) or pause it",
                crate::quote::quote(name),
                defaults::variable_of(name).unwrap_or("KOO_SCHEDULE_*")
            )));
        }
        if !self.store.delete(name, deadline).await? {
            return Err(not_found(name));
        }
        self.changed.notify_waiters();
        Ok(())
    }

    /// Submits a schedule's task now, outside its ticks (paused or not).
    pub async fn trigger(&self, name: &str, deadline: Deadline) -> Result<Task, TaskError> {
        let (s, _) = self.load(name, deadline).await?;
        let new = s.task.to_new_task(&s.name)?;
        let task = self.engine.submit(new, deadline).await?;
        let run = Run {
            tick_ms: None,
            task_id: task.id.to_string(),
            triggered: true,
            fired_ms: Self::now_ms(),
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
    ) -> Result<View, TaskError> {
        let next = match (
            schedule.paused,
            CronSpec::parse(&schedule.cron, &schedule.zone),
        ) {
            (false, Ok(spec)) => spec
                .next_after(Utc::now(), SHOWN_TICKS)
                .into_iter()
                .map(|t| t.at)
                .collect(),
            _ => Vec::new(),
        };
        let run_task = match &run {
            Some(r) => match self.engine.get(&r.task_id, deadline).await {
                Ok(t) => Some(t),
                Err(TaskError::NotFound(_) | TaskError::InvalidArgument { .. }) => None,
                Err(e) => return Err(e),
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
    ) -> Result<(), TaskError> {
        let snap = self.store.snapshot(deadline).await?;
        for d in defaults {
            let stored = snap.schedules.get(&d.name);
            if stored.is_some_and(|s| s.source == Source::Api) {
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
                    let now = Self::now_ms();
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

fn not_found(name: &str) -> TaskError {
    TaskError::Missing(crate::tasks::error::Missing::Schedule(name.to_owned()))
}

/// One schedule as the runner tracks it.
struct Entry {
    schedule: Schedule,
    spec: CronSpec,
    next: Option<Tick>,
}

/// Runs the scheduler until `stop`: applies the configuration's defaults,
/// catches up missed ticks by each schedule's policy, then fires every tick
/// of every schedule that is not paused. Changes made through any instance
/// are picked up within `reload` (at once for changes made here).
pub async fn run(
    schedules: Schedules,
    defaults: Vec<defaults::Default>,
    reload: Duration,
    stop: CancellationToken,
) {
    // The defaults, and a first load: retried until the store answers.
    let mut snap = loop {
        let deadline = Deadline::after(CALL);
        let loaded = async {
            schedules.apply_defaults(&defaults, deadline).await?;
            Ok::<_, TaskError>(schedules.store.snapshot(deadline).await?)
        }
        .await;
        match loaded {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: cannot load schedules; retrying in a second");
                // or as soon as the store answers again after an outage
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = schedules.engine.store().recovered() => {}
                }
            }
        }
    };
    let mut entries = std::collections::HashMap::new();
    rebuild(&mut entries, &snap);
    catch_up(&schedules, &entries, &snap);
    tokio::spawn(finish_claimed(schedules.clone(), entries_now(&entries)));
    tracing::info!(schedules = entries.len(), "scheduler running");
    loop {
        let now = Utc::now();
        for (name, e) in entries.iter_mut() {
            if e.schedule.paused {
                continue;
            }
            while let Some(tick) = e.next.take_if(|t| t.at <= now) {
                tokio::spawn(fire(schedules.clone(), e.schedule.clone(), tick.clone()));
                e.next = e.spec.next_tick(tick.at);
                tracing::trace!(schedule = %name, "tick");
            }
        }
        let next_tick = entries
            .values()
            .filter(|e| !e.schedule.paused)
            .filter_map(|e| e.next.as_ref().map(|t| t.at))
            .min();
        let until_tick = next_tick
            .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(reload);
        // A store back from an outage may have lost its data: reload at once.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(until_tick.min(reload)) => {}
            _ = schedules.changed.notified() => {}
            _ = schedules.engine.store().recovered() => {}
        }
        // a change made anywhere (or a store that lost its data): reload
        match schedules.store.version(Deadline::after(CALL)).await {
            Ok(v) if v != snap.version => match load_all(&schedules, &defaults).await {
                Ok(s) => {
                    snap = s;
                    rebuild(&mut entries, &snap);
                }
                Err(e) => tracing::warn!(error = %e, "scheduler: cannot reload schedules"),
            },
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "scheduler: cannot read the schedules' version"),
        }
    }
}

/// Reads every schedule. A configured default missing from the store can
/// only mean the store lost its data (defaults cannot be deleted over the
/// API; a Redis restarted empty): they are stored again from the
/// configuration.
async fn load_all(
    schedules: &Schedules,
    defaults: &[defaults::Default],
) -> Result<Snapshot, TaskError> {
    let deadline = Deadline::after(CALL);
    let snap = schedules.store.snapshot(deadline).await?;
    let lost = defaults
        .iter()
        .any(|d| d.cron.is_some() && !snap.schedules.contains_key(&d.name));
    if !lost {
        return Ok(snap);
    }
    tracing::warn!(
        "the schedule store has lost the configured default schedules (a Redis restarted empty?): storing them again"
    );
    schedules.apply_defaults(defaults, deadline).await?;
    Ok(schedules.store.snapshot(deadline).await?)
}

/// Brings the runner's entries up to `snap`: an unchanged schedule keeps its
/// next tick; a new or changed one starts from the next tick after now.
fn rebuild(entries: &mut std::collections::HashMap<String, Entry>, snap: &Snapshot) {
    entries.retain(|name, _| snap.schedules.contains_key(name));
    let now = Utc::now();
    for (name, s) in &snap.schedules {
        if entries.get(name).is_some_and(|e| e.schedule == *s) {
            continue;
        }
        match CronSpec::parse(&s.cron, &s.zone) {
            Ok(spec) => {
                let next = spec.next_tick(now);
                entries.insert(
                    name.clone(),
                    Entry {
                        schedule: s.clone(),
                        spec,
                        next,
                    },
                );
            }
            Err(e) => {
                entries.remove(name);
                tracing::warn!(schedule = %name, error = %e, "skipping a stored schedule that does not parse");
            }
        }
    }
}

/// After downtime: for each schedule whose policy is to run once, the
/// latest tick missed since its last run (or its last change) fires now.
/// Keyed like any tick, so instances starting together submit it once.
fn catch_up(
    schedules: &Schedules,
    entries: &std::collections::HashMap<String, Entry>,
    snap: &Snapshot,
) {
    let now = Utc::now();
    for (name, e) in entries {
        if e.schedule.paused || e.schedule.policy != MissedPolicy::RunOnce {
            continue;
        }
        let last = snap
            .runs
            .get(name)
            .map(|r| r.tick_ms.unwrap_or(r.fired_ms))
            .unwrap_or(i64::MIN);
        let since_ms = last.max(e.schedule.updated_ms);
        let Some(since) = DateTime::<Utc>::from_timestamp_millis(since_ms) else {
            continue;
        };
        // the tick due right now is not "missed": the loop fires it
        let until = now - chrono::Duration::seconds(1);
        if until <= since {
            continue;
        }
        let missed = e.spec.missed(since, until, DEFAULT_MISSED_CAP);
        if let Some(tick) = missed.latest {
            tracing::info!(schedule = %name, missed = missed.count, tick = %tick.key, "running the latest missed tick once");
            tokio::spawn(fire(schedules.clone(), e.schedule.clone(), tick));
        }
    }
}

/// How far back a starting scheduler looks for ticks that another
/// scheduler fired but may not have finished: longer than [`fire`] retries
/// (a minute) plus the store calls, so that a tick fired by schedulers that
/// all died is finished by any scheduler started before the last of them
/// gave up.
const CLAIMED_WINDOW: Duration = Duration::from_secs(120);
/// The most recent ticks per schedule that a starting scheduler checks.
const CLAIMED_CAP: usize = 120;

/// The schedules (not paused) a runner fires, as of now.
fn entries_now(entries: &std::collections::HashMap<String, Entry>) -> Vec<(Schedule, CronSpec)> {
    entries
        .values()
        .filter(|e| !e.schedule.paused)
        .map(|e| (e.schedule.clone(), e.spec.clone()))
        .collect()
}

/// Finishes ticks that another scheduler fired and may have left without a
/// task. A tick's idempotency claim is taken before its task is stored; if
/// every scheduler that fired it dies (or Redis restarts) between the two,
/// the claim is all that is left, and only those schedulers would have
/// retried it. So a starting scheduler fires again every recent tick whose
/// claim exists: the idempotent submit answers at once when the task is
/// there, and otherwise takes the orphaned claim over and stores the task.
/// A tick without a claim was never fired and stays the missed-tick
/// policy's business.
async fn finish_claimed(schedules: Schedules, entries: Vec<(Schedule, CronSpec)>) {
    let now = Utc::now();
    let Ok(window) = chrono::Duration::from_std(CLAIMED_WINDOW) else {
        return;
    };
    for (schedule, spec) in entries {
        let mut ticks = Vec::new();
        let mut at = now - window;
        while let Some(tick) = spec.next_tick(at).filter(|t| t.at < now) {
            at = tick.at;
            ticks.push(tick);
        }
        let skip = ticks.len().saturating_sub(CLAIMED_CAP);
        let ticks = ticks.split_off(skip);
        let keys: Vec<String> = ticks
            .iter()
            .map(|t| t.idempotency_key(&schedule.name))
            .collect();
        let claimed = match schedules
            .engine
            .store()
            .idempotency_claimed(&keys, Deadline::after(CALL))
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(schedule = %schedule.name, error = %e, "cannot check recent ticks for unfinished claims");
                continue;
            }
        };
        for (tick, _) in ticks.into_iter().zip(claimed).filter(|(_, c)| *c) {
            tokio::spawn(fire(schedules.clone(), schedule.clone(), tick));
        }
    }
}

/// Submits one tick's task (idempotently) and records the run. Retried
/// while the store is unavailable, for up to a minute.
async fn fire(schedules: Schedules, schedule: Schedule, tick: Tick) {
    let tick_ms = tick.at.timestamp_millis();
    let mut new = match schedule.task.to_new_task(&schedule.name) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(schedule = %schedule.name, error = %e, "cannot build the scheduled task");
            return;
        }
    };
    new.schedule_tick_ms = Some(tick_ms);
    new.idempotency_key = Some(tick.idempotency_key(&schedule.name));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut backoff = Duration::from_millis(200);
    let task = loop {
        match schedules
            .engine
            .submit_keyed(new.clone(), Deadline::after(CALL))
            .await
        {
            // another instance stored this tick's task (and records its run)
            Ok((_, true)) => return,
            Ok((task, false)) => {
                tracing::info!(schedule = %schedule.name, tick = %tick.key, task = %task.id, "scheduled task submitted");
                break task;
            }
            // another instance fired this tick from a different version of
            // the schedule (changed meanwhile): the tick has its task
            Err(TaskError::AlreadyExists(_)) => return,
            Err(e @ TaskError::Store(_)) if tokio::time::Instant::now() < give_up => {
                tracing::warn!(schedule = %schedule.name, error = %e, "cannot submit a scheduled task; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(schedule = %schedule.name, tick = %tick.key, error = %e, "scheduled task not submitted");
                return;
            }
        }
    };
    let run = Run {
        tick_ms: Some(tick_ms),
        task_id: task.id.to_string(),
        triggered: false,
        fired_ms: tick_ms,
    };
    if let Err(e) = schedules
        .store
        .record_run(&schedule.name, &run, Deadline::after(CALL))
        .await
    {
        tracing::debug!(schedule = %schedule.name, error = %e, "cannot record a scheduled run");
    }
}
