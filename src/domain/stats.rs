//! A queue's figures: depths, the oldest wait, and counts per outcome, as
//! typed fields rather than a map keyed by strings.

use std::time::Duration;

use super::task::State;

/// What a queue counts. The stored names (`as_str`) are the fields of the
/// queue's `stats` hash on Redis and of the embedded store's snapshot: part
/// of the data format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Count {
    /// Tasks stored by a submit.
    Submitted,
    /// Attempts that ended SUCCEEDED.
    Succeeded,
    /// Tasks that ended FAILED.
    Failed,
    /// Tasks that ended TIMED_OUT.
    TimedOut,
    /// Tasks that ended CANCELLED.
    Cancelled,
    /// Failed attempts scheduled to run again.
    Retried,
    /// Leases that lapsed (the worker vanished).
    Lost,
    /// Ended tasks queued again by RetryTask.
    Requeued,
}

impl Count {
    /// Every count, in a fixed order.
    pub const ALL: [Count; 8] = [
        Count::Submitted,
        Count::Succeeded,
        Count::Failed,
        Count::TimedOut,
        Count::Cancelled,
        Count::Retried,
        Count::Lost,
        Count::Requeued,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Count::Submitted => "submitted",
            Count::Succeeded => "succeeded",
            Count::Failed => "failed",
            Count::TimedOut => "timed_out",
            Count::Cancelled => "cancelled",
            Count::Retried => "retried",
            Count::Lost => "lost",
            Count::Requeued => "requeued",
        }
    }

    /// The count of a stored name; `None` for a name this version does not
    /// know (a newer koo's), which is ignored rather than refused.
    pub fn parse(name: &str) -> Option<Count> {
        Count::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The count a task ending in `state` adds to (`None` for a state that
    /// is not an end).
    pub fn ended(state: State) -> Option<Count> {
        match state {
            State::Succeeded => Some(Count::Succeeded),
            State::Failed => Some(Count::Failed),
            State::TimedOut => Some(Count::TimedOut),
            State::Cancelled => Some(Count::Cancelled),
            _ => None,
        }
    }
}

/// Counts per outcome, since the queue was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts([u64; Count::ALL.len()]);

impl Counts {
    /// The value of one count.
    pub fn get(&self, count: Count) -> u64 {
        self.0[count as usize]
    }

    /// Adds one.
    pub fn bump(&mut self, count: Count) {
        self.0[count as usize] += 1;
    }

    /// Adds `by`.
    pub fn add(&mut self, count: Count, by: u64) {
        self.0[count as usize] = self.0[count as usize].saturating_add(by);
    }

    /// From stored `(name, value)` pairs; unknown names are ignored.
    pub fn from_stored<K: AsRef<str>>(pairs: impl IntoIterator<Item = (K, u64)>) -> Self {
        let mut counts = Counts::default();
        for (name, value) in pairs {
            if let Some(c) = Count::parse(name.as_ref()) {
                counts.add(c, value);
            }
        }
        counts
    }

    /// The stored `(name, value)` pairs of the counts that are not zero.
    pub fn to_stored(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Count::ALL
            .into_iter()
            .filter(|c| self.get(*c) > 0)
            .map(|c| (c.as_str(), self.get(c)))
    }

    /// These counts plus `other`'s (the figures of several queues).
    pub fn plus(mut self, other: &Counts) -> Counts {
        for c in Count::ALL {
            self.add(c, other.get(c));
        }
        self
    }
}

/// A queue's depths and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Tasks ready to run.
    pub ready: u64,
    /// Tasks waiting for their start time.
    pub scheduled: u64,
    /// Tasks running.
    pub running: u64,
    /// Dead-lettered tasks.
    pub dead: u64,
    /// Tasks waiting on dependencies.
    pub pending: u64,
    /// How long the oldest ready task has waited.
    pub oldest_wait: Option<Duration>,
    /// Counts per outcome.
    pub counts: Counts,
    /// Set while the queue is paused: it accepts submits and hands out
    /// nothing until resumed.
    pub paused: Option<Pause>,
}

/// Who paused a queue, when and why. Stored with the queue (Redis: a hash
/// in the queue's slot; the embedded store: with the queue, in snapshots),
/// so a pause outlives every koo process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pause {
    /// The principal that paused it.
    pub by: String,
    /// The reason given (may be empty).
    pub reason: String,
    /// When (ms since the epoch, the store's clock).
    pub at_ms: i64,
}

impl Pause {
    /// The stored `(field, value)` pairs.
    pub fn to_stored(&self) -> [(&'static str, String); 3] {
        [
            ("by", self.by.clone()),
            ("reason", self.reason.clone()),
            ("at", self.at_ms.to_string()),
        ]
    }

    /// From stored pairs; `None` when there are none (not paused).
    pub fn from_stored<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Option<Pause> {
        let mut pause = None::<Pause>;
        for (k, v) in pairs {
            let p = pause.get_or_insert_with(Pause::default);
            match k.as_ref() {
                "by" => p.by = v.as_ref().to_owned(),
                "reason" => p.reason = v.as_ref().to_owned(),
                "at" => p.at_ms = v.as_ref().parse().unwrap_or(0),
                _ => {}
            }
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pause round-trips through its stored pairs; none stored is none.
    #[test]
    fn pause_round_trips() {
        let p = Pause {
            by: "ops".into(),
            reason: "provider outage".into(),
            at_ms: 1_700_000_000_000,
        };
        assert_eq!(Pause::from_stored(p.to_stored()), Some(p));
        assert_eq!(Pause::from_stored(Vec::<(String, String)>::new()), None);
    }

    /// Stored names round-trip, unknown ones are ignored, ends map to counts.
    #[test]
    fn counts_round_trip_through_their_stored_names() {
        let mut c = Counts::default();
        c.bump(Count::Succeeded);
        c.add(Count::Lost, 3);
        let stored: Vec<_> = c.to_stored().collect();
        assert_eq!(stored, vec![("succeeded", 1), ("lost", 3)]);
        let back = Counts::from_stored(stored.into_iter().chain([("from_the_future", 9)]));
        assert_eq!(back, c);
        assert_eq!(Count::ended(State::TimedOut), Some(Count::TimedOut));
        assert_eq!(Count::ended(State::Running), None);
        assert_eq!(c.plus(&c).get(Count::Lost), 6);
        for count in Count::ALL {
            assert_eq!(Count::parse(count.as_str()), Some(count));
        }
    }
}
