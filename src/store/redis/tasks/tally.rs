//! The run and wait times this koo process saw end on Redis since its last
//! flush. The scripts that end an attempt (`finish.lua`, `recover.lua`)
//! write no times: they return them (`times_of` in `lib.lua`), the process
//! adds them up here, and [`super::RedisTasks::flush_times`] applies them
//! with one `times_add.lua` call per queue about once a second. Two
//! `HINCRBY`s per task on Redis, the bottleneck with short tasks, become a
//! few per task name and second. A process killed with -9 loses at most
//! one interval of figures (never a task).

use std::collections::HashMap;
use std::sync::Mutex;

use indexmap::IndexMap;

use crate::domain::task::QueueName;
use crate::domain::times::{NameTimes, OTHER};

/// Names one process keeps per queue and sub-window between flushes;
/// beyond it (a flood of distinct names) the rest count as [`OTHER`] at
/// once. Far above the store's cap ([`crate::domain::times::NAME_CAP`],
/// applied by the flush as before), so that it changes nothing short of a
/// flood, and keeps the memory bounded then.
const LOCAL_NAMES: usize = 256;

/// A sub-window's names in the order this process first saw them end:
/// the flush offers them to the store's cap in that order, so that the
/// names kept are the first ones, as when each end wrote its own.
pub(super) type Names = IndexMap<String, NameTimes>;

/// Per queue, per sub-window, per task name.
pub(super) type Added = HashMap<QueueName, HashMap<i64, Names>>;

/// The times added since the last flush. A std mutex: it is held only to
/// add a few counts or to swap the map out, never across an await.
#[derive(Default)]
pub(super) struct Tally {
    added: Mutex<Added>,
}

impl Tally {
    /// Adds the times an ending script returned for `queue`: groups of
    /// name, sub-window, run ms, wait ms (-1: none). No allocation but for
    /// a queue, sub-window or name new since the last flush.
    pub(super) fn add(&self, queue: &QueueName, reply: &[String]) -> Result<(), String> {
        if !reply.len().is_multiple_of(4) {
            return Err(format!("{} values are not groups of 4", reply.len()));
        }
        let ms = |v: &str| -> Result<Option<u64>, String> {
            let n: i64 = v.parse().map_err(|_| format!("{v:?} is not a time"))?;
            Ok(u64::try_from(n).ok())
        };
        let mut added = self.added.lock().unwrap_or_else(|e| e.into_inner());
        let by_slot = match added.get_mut(queue) {
            Some(q) => q,
            None => added.entry(queue.clone()).or_default(),
        };
        for g in reply.chunks_exact(4) {
            let slot: i64 = g[1].parse().map_err(|_| "a sub-window is not a number")?;
            let (run, wait) = (ms(&g[2])?, ms(&g[3])?);
            let names = by_slot.entry(slot).or_default();
            let name = match names.contains_key(g[0].as_str()) || names.len() < LOCAL_NAMES {
                true => g[0].as_str(),
                false => OTHER,
            };
            let e = match names.get_mut(name) {
                Some(e) => e,
                None => names
                    .entry(name.to_owned())
                    .or_insert_with(|| NameTimes::named(name)),
            };
            if let Some(ms) = run {
                e.run.record(ms);
            }
            if let Some(ms) = wait {
                e.wait.record(ms);
            }
        }
        Ok(())
    }

    /// Everything added so far, which is then forgotten here.
    pub(super) fn take(&self) -> Added {
        std::mem::take(&mut *self.added.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes one queue's times only (a read of that queue flushes them
    /// first; reads of other queues running at once flush their own).
    pub(super) fn take_queue(&self, queue: &QueueName) -> Added {
        let mut added = self.added.lock().unwrap_or_else(|e| e.into_inner());
        added.remove_entry(queue).into_iter().collect()
    }
}

/// `times_add.lua`'s variadic tail for one queue's sub-windows: per name,
/// the sub-window, the name, the count of bucket fields, then each field
/// prefix (`r:B:` / `w:B:`) and its count.
pub(super) fn add_args(slots: &HashMap<i64, Names>) -> Vec<String> {
    let mut out = Vec::new();
    // oldest sub-window first (only at a sub-window's turn are there two)
    let mut slots: Vec<_> = slots.iter().collect();
    slots.sort_unstable_by_key(|(n, _)| **n);
    for (slot, names) in slots {
        for (name, t) in names {
            let fields: Vec<_> = (t.run.buckets().map(|(b, n)| (format!("r:{b}:"), n)))
                .chain(t.wait.buckets().map(|(b, n)| (format!("w:{b}:"), n)))
                .collect();
            if fields.is_empty() {
                continue;
            }
            out.extend([slot.to_string(), name.clone(), fields.len().to_string()]);
            for (f, n) in fields {
                out.extend([f, n.to_string()]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Replies add up per sub-window and name; -1 is no time; a take
    /// empties the tally; the flush's arguments name every bucket.
    #[test]
    fn replies_add_up_until_taken() {
        let t = Tally::default();
        let q = QueueName::parse("q").unwrap();
        t.add(&q, &s(&["a", "7", "3", "-1", "a", "7", "3", "5"]))
            .unwrap();
        t.add(&q, &s(&["b", "8", "-1", "0"])).unwrap();
        assert!(t.add(&q, &s(&["a", "7", "3"])).is_err());
        assert!(t.add(&q, &s(&["a", "x", "3", "1"])).is_err());
        let added = t.take();
        assert!(t.take().is_empty());
        let slots = &added[&q];
        let a = &slots[&7]["a"];
        assert_eq!((a.run.count(), a.wait.count()), (2, 1));
        assert_eq!(slots[&8]["b"].recorded(), 1);
        let mut args = add_args(&HashMap::from([(7, slots[&7].clone())]));
        args.sort();
        let mut want = s(&["7", "a", "2", "r:3:", "2", "w:5:", "1"]);
        want.sort();
        assert_eq!(args, want);
    }

    /// A flood of names keeps [`LOCAL_NAMES`] and counts the rest as other.
    #[test]
    fn a_flood_of_names_is_bounded() {
        let t = Tally::default();
        let q = QueueName::parse("q").unwrap();
        for i in 0..LOCAL_NAMES + 10 {
            t.add(&q, &s(&[&format!("n{i}"), "1", "1", "-1"])).unwrap();
        }
        let added = t.take();
        let names = &added[&q][&1];
        assert_eq!(names.len(), LOCAL_NAMES + 1);
        assert_eq!(names[OTHER].run.count(), 10);
    }
}
