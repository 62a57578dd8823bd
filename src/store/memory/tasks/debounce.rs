//! The embedded store's debounced submit and its bookkeeping, step for
//! step as `../../redis/lua/tasks/debounce.lua` (specified on
//! [`TaskBackend::submit_debounced`]): each queue maps a debounce key to
//! the unstarted task holding it ([`super::state::Queue::debounce`]), and a
//! task lets go of its key when it is leased or ends.
//!
//! [`TaskBackend::submit_debounced`]: crate::store::tasks::TaskBackend::submit_debounced

use std::time::Duration;

use super::state::{Tasks, millis, push_event};
use crate::domain::task::{QueueName, State, Task};
use crate::store::Result;
use crate::store::tasks::{DebounceReply, TaskLimits};

impl Tasks {
    /// See [`TaskBackend::submit_debounced`](crate::store::tasks::TaskBackend::submit_debounced).
    pub(super) fn submit_debounced(
        &mut self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        now: i64,
    ) -> Result<DebounceReply> {
        let key = task.debounce_key.clone().unwrap_or_default();
        let queue = task.id.queue();
        let due = now.saturating_add(millis(window));
        let q = self.queues.entry(queue).or_default();
        let held = q.debounce.get(&key).cloned();
        if let Some(held) = held
            && let Some(e) = self
                .tasks
                .get_mut(&held)
                .filter(|e| matches!(e.task.state, State::Scheduled | State::Queued))
        {
            if e.task.name != task.name || e.task.category != task.category {
                return Ok(DebounceReply::Conflict {
                    id: held,
                    name: e.task.name.clone(),
                    category: e.task.category.as_str().to_owned(),
                });
            }
            // the last submit wins; the held task keeps its id and submit time
            let (id, created_ms) = (e.task.id.clone(), e.task.created_ms);
            e.task = Task {
                id: id.clone(),
                created_ms,
                state: State::Scheduled,
                log: std::mem::take(&mut e.task.log),
                ..task.clone()
            };
            q.ready.remove(&held);
            q.scheduled.add(&held, due);
            push_event(q, &mut self.last_event, limits, &e.task, None, now);
            return Ok(DebounceReply::Replaced(id));
        }
        // none, or a stale entry: a new task, scheduled at the window's end
        self.debounce_create(task, window, limits, now)?;
        Ok(DebounceReply::Created)
    }

    /// Stores `task` as a new debounced task, scheduled at the window's
    /// end, holding its key (also how a journaled creation is replayed).
    pub(super) fn debounce_create(
        &mut self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        now: i64,
    ) -> Result<()> {
        let key = task.debounce_key.clone().unwrap_or_default();
        self.submit(task, window.max(Duration::from_millis(1)), limits, now)?;
        self.queues
            .entry(task.id.queue())
            .or_default()
            .debounce
            .insert(key, task.id.to_string());
        Ok(())
    }

    /// Task `id` starts or ends: the debounce key it holds, if any, is free
    /// again (as `forget_debounce` in `lib.lua`).
    /// (One map look-up on every start and end: a task without a key
    /// costs nothing more.)
    pub(super) fn forget_debounce(&mut self, queue: &QueueName, id: &str) {
        let Some(key) = self
            .tasks
            .get(id)
            .and_then(|e| e.task.debounce_key.as_ref())
        else {
            return;
        };
        if let Some(q) = self.queues.get_mut(queue)
            && q.debounce.get(key).is_some_and(|held| held == id)
        {
            q.debounce.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::MemoryTasks;
    use crate::domain::task::{Category, Priority, QueueName, State, Task, TaskId};
    use crate::store::Deadline;
    use crate::store::tasks::{DebounceReply, TaskBackend, TaskLimits};

    fn debounced(queue: &QueueName, kwargs: &str) -> Task {
        Task {
            id: TaskId::generate(queue),
            name: "koo.diagnostics.echo".into(),
            category: Category::Research,
            priority: Priority::Normal,
            args: "[]".into(),
            kwargs: kwargs.into(),
            state: State::Scheduled,
            cache_result: None,
            depends_on: Vec::new(),
            schedule: None,
            schedule_tick_ms: None,
            attempts: 0,
            token: 0,
            takeovers: 0,
            max_retries: 0,
            worker: None,
            progress: None,
            result: None,
            error: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            soft_ms: 0,
            hard_ms: 60_000,
            result_ttl_ms: 3_600_000,
            log: Vec::new(),
            trace: None,
            debounce_key: Some("doc-7".into()),
            expire_ms: None,
            rate_limit_key: None,
            concurrency_key: None,
        }
    }

    fn dl() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    /// The key survives a save and load (a queue without keys saves no
    /// field): the loaded store replaces the same task, and lets go of the
    /// key when it is leased.
    #[tokio::test]
    async fn a_debounce_key_survives_a_snapshot() {
        let q = Category::Research.default_queue();
        let limits = TaskLimits::default();
        let window = Duration::from_secs(3600);
        let m = MemoryTasks::default();
        let first = debounced(&q, "{\"n\":1}");
        let reply = m.submit_debounced(&first, window, limits, dl()).await;
        assert_eq!(reply.unwrap(), DebounceReply::Created);
        let json = serde_json::to_string(&m.export()).unwrap();
        assert_eq!(json.matches("\"debounce\"").count(), 1, "{json}");
        let back = MemoryTasks::import(serde_json::from_str(&json).unwrap()).unwrap();
        let second = debounced(&q, "{\"n\":2}");
        let reply = back.submit_debounced(&second, Duration::ZERO, limits, dl());
        assert_eq!(
            reply.await.unwrap(),
            DebounceReply::Replaced(first.id.clone())
        );
        let leased = back
            .lease(&q, "w", window, &["*"], limits, dl())
            .await
            .unwrap()
            .expect("due at once: a window of zero");
        assert_eq!(
            (leased.id, leased.kwargs.as_str()),
            (first.id.clone(), "{\"n\":2}")
        );
        let json = serde_json::to_string(&back.export()).unwrap();
        assert!(!json.contains("\"debounce\""), "let go at lease: {json}");
        let third = debounced(&q, "{\"n\":3}");
        let reply = back.submit_debounced(&third, window, limits, dl());
        assert_eq!(reply.await.unwrap(), DebounceReply::Created);
    }
}
