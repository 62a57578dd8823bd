//! Latency histogram with log-scale buckets.
//!
//! Recording is a single relaxed atomic increment so it can sit on every request path, and the
//! bucket layout is fixed (not adaptive) so snapshots taken in different processes line up
//! bucket for bucket and can be merged by plain addition.
//!
//! Bucket 0 holds durations below 1 µs. Bucket `i` (1..`BUCKETS`) holds
//! `[2^((i-1)/8) µs, 2^(i/8) µs)`, eight buckets per doubling, so each is about 9% wide; the
//! last bucket also takes everything from 2^32 µs (about 71.6 minutes) up.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per doubling of the duration.
const STEPS: u32 = 8;
/// Doublings covered above 1 µs; 2^32 µs is a little over an hour.
const OCTAVES: u32 = 32;
/// Number of buckets: one for sub-microsecond durations plus `STEPS` per octave.
pub const BUCKETS: usize = 1 + (STEPS * OCTAVES) as usize;

const LAST: usize = BUCKETS - 1;
const NANOS_PER_MICRO: u128 = 1000;

/// `ceil(1000 * 2^(64 + j/8))` for j = 1..=7. A duration of `n` ns in octave `k` (so
/// `2^k <= n/1000 < 2^(k+1)`) is at least `2^(k + j/8)` µs exactly when `n << (64 - k)`
/// reaches `STEP_THRESHOLDS[j - 1]`: the shifted value is an integer and the real threshold is
/// irrational, so comparing against its ceiling is exact. Doing this in integers keeps bucket
/// boundaries identical on every platform, which merging across processes relies on.
const STEP_THRESHOLDS: [u128; 7] = [
    20_116_317_054_877_281_741_968,
    21_936_999_301_089_678_046_553,
    23_922_467_369_310_646_740_225,
    26_087_635_650_665_564_424_700,
    28_448_768_404_004_648_378_486,
    31_023_601_929_370_129_896_451,
    33_831_477_799_106_933_341_627,
];

/// A concurrent latency histogram; see the module docs for the bucket layout.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Counts one duration. Lock-free and allocation-free.
    pub fn record(&self, d: Duration) {
        // Relaxed is enough: each bucket is an independent counter and readers only need
        // eventually consistent totals, not ordering with other memory.
        if let Some(count) = self.counts.get(bucket_of(d)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copies the current counts. Buckets are read one by one, so a snapshot taken while
    /// other threads record may include some of their concurrent updates and not others.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts = self
            .counts
            .iter()
            .enumerate()
            .filter_map(|(index, count)| {
                let n = count.load(Ordering::Relaxed);
                let index = u16::try_from(index).ok()?;
                (n > 0).then_some((index, n))
            })
            .collect();
        HistogramSnapshot { b: counts }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Printing all the buckets would drown any struct that embeds a histogram.
        f.debug_struct("Histogram")
            .field("count", &self.snapshot().count())
            .finish()
    }
}

/// A point-in-time copy of a [`Histogram`], cheap to ship between processes and merge.
///
/// Serialized as `{"b":[[bucket,count],...]}` with only non-empty buckets, sorted by bucket.
/// Deserialization normalizes whatever a peer sent (unsorted, duplicated, zero or out-of-range
/// entries) so the invariants hold for every value of this type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WireSnapshot")]
pub struct HistogramSnapshot {
    /// Non-empty buckets as `(index, count)`, strictly increasing by index, all < `BUCKETS`.
    b: Vec<(u16, u64)>,
}

/// The serialized shape, accepted as-is before normalization.
#[derive(Deserialize)]
struct WireSnapshot {
    b: Vec<(u16, u64)>,
}

impl From<WireSnapshot> for HistogramSnapshot {
    fn from(wire: WireSnapshot) -> Self {
        let mut dense = [0u64; BUCKETS];
        add_clamped(&mut dense, &wire.b);
        Self::from_dense(&dense)
    }
}

impl HistogramSnapshot {
    /// The Prometheus form: for each of `bounds` (ascending), how many
    /// durations fell at or below it, and an estimate of their sum in
    /// seconds. Each fine bucket counts under the first bound its upper
    /// edge fits (so a duration may be counted one bound late, by at most
    /// a ninth of its value), and the sum takes each bucket's upper edge:
    /// the fine buckets hold no exact sum, and exporting all 257 of them
    /// would be heavy for Prometheus.
    pub fn cumulative(&self, bounds: &[Duration]) -> (Vec<u64>, f64) {
        let mut counts = vec![0u64; bounds.len()];
        let mut sum = 0.0;
        for &(index, n) in &self.b {
            let edge = upper_bound(usize::from(index));
            sum += edge.as_secs_f64() * n as f64;
            if let Some(first) = bounds.iter().position(|b| edge <= *b) {
                counts[first] = counts[first].saturating_add(n);
            }
        }
        let mut running = 0u64;
        for c in &mut counts {
            running = running.saturating_add(*c);
            *c = running;
        }
        (counts, sum)
    }

    /// Total number of recorded durations (saturating).
    pub fn count(&self) -> u64 {
        self.b
            .iter()
            .fold(0u64, |sum, &(_, n)| sum.saturating_add(n))
    }

    /// Adds `other`'s counts bucket-wise. Indices beyond the last bucket (from a peer with a
    /// different layout, or a corrupt message) are counted in the last bucket rather than
    /// dropped, so totals stay right.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        let mut dense = [0u64; BUCKETS];
        add_clamped(&mut dense, &self.b);
        add_clamped(&mut dense, &other.b);
        *self = Self::from_dense(&dense);
    }

    /// The `q`-quantile (0.0..=1.0) as the upper bound of the bucket holding it, so it
    /// overestimates by less than 9%. `Duration::ZERO` when empty. `q` outside [0, 1] is
    /// clamped and NaN is treated as 0. The last bucket reports its nominal bound of 2^32 µs
    /// even though it also holds longer durations.
    pub fn percentile(&self, q: f64) -> Duration {
        let total = self.count();
        if total == 0 {
            return Duration::ZERO;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // Nearest-rank: the smallest bucket whose cumulative count covers ceil(q * total).
        // The float-to-int cast saturates, and rank 0 would mean "before the first sample".
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        for &(index, n) in &self.b {
            seen = seen.saturating_add(n);
            if seen >= rank {
                return upper_bound(usize::from(index));
            }
        }
        self.b.last().map_or(Duration::ZERO, |&(index, _)| {
            upper_bound(usize::from(index))
        })
    }

    fn from_dense(dense: &[u64; BUCKETS]) -> Self {
        let b = dense
            .iter()
            .enumerate()
            .filter_map(|(index, &n)| {
                let index = u16::try_from(index).ok()?;
                (n > 0).then_some((index, n))
            })
            .collect();
        Self { b }
    }
}

fn add_clamped(dense: &mut [u64; BUCKETS], entries: &[(u16, u64)]) {
    for &(index, n) in entries {
        let slot = &mut dense[usize::from(index).min(LAST)];
        *slot = slot.saturating_add(n);
    }
}

fn bucket_of(d: Duration) -> usize {
    let nanos = d.as_nanos();
    let micros = nanos / NANOS_PER_MICRO;
    if micros == 0 {
        return 0;
    }
    // floor(log2(floor(x))) == floor(log2(x)) for x >= 1, so the octave can come from the
    // truncated microsecond count; only the step within the octave needs full precision.
    let octave = micros.ilog2();
    if octave >= OCTAVES {
        return LAST;
    }
    // octave < 32 and nanos < 1000 * 2^33 < 2^43, so the shift stays below 2^107.
    let scaled = nanos << (64 - octave);
    let step = STEP_THRESHOLDS.partition_point(|&threshold| threshold <= scaled);
    1 + (octave * STEPS) as usize + step
}

/// Exclusive upper bound of a bucket, rounded up to whole nanoseconds.
fn upper_bound(index: usize) -> Duration {
    let index = index.min(LAST);
    let micros = 2f64.powf(index as f64 / f64::from(STEPS));
    // At most 1000 * 2^32 ns, far from u64's range; the cast saturates regardless.
    Duration::from_nanos((micros * 1000.0).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    /// Prometheus buckets are cumulative; a duration counts under the
    /// first bound its fine bucket fits, one past the last bound counts
    /// only in the total.
    #[test]
    fn cumulative_buckets_for_prometheus() {
        let h = Histogram::new();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(100));
        let bounds = [Duration::from_millis(1), Duration::from_millis(10)];
        let (counts, sum) = h.snapshot().cumulative(&bounds);
        assert_eq!(counts, vec![1, 3]);
        assert_eq!(h.snapshot().count(), 4);
        assert!((100.0..115.0).contains(&sum), "{sum}");
    }

    fn lower_bound(index: usize) -> Duration {
        if index == 0 {
            Duration::ZERO
        } else {
            upper_bound(index - 1)
        }
    }

    #[test]
    fn covers_an_hour() {
        assert_eq!(BUCKETS, 257);
        assert!(upper_bound(LAST) >= Duration::from_secs(3600));
    }

    #[test]
    fn bucket_edges() {
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_nanos(999)), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1000)), 1);
        // 2^(1/8) µs = 1090.507... ns.
        assert_eq!(bucket_of(Duration::from_nanos(1090)), 1);
        assert_eq!(bucket_of(Duration::from_nanos(1091)), 2);
        assert_eq!(bucket_of(Duration::from_nanos(1999)), 8);
        assert_eq!(bucket_of(Duration::from_nanos(2000)), 9);
        assert_eq!(bucket_of(Duration::from_micros(1 << 31)), 249);
        assert_eq!(bucket_of(Duration::from_micros((1 << 32) - 1)), LAST);
        assert_eq!(bucket_of(Duration::from_micros(1 << 32)), LAST);
        assert_eq!(bucket_of(Duration::from_secs(86_400 * 365)), LAST);
        assert_eq!(bucket_of(Duration::MAX), LAST);
    }

    #[test]
    fn buckets_agree_with_their_bounds() {
        // Every bucket's smallest and largest nanosecond land in that bucket.
        for index in 1..LAST {
            let lo = lower_bound(index);
            let hi = upper_bound(index) - Duration::from_nanos(1);
            assert_eq!(bucket_of(lo), index, "lower edge of {index}");
            assert_eq!(bucket_of(hi), index, "upper edge of {index}");
            assert!(upper_bound(index) > lower_bound(index));
        }
        // And a sweep of ordinary values agrees with the float formula away from edges.
        let mut nanos = 1000u64;
        while nanos < 4_000_000_000_000 {
            let exact = (nanos as f64 / 1000.0).log2() * 8.0;
            if (exact - exact.round()).abs() > 1e-6 {
                assert_eq!(
                    bucket_of(Duration::from_nanos(nanos)),
                    exact.floor() as usize + 1,
                    "{nanos} ns"
                );
            }
            nanos = nanos * 101 / 100 + 7;
        }
    }

    #[test]
    fn percentiles_overestimate_by_less_than_nine_percent() {
        let histogram = Histogram::new();
        let samples: Vec<Duration> = (1..=10_000u64)
            .map(|i| Duration::from_nanos(i * 12_345))
            .collect();
        for &d in &samples {
            histogram.record(d);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 10_000);
        for q in [0.0, 0.5, 0.95, 0.99, 0.999, 1.0] {
            let rank = ((q * 10_000.0_f64).ceil() as usize).max(1);
            let truth = samples[rank - 1];
            let estimate = snapshot.percentile(q);
            assert!(estimate > truth, "q={q}: {estimate:?} <= {truth:?}");
            assert!(
                estimate.as_secs_f64() < truth.as_secs_f64() * 1.0906,
                "q={q}: {estimate:?} vs {truth:?}"
            );
        }
    }

    #[test]
    fn single_value_percentiles() {
        let histogram = Histogram::new();
        histogram.record(Duration::from_millis(5));
        let snapshot = histogram.snapshot();
        for q in [-1.0, 0.0, 0.5, 1.0, 2.0, f64::NAN, f64::INFINITY] {
            let p = snapshot.percentile(q);
            assert!(p > Duration::from_millis(5) && p < Duration::from_micros(5450));
        }
    }

    #[test]
    fn out_of_range_q_is_clamped() {
        let histogram = Histogram::new();
        histogram.record(Duration::from_micros(10));
        histogram.record(Duration::from_secs(10));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.percentile(-5.0), snapshot.percentile(0.0));
        assert_eq!(
            snapshot.percentile(f64::NEG_INFINITY),
            snapshot.percentile(0.0)
        );
        assert_eq!(snapshot.percentile(7.0), snapshot.percentile(1.0));
        assert!(snapshot.percentile(0.0) < Duration::from_micros(11));
        assert!(snapshot.percentile(1.0) > Duration::from_secs(10));
    }

    #[test]
    fn empty_percentile_is_zero() {
        let snapshot = Histogram::new().snapshot();
        assert_eq!(snapshot.count(), 0);
        assert_eq!(snapshot, HistogramSnapshot::default());
        for q in [0.0, 0.5, 1.0, f64::NAN] {
            assert_eq!(snapshot.percentile(q), Duration::ZERO);
        }
    }

    #[test]
    fn zero_and_huge_durations() {
        let histogram = Histogram::default();
        histogram.record(Duration::ZERO);
        histogram.record(Duration::from_nanos(1));
        histogram.record(Duration::MAX);
        histogram.record(Duration::from_secs(u64::MAX));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 4);
        assert_eq!(snapshot.percentile(0.0), Duration::from_micros(1));
        assert_eq!(snapshot.percentile(0.5), Duration::from_micros(1));
        assert_eq!(
            snapshot.percentile(1.0),
            Duration::from_micros(1 << OCTAVES)
        );
        assert_eq!(snapshot.b, vec![(0, 2), (LAST as u16, 2)]);
    }

    #[test]
    fn merge_equals_recording_both() {
        let a = Histogram::new();
        let b = Histogram::new();
        let both = Histogram::new();
        for i in 0..1000u64 {
            let d = Duration::from_micros(i * i);
            a.record(d);
            both.record(d);
        }
        for i in 0..500u64 {
            let d = Duration::from_millis(i * 3 + 1);
            b.record(d);
            both.record(d);
        }
        let mut merged = a.snapshot();
        merged.merge(&b.snapshot());
        assert_eq!(merged, both.snapshot());
        assert_eq!(merged.count(), 1500);

        let mut empty = HistogramSnapshot::default();
        empty.merge(&merged);
        assert_eq!(empty, merged);
        merged.merge(&HistogramSnapshot::default());
        assert_eq!(merged, both.snapshot());
    }

    #[test]
    fn merge_clamps_foreign_indices() {
        let mut snapshot = HistogramSnapshot { b: vec![(3, 1)] };
        let peer = HistogramSnapshot {
            b: vec![(LAST as u16, 1), (300, 2), (u16::MAX, 4)],
        };
        snapshot.merge(&peer);
        assert_eq!(snapshot.b, vec![(3, 1), (LAST as u16, 7)]);

        let mut full = HistogramSnapshot {
            b: vec![(0, u64::MAX)],
        };
        full.merge(&HistogramSnapshot { b: vec![(0, 5)] });
        assert_eq!(full.count(), u64::MAX);
        assert_eq!(full.percentile(1.0), Duration::from_micros(1));
    }

    #[test]
    fn serde_round_trip() {
        let histogram = Histogram::new();
        for micros in [0, 1, 7, 1500, 1500, 2_000_000] {
            histogram.record(Duration::from_micros(micros));
        }
        histogram.record(Duration::MAX);
        let snapshot = histogram.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        assert!(json.starts_with("{\"b\":[[0,1],[1,1],"), "{json}");
        let back: HistogramSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snapshot);

        let empty: HistogramSnapshot = serde_json::from_str("{\"b\":[]}").unwrap();
        assert_eq!(empty, HistogramSnapshot::default());
    }

    #[test]
    fn deserialize_normalizes_peer_data() {
        let messy: HistogramSnapshot =
            serde_json::from_str("{\"b\":[[9,1],[2,3],[9,4],[5,0],[4000,2],[256,1]]}").unwrap();
        assert_eq!(messy.b, vec![(2, 3), (9, 5), (LAST as u16, 3)]);
        assert!(serde_json::from_str::<HistogramSnapshot>("{\"b\":[[70000,1]]}").is_err());
        assert!(serde_json::from_str::<HistogramSnapshot>("{\"b\":[[1,-1]]}").is_err());
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let histogram = Arc::new(Histogram::new());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let histogram = Arc::clone(&histogram);
                thread::spawn(move || {
                    for i in 0..25_000u64 {
                        histogram.record(Duration::from_nanos((i * 7919 + t) % 5_000_000));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(histogram.snapshot().count(), 200_000);
        assert_eq!(format!("{histogram:?}"), "Histogram { count: 200000 }");
    }
}
