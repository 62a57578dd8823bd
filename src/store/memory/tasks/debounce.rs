//! The embedded store's debounced submit and its bookkeeping, step for
//! step as `../../redis/lua/tasks/debounce.lua` (specified on
//! [`TaskBackend::submit_debounced`]): each queue maps a debounce key to
//! the unstarted task holding it ([`super::state::Queue::debounce`]), and a
//! task lets go of its key when it is leased or ends.
//!
//! [`TaskBackend::submit_debounced`]: crate::store::tasks::TaskBackend::submit_debounced

use std::time::Duration;

use super::state::{Tasks, millis, push_event};
use crate::domain::task::{State, Task, TaskId};
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
        let id = task.id.to_string();
        self.submit(task, window.max(Duration::from_millis(1)), limits, now)?;
        self.queues
            .entry(task.id.queue())
            .or_default()
            .debounce
            .insert(key, id);
        Ok(DebounceReply::Created)
    }

    /// Task `id` starts or ends: the debounce key it holds, if any, is free
    /// again (as `forget_debounce` in `lib.lua`).
    pub(super) fn forget_debounce(&mut self, id: &TaskId) {
        let Some(key) = self
            .tasks
            .get(id.as_str())
            .and_then(|e| e.task.debounce_key.clone())
        else {
            return;
        };
        if let Some(q) = self.queues.get_mut(&id.queue())
            && q.debounce.get(&key).is_some_and(|held| held == id.as_str())
        {
            q.debounce.remove(&key);
        }
    }
}
