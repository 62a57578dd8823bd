//! The embedded task store's side of the journal
//! (`crate::store::memory::journal`): the records its transitions append,
//! and their replay on a loaded save after a crash.
//!
//! Replay runs each record through the transition that made it, at the
//! store's clock of the time, and skips what the save already holds (a
//! submit of an id that exists; a debounced replace of a task that has
//! started since). What is not journaled (leases, ends) is what a crash
//! undoes: a task restored as submitted runs again.

use std::time::Duration;

use super::MemoryTasks;
use super::state::Tasks;
use crate::domain::Pause;
use crate::domain::flow::Limit;
use crate::domain::task::{QueueName, State, Task, TaskId};
use crate::store::Result;
use crate::store::memory::journal::{Record, TaskFields};
use crate::store::tasks::{DebounceReply, RetryReply, TaskLimits};

/// Whether a replayed submit was applied; one refused (the store full, say)
/// is logged with its id, since its caller was told it was stored.
fn applied(task: &Task, outcome: Result<()>) -> bool {
    match outcome {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(task = %task.id, error = %e, "a journaled submit could not be replayed");
            false
        }
    }
}

/// A duration as the journal's milliseconds.
pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn fields(task: &Task) -> TaskFields {
    TaskFields(Box::new(task.clone()))
}

fn task_id(id: &str) -> std::result::Result<TaskId, String> {
    TaskId::parse(id).map_err(|e| format!("task id {id:?}: {e}"))
}

pub(super) fn submitted(task: &Task, delay: Duration, now: i64) -> Record {
    Record::Submit {
        now,
        delay_ms: ms(delay),
        task: fields(task),
    }
}

pub(super) fn pending(task: &Task, waiting: &[TaskId], now: i64) -> Record {
    Record::Pending {
        now,
        waiting: waiting.iter().map(ToString::to_string).collect(),
        task: fields(task),
    }
}

pub(super) fn debounced(
    task: &Task,
    window: Duration,
    reply: &Result<DebounceReply>,
    now: i64,
) -> Option<Record> {
    let replaced = match reply {
        Ok(DebounceReply::Created) => None,
        Ok(DebounceReply::Replaced(held)) => Some(held.to_string()),
        Ok(DebounceReply::Conflict { .. }) | Err(_) => return None,
    };
    Some(Record::Debounce {
        now,
        window_ms: ms(window),
        task: fields(task),
        replaced,
    })
}

/// A queue's pause as it stands after a pause or a resume.
pub(super) fn paused(queue: &QueueName, pause: Option<&Pause>) -> Record {
    Record::Pause {
        queue: queue.to_string(),
        pause: pause.map(|p| {
            p.to_stored()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect()
        }),
    }
}

impl Tasks {
    /// Applies one journaled record; whether it changed anything (false:
    /// the save already held it). An error names what cannot be read.
    fn replay(&mut self, record: Record, limits: TaskLimits) -> std::result::Result<bool, String> {
        Ok(match record {
            Record::Submit {
                now,
                delay_ms,
                task,
            } => {
                let task = *task.0;
                !self.tasks.contains_key(task.id.as_str())
                    && applied(
                        &task,
                        self.submit(&task, Duration::from_millis(delay_ms), limits, now),
                    )
            }
            Record::Pending { now, waiting, task } => {
                let task = *task.0;
                let waiting = waiting
                    .iter()
                    .map(|w| task_id(w))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                !self.tasks.contains_key(task.id.as_str())
                    && applied(&task, self.submit_pending(&task, &waiting, limits, now))
            }
            Record::Debounce {
                now,
                window_ms,
                task,
                replaced,
            } => self.replay_debounce(*task.0, window_ms, replaced, limits, now),
            Record::DependOn { now, id, dependent } => {
                let (id, dependent) = (task_id(&id)?, task_id(&dependent)?);
                self.depend_on(&id, &dependent, now);
                true
            }
            Record::Claim {
                now,
                key,
                value,
                ttl_ms,
            } => self
                .claim_idempotency(&key, &value, Duration::from_millis(ttl_ms), now)
                .is_none(),
            Record::Swap {
                now,
                key,
                old,
                new,
                ttl_ms,
            } => self.swap_idempotency(&key, &old, &new, Duration::from_millis(ttl_ms), now),
            Record::Cancel { now, id, reason } => {
                self.cancel(&task_id(&id)?, &reason, limits, now);
                true
            }
            Record::Retry { now, id } => self.replay_retry(&task_id(&id)?, limits, now),
            Record::Pause { queue, pause } => {
                let name = QueueName::parse(&queue).map_err(|e| format!("queue {queue:?}: {e}"))?;
                let pause = match pause {
                    None => None,
                    Some(stored) => Some(Pause::from_stored(stored.clone()).ok_or_else(|| {
                        format!("the pause of queue {queue:?} does not parse: {stored:?}")
                    })?),
                };
                self.queues.entry(name).or_default().paused = pause;
                true
            }
            Record::SetLimit { field, value } => {
                let limit = Limit::decode(&field, &value)
                    .ok_or_else(|| format!("flow limit {field:?} = {value:?} does not parse"))?;
                self.flow.set(&limit);
                true
            }
            Record::DeleteLimit { field } => self.flow.delete(&field),
            Record::PutSchedule { .. }
            | Record::DeleteSchedule { .. }
            | Record::ScheduleRun { .. } => false,
        })
    }

    /// A retry by hand again. A task the save has running (its attempt's
    /// end was not journaled, and the retry was asked after it) is handed
    /// back to its queue as a stopping worker's task is, its attempt given
    /// back: otherwise the sweep would end it on its spent budget and the
    /// retry the caller was told of would never run.
    fn replay_retry(&mut self, id: &TaskId, limits: TaskLimits, now: i64) -> bool {
        let running = self
            .tasks
            .get(id.as_str())
            .filter(|e| e.task.state == State::Running)
            .map(|e| {
                (
                    e.task.token,
                    e.task.attempts,
                    e.task.worker.clone(),
                    e.task.started_ms,
                )
            });
        let Some((token, attempt, worker, started_ms)) = running else {
            return matches!(self.retry(id, limits, now), RetryReply::Queued);
        };
        let entry = serde_json::json!({
            "attempt": attempt,
            "worker": worker,
            "started_ms": started_ms,
            "outcome": "handed_back",
            "error": "koo restarted after a crash; a retry was asked after this attempt",
        });
        if !matches!(
            self.release(id, token, &entry.to_string(), limits, now),
            Ok(true)
        ) {
            return false;
        }
        // and as a retry does: a fresh budget, no cancel pending
        if let Some(e) = self.tasks.get_mut(id.as_str()) {
            e.attempt_base = e.task.attempts;
            e.cancel = None;
        }
        true
    }

    /// A debounced submit again: a task it created is created again unless
    /// it exists; a replace is made again only while the task it replaced
    /// still holds the key unstarted (otherwise the save has it started).
    fn replay_debounce(
        &mut self,
        task: Task,
        window_ms: u64,
        replaced: Option<String>,
        limits: TaskLimits,
        now: i64,
    ) -> bool {
        let window = Duration::from_millis(window_ms);
        let key = task.debounce_key.clone().unwrap_or_default();
        let queue = task.id.queue();
        match replaced {
            Some(held) => {
                let holds = self
                    .queues
                    .get(&queue)
                    .is_some_and(|q| q.debounce.get(&key) == Some(&held));
                let unstarted = self
                    .tasks
                    .get(&held)
                    .is_some_and(|e| matches!(e.task.state, State::Scheduled | State::Queued));
                holds && unstarted && self.submit_debounced(&task, window, limits, now).is_ok()
            }
            None => {
                !self.tasks.contains_key(task.id.as_str())
                    && applied(&task, self.debounce_create(&task, window, limits, now))
            }
        }
    }
}

impl MemoryTasks {
    /// Applies journaled records in order on the loaded store (before it
    /// serves); how many changed it. An error names the record that cannot
    /// be read.
    pub fn replay(
        &self,
        records: impl IntoIterator<Item = Record>,
        limits: TaskLimits,
    ) -> std::result::Result<u64, String> {
        let mut applied = 0;
        let last = {
            let mut s = self.lock();
            // results that expired while koo was down make room first
            s.purge_expired(self.now_ms());
            for record in records {
                if s.replay(record, limits)? {
                    applied += 1;
                }
            }
            let now = self.now_ms();
            s.release_deferred(now);
            s.last_event
        };
        self.announce(last);
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::domain::task::{Category, Priority};
    use crate::store::Deadline;
    use crate::store::memory::journal::Journal;
    use crate::store::tasks::{CancelReply, TaskBackend};

    /// A journal in memory: the records, in order.
    #[derive(Default)]
    struct Lines(Mutex<Vec<Record>>);

    #[async_trait::async_trait]
    impl Journal for Lines {
        fn append(&self, record: Record) -> u64 {
            let mut v = self.0.lock().unwrap();
            v.push(record);
            v.len() as u64
        }
        async fn kept(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
    }

    fn task(queue: &QueueName, i: u32) -> Task {
        Task {
            id: TaskId::generate(queue),
            name: "koo.diagnostics.noop".into(),
            category: Category::Research,
            priority: Priority::Normal,
            args: format!("[{i}]"),
            state: State::Queued,
            max_retries: 0,
            result_ttl_ms: 3_600_000,
            ..Task::sample(0, 0)
        }
    }

    fn dl() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    /// The next task of `q` for worker `w`, if one may start.
    async fn lease(store: &MemoryTasks, q: &QueueName) -> Option<Task> {
        store
            .lease(
                q,
                "w",
                Duration::from_secs(30),
                &["koo.diagnostics.noop"],
                TaskLimits::default(),
                dl(),
            )
            .await
            .unwrap()
    }

    fn records(lines: &Lines) -> Vec<Record> {
        lines.0.lock().unwrap().clone()
    }

    /// Every acknowledged change made on an empty store comes back when its
    /// records are replayed on another empty store; replaying them again
    /// on top changes nothing; a lease is not journaled, so the task comes
    /// back queued.
    #[tokio::test]
    async fn replay_gives_back_what_callers_were_told() {
        let lines = Arc::new(Lines::default());
        let a = MemoryTasks::default();
        a.set_journal(lines.clone());
        let q = QueueName::parse("research").unwrap();
        let limits = TaskLimits::default();
        let ran = task(&q, 1);
        a.submit(&ran, Duration::ZERO, limits, dl()).await.unwrap();
        let cancelled = task(&q, 2);
        a.submit(&cancelled, Duration::ZERO, limits, dl())
            .await
            .unwrap();
        let later = task(&q, 3);
        a.submit(&later, Duration::from_secs(3600), limits, dl())
            .await
            .unwrap();
        assert_eq!(
            a.cancel(&cancelled.id, "no", limits, dl()).await.unwrap(),
            CancelReply::Cancelled
        );
        let dependent = task(&q, 4);
        a.depend_on(&later.id, &dependent.id, dl()).await.unwrap();
        a.submit_pending(&dependent, std::slice::from_ref(&later.id), limits, dl())
            .await
            .unwrap();
        assert!(
            a.claim_idempotency("k", ran.id.as_str(), Duration::from_secs(60), dl())
                .await
                .unwrap()
                .is_none()
        );
        let pause = Pause {
            by: "ops".into(),
            reason: "r".into(),
            at_ms: 7,
        };
        a.set_pause(&q, Some(&pause), dl()).await.unwrap();
        let leased = lease(&a, &q).await;
        assert!(leased.is_none(), "the queue is paused");
        a.set_pause(&q, None, dl()).await.unwrap();
        lease(&a, &q).await.expect("the first task");
        let written = records(&lines);
        assert_eq!(written.len(), 9, "{written:#?}");
        assert!(
            written.iter().all(|r| !matches!(r, Record::Retry { .. })),
            "nothing was retried"
        );

        let b = MemoryTasks::default();
        assert_eq!(b.replay(written.clone(), limits).unwrap(), 9);
        let state = |t: &Task| {
            let s = b.lock();
            s.tasks[t.id.as_str()].task.state
        };
        assert_eq!(state(&ran), State::Queued, "leases are not journaled");
        assert_eq!(state(&cancelled), State::Cancelled);
        assert_eq!(state(&later), State::Scheduled);
        assert_eq!(state(&dependent), State::Pending);
        assert_eq!(
            b.claim_idempotency("k", "other", Duration::from_secs(60), dl())
                .await
                .unwrap()
                .as_deref(),
            Some(ran.id.as_str())
        );
        assert!(b.lock().queues[&q].paused.is_none());
        assert!(b.lock().dependents[later.id.as_str()].contains(dependent.id.as_str()));
        // again on top: the submits are skipped, nothing else moves
        let events = b.lock().last_event;
        b.replay(written, limits).unwrap();
        assert_eq!(state(&ran), State::Queued);
        assert_eq!(state(&cancelled), State::Cancelled);
        assert_eq!(b.lock().tasks.len(), 4);
        assert_eq!(b.lock().last_event, events, "no event appended again");
    }

    /// A debounced replace is replayed while the task it replaced is still
    /// unstarted, and skipped once the save has it started.
    #[tokio::test]
    async fn debounce_replays_as_it_was_answered() {
        let lines = Arc::new(Lines::default());
        let a = MemoryTasks::default();
        a.set_journal(lines.clone());
        let q = QueueName::parse("research").unwrap();
        let limits = TaskLimits::default();
        let first = Task {
            debounce_key: Some("d".into()),
            ..task(&q, 1)
        };
        let second = Task {
            debounce_key: Some("d".into()),
            args: "[2]".into(),
            ..task(&q, 2)
        };
        let window = Duration::from_millis(1);
        a.submit_debounced(&first, window, limits, dl())
            .await
            .unwrap();
        assert!(matches!(
            a.submit_debounced(&second, window, limits, dl())
                .await
                .unwrap(),
            DebounceReply::Replaced(_)
        ));
        let written = records(&lines);
        assert_eq!(written.len(), 2);

        let b = MemoryTasks::default();
        assert_eq!(b.replay(written.clone(), limits).unwrap(), 2);
        {
            let s = b.lock();
            assert_eq!(s.tasks.len(), 1);
            assert_eq!(s.tasks[first.id.as_str()].task.args, "[2]");
        }
        // the save has the held task started: the replace is not made again
        let c = MemoryTasks::default();
        c.replay(written[..1].to_vec(), limits).unwrap();
        c.lock()
            .tasks
            .get_mut(first.id.as_str())
            .unwrap()
            .task
            .state = State::Running;
        assert_eq!(c.replay(written[1..].to_vec(), limits).unwrap(), 0);
        assert_eq!(c.lock().tasks.len(), 1);
    }

    /// A retry by hand of a task the save has running (it failed, then was
    /// retried, after the save) hands it back to its queue on replay: the
    /// sweep would otherwise end it on its spent budget.
    #[tokio::test]
    async fn a_retry_replayed_on_a_running_task_requeues_it() {
        use crate::domain::Outcome;
        let lines = Arc::new(Lines::default());
        let a = MemoryTasks::default();
        a.set_journal(lines.clone());
        let q = QueueName::parse("research").unwrap();
        let limits = TaskLimits::default();
        let t = task(&q, 1);
        a.submit(&t, Duration::ZERO, limits, dl()).await.unwrap();
        let leased = lease(&a, &q).await.expect("leased");
        let saved = a.export();
        let log = serde_json::json!({ "attempt": 1 }).to_string();
        a.finish(
            &t.id,
            leased.token,
            &Outcome::Failed("\"no\"".into()),
            &log,
            limits,
            dl(),
        )
        .await
        .unwrap();
        assert!(matches!(
            a.retry(&t.id, limits, dl()).await.unwrap(),
            RetryReply::Queued
        ));
        let after_save: Vec<Record> = records(&lines).split_off(1);
        assert!(
            matches!(after_save[..], [Record::Retry { .. }]),
            "{after_save:?}"
        );

        let b = MemoryTasks::import(saved).unwrap();
        assert_eq!(b.lock().tasks[t.id.as_str()].task.state, State::Running);
        assert_eq!(b.replay(after_save, limits).unwrap(), 1);
        let s = b.lock();
        let e = &s.tasks[t.id.as_str()];
        assert_eq!(e.task.state, State::Queued);
        assert!(e.task.log.last().unwrap().contains("handed_back"));
    }

    /// A record that does not parse is an error naming it, not a skip.
    #[test]
    fn unreadable_records_are_errors() {
        let b = MemoryTasks::default();
        let bad = Record::SetLimit {
            field: "nonsense".into(),
            value: "x".into(),
        };
        let err = b.replay([bad], TaskLimits::default()).unwrap_err();
        assert!(err.contains("nonsense"), "{err}");
        let bad = Record::Cancel {
            now: 0,
            id: "not an id".into(),
            reason: String::new(),
        };
        let err = b.replay([bad], TaskLimits::default()).unwrap_err();
        assert!(err.contains("not an id"), "{err}");
    }
}
