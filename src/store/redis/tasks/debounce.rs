//! The debounced submit on Redis: one script (`lua/tasks/debounce.lua`)
//! looks the key up in the queue's debounce hash and either replaces the
//! unstarted task holding it or stores the new one, atomically in the
//! queue's slot (see [`TaskBackend::submit_debounced`]).
//!
//! [`TaskBackend::submit_debounced`]: crate::store::tasks::TaskBackend::submit_debounced

use std::time::Duration;

use super::{RedisTasks, millis};
use crate::domain::task::{Task, TaskId};
use crate::store::task_fields;
use crate::store::tasks::{DebounceReply, TaskLimits};
use crate::store::{Deadline, Result, StoreError};

impl RedisTasks {
    pub(super) async fn debounced(
        &self,
        task: &Task,
        window: Duration,
        limits: TaskLimits,
        deadline: Deadline,
    ) -> Result<DebounceReply> {
        let keys = self.keys(&task.id.queue());
        let mut call = self.scripts().debounce.call(self.clock());
        call.queue_keys(&keys, Some(&task.id))
            .arg("id", task.id.as_str())
            .arg("prefix", keys.task_prefix())
            .arg("key", task.debounce_key.as_deref().unwrap_or_default())
            .arg("window_ms", millis(window))
            .arg("name", task.name.as_str())
            .arg("category", task.category.as_str())
            .arg("events_cap", limits.events);
        for (field, value) in task_fields::to_fields(task) {
            call.extra(field).extra(value);
        }
        let script = self.scripts().debounce.script();
        let reply: Vec<String> = self
            .invoke_submit(script, call.done(), limits, deadline)
            .await?;
        parse(reply)
    }
}

/// The script's reply: `created`, `replaced` or `conflict` and its fields.
fn parse(reply: Vec<String>) -> Result<DebounceReply> {
    let bad = |r: &[String]| StoreError::Backend(format!("debounce replied {r:?}"));
    match reply.as_slice() {
        [what, _] if what == "created" => Ok(DebounceReply::Created),
        [what, id] if what == "replaced" => TaskId::parse(id)
            .map(DebounceReply::Replaced)
            .map_err(|_| bad(&reply)),
        [what, id, name, category] if what == "conflict" => Ok(DebounceReply::Conflict {
            id: id.clone(),
            name: name.clone(),
            category: category.clone(),
        }),
        _ => Err(bad(&reply)),
    }
}
