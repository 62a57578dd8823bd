//! The scheduler loop: fires every tick of every schedule that is not
//! paused, by the schedules' clock; picks up changes made anywhere; catches
//! up missed ticks by each schedule's policy; finishes ticks that schedulers
//! which died left without a task.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::checks::new_task;
use super::spec::{CronSpec, DEFAULT_MISSED_CAP, Tick};
use super::{ScheduleError, Schedules, defaults};
use crate::domain::schedule::{MissedPolicy, Run, Schedule};
use crate::store::Deadline;
use crate::store::schedules::Snapshot;
use crate::tasks::engine::TaskError;

/// How long each store call may take.
const CALL: Duration = Duration::from_secs(5);

/// One schedule as the runner tracks it.
struct Entry {
    schedule: Schedule,
    spec: CronSpec,
    next: Option<Tick>,
}

/// The first load's run of failures (see [`crate::repeats`]).
static LOAD: crate::repeats::Repeats = crate::repeats::Repeats::new();

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
    let Some(mut snap) = first_load(&schedules, &defaults, &stop).await else {
        return;
    };
    let mut entries = HashMap::new();
    // one instant splits the ticks: those at or before it are missed
    // (caught up by policy), those after it the loop's
    let started = schedules.now();
    rebuild(&mut entries, &snap, started);
    catch_up(&schedules, &entries, &snap, started);
    tokio::spawn(finish_claimed(schedules.clone(), entries_now(&entries)));
    tracing::info!(schedules = entries.len(), "scheduler running");
    loop {
        let now = schedules.now();
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
            .map(|at| (at - schedules.now()).to_std().unwrap_or(Duration::ZERO))
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
                    rebuild(&mut entries, &snap, schedules.now());
                }
                Err(e) => tracing::warn!(error = %e, "scheduler: cannot reload schedules"),
            },
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "scheduler: cannot read the schedules' version"),
        }
    }
}

/// The defaults stored, and a first load: retried until the store answers
/// (`None`: stopped meanwhile).
async fn first_load(
    schedules: &Schedules,
    defaults: &[defaults::Default],
    stop: &CancellationToken,
) -> Option<Snapshot> {
    loop {
        let deadline = Deadline::after(CALL);
        let loaded = async {
            schedules.apply_defaults(defaults, deadline).await?;
            Ok::<_, ScheduleError>(schedules.store.snapshot(deadline).await?)
        }
        .await;
        match loaded {
            Ok(s) => {
                let failed = LOAD.succeeded("");
                if failed > 0 {
                    tracing::info!(failed, "scheduler: loading schedules works again");
                }
                return Some(s);
            }
            Err(e) => {
                crate::repeats::warn_once_per_run!(LOAD, "", error = %e, "scheduler: cannot load schedules; retrying in a second (repeats are logged at debug until it works again)");
                // or as soon as the store answers again after an outage
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = schedules.engine.store().recovered() => {}
                }
            }
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
) -> Result<Snapshot, ScheduleError> {
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
fn rebuild(entries: &mut HashMap<String, Entry>, snap: &Snapshot, now: DateTime<Utc>) {
    entries.retain(|name, _| snap.schedules.contains_key(name));
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

/// After downtime: the ticks missed since each schedule's last run (or its
/// last change) are counted, whatever the policy; for a schedule whose
/// policy is to run once, the latest fires now. Keyed like any tick, so
/// instances starting together submit it once.
fn catch_up(
    schedules: &Schedules,
    entries: &HashMap<String, Entry>,
    snap: &Snapshot,
    now: DateTime<Utc>,
) {
    for (name, e) in entries {
        if e.schedule.paused {
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
        // the loop fires the ticks after `now` (rebuilt from it): a tick
        // that passed a moment before start-up is fired here, not lost
        // between the two (it was, when this looked only up to a second ago)
        if now <= since {
            continue;
        }
        let missed = e.spec.missed(since, now, DEFAULT_MISSED_CAP);
        // a tick of the last second is late, not missed: it is fired
        // whatever the policy (another scheduler may have fired it a moment
        // ago, its run not yet recorded: its key makes this a no-op)
        let recent = now - chrono::Duration::seconds(1);
        let late = missed.latest.clone().filter(|t| t.at > recent);
        let count = match late {
            Some(_) => e.spec.missed(since, recent, DEFAULT_MISSED_CAP).count,
            None => missed.count,
        };
        schedules.figures().missed.fetch_add(count as u64, Relaxed);
        if let Some(tick) = late {
            tracing::debug!(schedule = %name, tick = %tick.key, "firing a tick due a moment before start-up");
            tokio::spawn(fire(schedules.clone(), e.schedule.clone(), tick));
            continue;
        }
        if e.schedule.policy != MissedPolicy::RunOnce {
            continue;
        }
        if let Some(tick) = missed.latest {
            tracing::info!(schedule = %name, missed = count, tick = %tick.key, "running the latest missed tick once");
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
fn entries_now(entries: &HashMap<String, Entry>) -> Vec<(Schedule, CronSpec)> {
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
    let now = schedules.now();
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
    let mut new = match new_task(&schedule.task, &schedule.name) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(schedule = %schedule.name, error = %e, "cannot build the scheduled task");
            return;
        }
    };
    new.schedule_tick_ms = Some(tick_ms);
    new.idempotency_key = Some(tick.idempotency_key(&schedule.name));
    // the fire's span (exported traces only), ended when this returns
    let span = crate::trace::run::fire(&schedule.name, tick_ms);
    new.trace = span.as_ref().and_then(crate::trace::Carried::of_context);
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
                schedules.figures().fired.fetch_add(1, Relaxed);
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
                schedules.figures().failed.fetch_add(1, Relaxed);
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
