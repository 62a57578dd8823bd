//! The embedded store's run and wait times: the Redis store's (its
//! in-process tally, `times_add.lua` and `times.lua`) mirrored (see
//! [`crate::domain::times`]), one sub-window per [`SLOT_MS`], the oldest
//! dropped as the window moves. Recorded directly as each attempt ends:
//! the store is in this process, there is nothing to flush.

use std::collections::{BTreeMap, HashMap};

use super::state::Tasks;
use crate::domain::task::{QueueName, Task};
use crate::domain::times::{NAME_CAP, NameTimes, OTHER, QueueTimes, SLOTS, slot_of, window_at};

/// One queue's sub-windows, by number.
#[derive(Default)]
pub(super) struct Times {
    slots: BTreeMap<i64, Slot>,
}

#[derive(Default)]
struct Slot {
    by_name: HashMap<String, NameTimes>,
    /// New names offered (as the `names` field on Redis): beyond
    /// [`NAME_CAP`], a new name counts as [`OTHER`].
    offered: usize,
}

impl Times {
    /// Records the times of `task`'s attempt that ends at `now`: its run
    /// when `ran`, and its wait when it is the first attempt.
    pub(super) fn record(&mut self, task: &Task, ran: bool, now: i64) {
        let first = task.attempts == 1;
        let Some(started) = task.started_ms.filter(|_| ran || first) else {
            return;
        };
        let n = slot_of(now);
        // the window has moved past these
        self.slots = self.slots.split_off(&(n - SLOTS + 1));
        let slot = self.slots.entry(n).or_default();
        let mut name = task.name.as_str();
        if name != OTHER && !slot.by_name.contains_key(name) {
            slot.offered += 1;
            if slot.offered > NAME_CAP {
                name = OTHER;
            }
        }
        let e = slot
            .by_name
            .entry(name.to_owned())
            .or_insert_with(|| NameTimes::named(name));
        let ms = |from: i64, to: i64| u64::try_from(to - from).unwrap_or(0);
        if ran {
            e.run.record(ms(started, now));
        }
        if first {
            e.wait.record(ms(task.created_ms, started));
        }
    }

    /// The window's times at `now`.
    fn read(&self, now: i64) -> QueueTimes {
        let n = slot_of(now);
        let entries = self
            .slots
            .range(n - SLOTS + 1..=n)
            .flat_map(|(_, s)| s.by_name.values().cloned());
        QueueTimes::folded(window_at(now), entries)
    }
}

impl Tasks {
    /// See [`crate::store::tasks::TaskBackend::task_times`].
    pub(super) fn queue_times(&self, queue: &QueueName, now: i64) -> QueueTimes {
        match self.queues.get(queue) {
            Some(q) => q.times.read(now),
            None => QueueTimes::folded(window_at(now), []),
        }
    }
}
