//! Run and wait times of task attempts, cluster-wide: log-bucketed
//! histograms that the task store keeps per queue and task name in
//! rotating sub-windows, and the percentiles `GetTaskMetrics` reads from
//! them.
//!
//! # What is measured
//! - **run**: from an attempt's start (its lease) to its end (a finish of
//!   any outcome, a retry included). An attempt lost with its worker has no
//!   observed end and is not counted.
//! - **wait**: from the task's submit to its *first* start, recorded when
//!   the first attempt ends (finished or lost). It includes a countdown,
//!   an ETA and a wait on dependencies (the store keeps no due time, and
//!   the per-instance `/metrics` wait histogram measures the same span);
//!   a retry's wait is its backoff policy, not the queue's, and is not
//!   counted.
//!
//! # Buckets
//! The store's clocks are in milliseconds, so the histograms are too.
//! Bucket 0 is `[0, 1)` ms; bucket `i` is `[B(i-1), B(i))` with `B(0) = 1`
//! and `B(i+1) = max(B(i) + 1, ceil(1.25 B(i)))`; the last bucket,
//! [`LAST`], takes everything from `B(LAST - 1)` (about 27 h) up (in
//! integers: [`bucket_of`] is the only place a duration gets its bucket;
//! the Redis scripts return milliseconds). Only the bucket counts are kept
//! (on Redis, added up in each koo process and written about once a
//! second: `store/redis/tasks/tally.rs`): a percentile and the max are the middle of their bucket, the mean that
//! of the buckets' middles, so each is at most 12.5% (and 0.5 ms) from the
//! exact figure (the open last bucket reports its lower bound); the count
//! is exact.
//!
//! # Window and names
//! Times are kept in sub-windows of [`SLOT_MS`]; the figures sum the
//! current one and the [`SLOTS`]` - 1` before it (the last 55 to 60
//! minutes) and say since when. Each sub-window keeps at most [`NAME_CAP`]
//! task names per queue (the first seen; later ones count as [`OTHER`]),
//! and the read keeps the [`NAME_CAP`] busiest (most times recorded) over
//! the window, folding
//! the rest into [`OTHER`]: memory stays bounded whatever the names.

use std::time::Duration;

/// One sub-window: 5 minutes.
pub const SLOT_MS: i64 = 5 * 60 * 1000;
/// Sub-windows summed: one hour's worth.
pub const SLOTS: i64 = 12;
/// Task names kept per queue; the rest count as [`OTHER`].
pub const NAME_CAP: usize = 20;
/// The name the names beyond [`NAME_CAP`] count under.
pub const OTHER: &str = "other";
/// The last bucket's index (it is open-ended).
pub const LAST: usize = 79;
/// Number of buckets.
pub const BUCKETS: usize = LAST + 1;

/// The bound after `b` (see the module docs).
const fn next_bound(b: u64) -> u64 {
    let grown = (b * 5).div_ceil(4);
    if grown > b + 1 { grown } else { b + 1 }
}

/// `BOUNDS[i]` is the (exclusive) upper bound of bucket `i`, in ms.
const BOUNDS: [u64; LAST] = {
    let mut b = [0u64; LAST];
    let mut i = 0;
    let mut t = 1;
    while i < LAST {
        b[i] = t;
        t = next_bound(t);
        i += 1;
    }
    b
};

/// The bucket of a duration of `ms` milliseconds.
pub fn bucket_of(ms: u64) -> usize {
    BOUNDS.partition_point(|&upper| upper <= ms)
}

/// Bucket `i`'s range in ms: `[low, high)`; `None` for `high` of the last.
pub fn bucket_range(i: usize) -> (u64, Option<u64>) {
    let low = if i == 0 { 0 } else { BOUNDS[i.min(LAST) - 1] };
    (low, BOUNDS.get(i).copied())
}

/// One kind of time (run or wait) of one task name or queue: counts per
/// bucket (the sums and maxima are not kept: they would cost the task path
/// more writes, and the buckets give them within the same error).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TimeHistogram {
    /// Per bucket; empty until something is recorded.
    counts: Vec<u64>,
}

impl TimeHistogram {
    /// Counts one time of `ms`.
    pub fn record(&mut self, ms: u64) {
        self.add_bucket(bucket_of(ms), 1);
    }

    /// Adds `n` to bucket `i` (as stored; an index beyond the last counts
    /// in the last).
    pub fn add_bucket(&mut self, i: usize, n: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        let slot = &mut self.counts[i.min(LAST)];
        *slot = slot.saturating_add(n);
    }

    /// Adds `other`'s times (buckets line up: the layout is fixed).
    pub fn merge(&mut self, other: &TimeHistogram) {
        for (i, n) in other.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.add_bucket(i, *n);
        }
    }

    /// The buckets counted in, as (index, count).
    pub fn buckets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.counts
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, n)| *n > 0)
    }

    /// How many times were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The figures, or `None` when nothing was counted.
    pub fn stats(&self) -> Option<DurationStats> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let at = |q: f64| middle(self.bucket_at(count, q));
        let last = self.counts.iter().rposition(|n| *n > 0).unwrap_or(0);
        let sum_us: u128 = (self.counts.iter().enumerate())
            .map(|(i, n)| u128::from(*n) * middle(i).as_micros())
            .sum();
        Some(DurationStats {
            count,
            p50: at(0.50),
            p90: at(0.90),
            p95: at(0.95),
            p99: at(0.99),
            max: middle(last),
            mean: Duration::from_micros(
                u64::try_from(sum_us / u128::from(count)).unwrap_or(u64::MAX),
            ),
        })
    }

    /// The bucket holding the `ceil(q * count)`th smallest of `count` times.
    fn bucket_at(&self, count: u64, q: f64) -> usize {
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        self.counts
            .iter()
            .position(|n| {
                seen += n;
                seen >= rank
            })
            .unwrap_or(LAST)
    }
}

/// The figure reported for a time in bucket `i`: the middle of the whole
/// ms it holds (`low..=high - 1`); the open last bucket's lower bound.
fn middle(i: usize) -> Duration {
    let us = match bucket_range(i) {
        (low, Some(high)) => (low + high - 1) * 500,
        (low, None) => low * 1000,
    };
    Duration::from_micros(us)
}

/// A time's figures over the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationStats {
    /// Times counted.
    pub count: u64,
    /// Percentiles (within a bucket's error, see the module docs).
    pub p50: Duration,
    pub p90: Duration,
    pub p95: Duration,
    pub p99: Duration,
    /// The longest (its bucket's middle).
    pub max: Duration,
    /// The mean of the times' buckets' middles.
    pub mean: Duration,
}

/// One task name's times (or [`OTHER`]'s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTimes {
    /// The task name.
    pub name: String,
    /// Run times.
    pub run: TimeHistogram,
    /// Wait times (of first attempts).
    pub wait: TimeHistogram,
}

impl NameTimes {
    /// An empty entry for `name`.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Times recorded, runs and waits: the busiest names are kept.
    pub fn recorded(&self) -> u64 {
        self.run.count() + self.wait.count()
    }

    /// Adds `other`'s times.
    pub fn merge(&mut self, other: &NameTimes) {
        self.run.merge(&other.run);
        self.wait.merge(&other.wait);
    }
}

/// One queue's times over the window, per name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueTimes {
    /// How far back the window reaches from the read (the start of its
    /// oldest sub-window).
    pub window: Duration,
    /// The busiest [`NAME_CAP`] names, busiest first (ties by name), then
    /// [`OTHER`] when anything folded into it.
    pub by_name: Vec<NameTimes>,
}

impl QueueTimes {
    /// The times of `entries` (one per name and sub-window, in any order),
    /// merged per name and folded to [`NAME_CAP`] names.
    pub fn folded(window: Duration, entries: impl IntoIterator<Item = NameTimes>) -> Self {
        let mut merged: std::collections::BTreeMap<String, NameTimes> = Default::default();
        for e in entries {
            merged
                .entry(e.name.clone())
                .or_insert_with(|| NameTimes::named(&e.name))
                .merge(&e);
        }
        let mut other = merged
            .remove(OTHER)
            .unwrap_or_else(|| NameTimes::named(OTHER));
        let mut names: Vec<NameTimes> = merged.into_values().collect();
        // stable: equal counts stay in name order
        names.sort_by_key(|n| std::cmp::Reverse(n.recorded()));
        for rest in names.split_off(names.len().min(NAME_CAP)) {
            other.merge(&rest);
        }
        if other.recorded() > 0 {
            names.push(other);
        }
        Self {
            window,
            by_name: names,
        }
    }

    /// The queue's run and wait times, every name summed.
    pub fn totals(&self) -> (TimeHistogram, TimeHistogram) {
        let (mut run, mut wait) = (TimeHistogram::default(), TimeHistogram::default());
        for n in &self.by_name {
            run.merge(&n.run);
            wait.merge(&n.wait);
        }
        (run, wait)
    }
}

/// The sub-window `now_ms` falls in.
pub fn slot_of(now_ms: i64) -> i64 {
    now_ms.div_euclid(SLOT_MS)
}

/// The window's extent at `now_ms`: from the start of its oldest
/// sub-window.
pub fn window_at(now_ms: i64) -> Duration {
    let start = (slot_of(now_ms) - SLOTS + 1) * SLOT_MS;
    Duration::from_millis(u64::try_from(now_ms - start).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounds start at 1 ms, grow by at most 25% (or 1 ms), and the
    /// last closed bucket reaches past a day.
    #[test]
    fn buckets_are_a_quarter_wide_up_to_a_day() {
        assert_eq!(&BOUNDS[..8], &[1, 2, 3, 4, 5, 7, 9, 12]);
        for w in BOUNDS.windows(2) {
            assert!(w[1] > w[0]);
            assert!(w[1] <= (w[0] * 5).div_ceil(4).max(w[0] + 1));
        }
        assert!(BOUNDS[LAST - 1] > 86_400_000, "{}", BOUNDS[LAST - 1]);
        assert!(BOUNDS[LAST - 2] < 86_400_000);
    }

    /// Every duration lands in the bucket whose range holds it.
    #[test]
    fn a_time_lands_in_its_range() {
        for ms in (0..5000).chain([86_399_999, 97_338_789, 97_338_790, u64::MAX]) {
            let b = bucket_of(ms);
            let (low, high) = bucket_range(b);
            assert!(low <= ms, "{ms} in {b}");
            assert!(high.is_none_or(|h| ms < h), "{ms} in {b}");
        }
        assert_eq!((bucket_of(0), bucket_of(1), bucket_of(6)), (0, 1, 5));
        assert_eq!(bucket_of(u64::MAX), LAST);
    }

    /// Percentiles, max and mean of a known spread are within the bucket
    /// error; the count is exact.
    #[test]
    fn percentiles_are_within_a_bucket() {
        let mut h = TimeHistogram::default();
        for ms in 1..=1000 {
            h.record(ms);
        }
        let s = h.stats().unwrap();
        assert_eq!(s.count, 1000);
        for (got, exact) in [
            (s.max, 1000.0),
            (s.mean, 500.5),
            (s.p50, 500.0),
            (s.p90, 900.0),
            (s.p95, 950.0),
            (s.p99, 990.0),
        ] {
            let got = got.as_secs_f64() * 1000.0;
            assert!((got - exact).abs() <= exact * 0.125, "{got} vs {exact}");
        }
        // small times are exact
        let mut h = TimeHistogram::default();
        h.record(3);
        assert_eq!(h.stats().unwrap().p99, Duration::from_millis(3));
        assert_eq!(TimeHistogram::default().stats(), None);
    }

    /// Merging two histograms equals recording into one.
    #[test]
    fn merging_adds_up() {
        let (mut a, mut b, mut both) = Default::default();
        for ms in [5, 50, 500] {
            TimeHistogram::record(&mut a, ms);
            TimeHistogram::record(&mut both, ms);
        }
        for ms in [7, 7000] {
            TimeHistogram::record(&mut b, ms);
            TimeHistogram::record(&mut both, ms);
        }
        TimeHistogram::merge(&mut a, &b);
        assert_eq!(a, both);
    }

    /// Beyond the cap, the least busy names fold into `other`, with any
    /// `other` already recorded; the busiest come first.
    #[test]
    fn names_beyond_the_cap_fold_into_other() {
        let entry = |name: &str, n: u64| {
            let mut e = NameTimes::named(name);
            for _ in 0..n {
                e.run.record(10);
            }
            e
        };
        let mut entries: Vec<NameTimes> = (0..NAME_CAP + 3)
            .map(|i| entry(&format!("t{i:02}"), 2))
            .collect();
        entries.push(entry("busy", 5));
        entries.push(entry("busy", 1));
        entries.push(entry(OTHER, 4));
        let t = QueueTimes::folded(Duration::from_secs(60), entries);
        assert_eq!(t.by_name.len(), NAME_CAP + 1);
        assert_eq!(
            (t.by_name[0].name.as_str(), t.by_name[0].recorded()),
            ("busy", 6)
        );
        let other = t.by_name.last().unwrap();
        // 4 of its own, and the 4 names of 2 beyond the cap (cap - 1 kept)
        assert_eq!((other.name.as_str(), other.recorded()), (OTHER, 4 + 4 * 2));
        assert_eq!(t.totals().0.count(), 6 + (NAME_CAP as u64 + 3) * 2 + 4);
    }

    /// The window reaches back to the start of the oldest sub-window.
    #[test]
    fn the_window_covers_the_last_hour_at_most() {
        assert_eq!(
            window_at(SLOTS * SLOT_MS),
            Duration::from_millis((SLOTS - 1) as u64 * SLOT_MS as u64)
        );
        assert_eq!(
            window_at(SLOTS * SLOT_MS + SLOT_MS - 1),
            Duration::from_millis((SLOTS * SLOT_MS - 1) as u64)
        );
    }
}
