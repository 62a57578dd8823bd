//! The run and wait times on Redis: the ending scripts' replies added up
//! in the process ([`super::tally`]), their flush (`times_add.lua`), and
//! the read: `times.lua` returns the window's sub-window hashes (the field
//! layout is in [`crate::keys`]), decoded here into the domain's
//! [`QueueTimes`].

use crate::domain::task::State;
use crate::domain::task::{QueueName, TaskId};
use crate::domain::times::{NameTimes, QueueTimes, window_at};
use crate::store::tasks::Recovered;
use crate::store::{Deadline, Result, StoreError};

use super::{RedisTasks, tally};

/// The state in finish.lua's reply: the new state, and whether tasks wait
/// on it.
fn parse_end(reply: &str) -> Option<(State, bool)> {
    // (a Cluster's running-set entry follows: `left_entry`)
    let reply = reply.split_once('@').map_or(reply, |(state, _)| state);
    match reply.strip_suffix('+') {
        Some(state) => State::parse(state).map(|s| (s, true)),
        None => State::parse(reply).map(|s| (s, false)),
    }
}

impl RedisTasks {
    /// finish.lua's reply: the new state (and whether tasks wait on it);
    /// the attempt's times that follow it are added to the tally.
    pub(super) fn ended(&self, queue: &QueueName, reply: &[String]) -> Option<(State, bool)> {
        let (state, times) = reply.split_first()?;
        self.tally_times(queue, times);
        parse_end(state)
    }

    /// recover.lua's reply: how many entries it handled; the lost
    /// attempts' times that follow are added to the tally.
    pub(super) fn recovered(&self, queue: &QueueName, reply: &[String]) -> Result<Recovered> {
        let [handled, expired, waited_on, times @ ..] = reply else {
            return Err(StoreError::Backend(format!(
                "recover: a reply of {} entries, not at least 3",
                reply.len()
            )));
        };
        let count = |v: &String| {
            v.parse()
                .map_err(|_| StoreError::Backend(format!("recover: {v:?} is not a count")))
        };
        let release = waited_on
            .split_whitespace()
            .map(|id| TaskId::parse(id).map_err(|e| StoreError::Backend(format!("recover: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        self.tally_times(queue, times);
        Ok(Recovered {
            handled: count(handled)?,
            expired: count(expired)?,
            release,
        })
    }

    /// Adds the times an ending script returned for `queue` to the tally
    /// (a malformed reply loses its figures, never the transition).
    pub(super) fn tally_times(&self, queue: &QueueName, times: &[String]) {
        if times.is_empty() {
            return;
        }
        if let Err(e) = self.tally.add(queue, times) {
            tracing::warn!(%queue, error = %e, "run and wait times not counted");
        }
    }

    /// See [`crate::store::tasks::TaskBackend::flush_times`]: one
    /// `times_add.lua` call per queue. A call that fails loses that queue's
    /// figures of the interval (sent again, a lost reply would count them
    /// twice).
    pub(super) async fn flush_tally(&self, deadline: Deadline) -> Result<()> {
        self.flush(self.tally.take(), deadline).await
    }

    /// Writes `added` (one `times_add.lua` call per queue).
    async fn flush(&self, added: tally::Added, deadline: Deadline) -> Result<()> {
        let mut failed = None;
        for (queue, slots) in added {
            let mut call = self.scripts().times_add.call(self.clock());
            call.queue_keys(&self.keys(&queue), None);
            for a in tally::add_args(&slots) {
                call.extra(a);
            }
            let done: Result<i64> = self.store.invoke_once(call.done(), deadline).await;
            if let Err(e) = done {
                tracing::warn!(%queue, error = %e, "run and wait times of the last interval lost");
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// See [`crate::store::tasks::TaskBackend::task_times`]: this process's
    /// own times of `queue` are flushed first (a failed flush is logged
    /// there; the read still answers with what the store has). Only that
    /// queue's: reads of every queue run at once, and one taking all would
    /// leave the others reading before their times were written.
    pub(super) async fn read_times(
        &self,
        queue: &QueueName,
        deadline: Deadline,
    ) -> Result<QueueTimes> {
        let _ = self.flush(self.tally.take_queue(queue), deadline).await;
        let keys = self.keys(queue);
        let mut call = self.scripts().times.call(self.clock());
        call.queue_keys(&keys, None);
        let reply: Vec<Vec<String>> = self.store.invoke(call.done(), deadline).await?;
        decode(reply).map_err(|e| StoreError::Backend(format!("times of queue {queue}: {e}")))
    }
}

/// `times.lua`'s reply: `[now]`, then each sub-window's field, value list.
fn decode(reply: Vec<Vec<String>>) -> std::result::Result<QueueTimes, String> {
    let mut slots = reply.into_iter();
    let now: i64 = slots
        .next()
        .and_then(|n| n.first()?.parse().ok())
        .ok_or("no time")?;
    let mut entries = Vec::new();
    for fields in slots {
        let mut by_name = std::collections::HashMap::<String, NameTimes>::new();
        for pair in fields.chunks_exact(2) {
            let value: u64 = pair[1]
                .parse()
                .map_err(|_| format!("field {} is not a count", pair[0]))?;
            // `names` and `n:NAME` only bound the names
            let Some((kind @ ("r" | "w"), rest)) = pair[0].split_once(':') else {
                continue;
            };
            let (bucket, name) = rest.split_once(':').ok_or("a bucket without a name")?;
            let b: usize = bucket.parse().map_err(|_| "a bucket is not a number")?;
            let e = by_name
                .entry(name.to_owned())
                .or_insert_with(|| NameTimes::named(name));
            let h = if kind == "r" { &mut e.run } else { &mut e.wait };
            h.add_bucket(b, value);
        }
        entries.extend(by_name.into_values());
    }
    Ok(QueueTimes::folded(window_at(now), entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sub-windows of one name add up; a name's fields may hold `:`.
    #[test]
    fn sub_windows_of_a_name_add_up() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let reply = vec![
            s(&["3600000"]),
            // the fields times_add.lua writes: `names`, `n:NAME`, buckets
            s(&["names", "1", "n:a:b", "1", "r:3:a:b", "1"]),
            s(&[]),
            s(&["names", "1", "n:a:b", "1", "r:0:a:b", "2", "w:5:a:b", "1"]),
        ];
        let t = decode(reply).unwrap();
        assert_eq!(t.by_name.len(), 1);
        let a = &t.by_name[0];
        assert_eq!((a.name.as_str(), a.recorded()), ("a:b", 4));
        assert_eq!(a.run.count(), 3);
        assert_eq!(
            a.run.stats().unwrap().max,
            std::time::Duration::from_millis(3)
        );
        // bucket 5 holds 5 and 6 ms
        assert_eq!(
            a.wait.stats().unwrap().mean,
            std::time::Duration::from_micros(5500)
        );
        assert!(decode(vec![s(&["x"])]).is_err());
    }
}
