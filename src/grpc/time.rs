//! Every `google.protobuf.Duration` and `Timestamp` a request carries goes
//! through here: one conversion, and one documented range per field.
//!
//! Why one place: a duration that is valid protobuf can still poison what
//! koo stores. `i64::MAX` seconds overflowed the milliseconds a task keeps
//! (on Redis the task could then never be read or leased), a countdown of
//! 10^12 s left a task SCHEDULED forever, and unnormalised values (`nanos`
//! outside ±999,999,999, or of the other sign than `seconds`), which the
//! protobuf spec calls invalid, were silently folded into another value
//! (`{1 s, 2e9 ns}` became 3 s). A field added later gets the same checks by
//! naming its [`Range`] here. The README's table lists the ranges.
//!
//! One exception, under the same rules: a failure's `retry_delay` is
//! checked with the rest of the failure
//! (`crate::tasks::remote::RetryDelay`), so that on a `Work` stream a bad
//! one is refused in the `fail`'s reply instead of ending the stream.

use std::time::{Duration, SystemTime};

use tonic::Status;

use super::status::invalid_argument;

const DAY: u64 = 24 * 3600;

/// The durations a field accepts, inclusive, and how the README says it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    min: Duration,
    max: Duration,
    text: &'static str,
}

impl Range {
    /// The longest duration in the range.
    pub(crate) const fn max(&self) -> Duration {
        self.max
    }
}

/// A cache TTL (`Set.ttl`, `entries[].ttl`, `cache_result.ttl`).
pub(crate) const CACHE_TTL: Range = Range {
    min: Duration::from_millis(1),
    max: crate::cache::MAX_TTL,
    text: "1 ms to 100 years",
};

/// A metrics stream's interval (`WatchMetrics`, `WatchTaskMetrics`).
pub(crate) const WATCH_INTERVAL: Range = Range {
    min: Duration::from_millis(100),
    max: Duration::from_secs(3600),
    text: "100 ms to 1 h",
};

/// How far ahead a task may be scheduled (`countdown`, and `eta` from now).
pub(crate) const COUNTDOWN: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(365 * DAY),
    text: "0 to 365 days",
};

/// How long a debounced task waits for a newer submit
/// (`debounce_window`).
pub(crate) const DEBOUNCE_WINDOW: Range = Range {
    min: Duration::from_millis(1),
    max: crate::tasks::engine::MAX_DEBOUNCE_WINDOW,
    text: "1 ms to 24 h",
};

/// How long after its submit a task not started expires (`expire_after`;
/// and `expire_time` from now): past the longest countdown, so that a task
/// scheduled that far can still expire after its start.
pub(crate) const EXPIRE_AFTER: Range = Range {
    min: Duration::from_millis(1),
    max: Duration::from_secs(366 * DAY),
    text: "1 ms to 366 days",
};

/// A task's hard time limit (`time_limit`).
pub(crate) const TIME_LIMIT: Range = Range {
    min: Duration::from_millis(1),
    max: Duration::from_secs(30 * DAY),
    text: "1 ms to 30 days",
};

/// A task's soft time limit (`soft_time_limit`; 0 means none).
pub(crate) const SOFT_TIME_LIMIT: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(30 * DAY),
    text: "0 to 30 days",
};

/// How long a task's result stays readable (`result_ttl`).
pub(crate) const RESULT_TTL: Range = Range {
    min: Duration::from_secs(1),
    max: Duration::from_secs(365 * DAY),
    text: "1 s to 365 days",
};

/// The age past which `CleanupTasks` removes ended tasks (`older_than`).
pub(crate) const OLDER_THAN: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(10 * 365 * DAY),
    text: "0 to 10 years",
};

/// How long `LeaseTask` waits for a task (`wait`).
pub(crate) const LEASE_WAIT: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(60),
    text: "0 to 60 s",
};

/// A rate limit's period (`rate_limit.period`).
pub(crate) const LIMIT_PERIOD: Range = Range {
    min: Duration::from_millis(1),
    max: crate::domain::flow::MAX_PERIOD,
    text: "1 ms to 24 h",
};

/// GetOrLock's `lock_ttl`.
pub(crate) const LOCK_TTL: Range = Range {
    min: Duration::from_millis(1),
    max: Duration::from_secs(3600),
    text: "1 ms to 1 h",
};

/// GetOrLock's `wait`.
pub(crate) const LOCK_WAIT: Range = Range {
    min: Duration::ZERO,
    max: Duration::from_secs(3600),
    text: "0 to 1 h",
};

/// GetOrCompute's `lock_ttl` (how long a computing task holds the key).
pub(crate) const COMPUTE_LOCK_TTL: Range = Range {
    min: Duration::from_secs(1),
    max: Duration::from_secs(DAY),
    text: "1 s to 1 day",
};

/// The latest time any timestamp field may name: 9999-12-31T23:59:59Z, the
/// end of `google.protobuf.Timestamp`'s own range.
const LATEST_SECONDS: i64 = 253_402_300_799;

/// The protobuf duration `d` of field `field` as a `Duration` within
/// `range`; absent stays absent. Unnormalised values and values outside the
/// range are INVALID_ARGUMENT naming the field and the range.
pub(crate) fn duration(
    field: &str,
    d: Option<prost_types::Duration>,
    range: Range,
) -> Result<Option<Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    let refuse = |why: &str| {
        invalid_argument(
            field,
            &format!(
                "{why}: must be {} (got seconds {}, nanos {})",
                range.text, d.seconds, d.nanos
            ),
        )
    };
    if !(-999_999_999..=999_999_999).contains(&d.nanos)
        || (d.seconds > 0 && d.nanos < 0)
        || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(refuse(
            "is not a normalised duration (|nanos| at most 999,999,999, of the sign of seconds)",
        ));
    }
    if d.seconds < 0 || d.nanos < 0 {
        return Err(refuse("is negative"));
    }
    // seconds past the range's end (an i64::MAX included) never reach
    // Duration arithmetic
    if d.seconds as u64 > range.max.as_secs() {
        return Err(refuse("is out of range"));
    }
    let value = Duration::new(d.seconds as u64, d.nanos as u32);
    if value < range.min || value > range.max {
        return Err(refuse("is out of range"));
    }
    Ok(Some(value))
}

/// The protobuf timestamp `t` of field `field` as a `SystemTime` between
/// the Unix epoch and 9999-12-31, and, with `max_ahead`, no later than that
/// long from now. Anything else is INVALID_ARGUMENT naming the field.
pub(crate) fn time(
    field: &str,
    t: Option<prost_types::Timestamp>,
    max_ahead: Option<(Duration, &str)>,
) -> Result<Option<SystemTime>, Status> {
    let Some(t) = t else { return Ok(None) };
    let refuse = |why: String| {
        invalid_argument(
            field,
            &format!("{why} (got seconds {}, nanos {})", t.seconds, t.nanos),
        )
    };
    if !(0..=999_999_999).contains(&t.nanos) {
        return Err(refuse(
            "is not a valid timestamp: nanos must be 0 to 999,999,999".to_owned(),
        ));
    }
    if !(0..=LATEST_SECONDS).contains(&t.seconds) {
        return Err(refuse(
            "must be between 1970-01-01 and 9999-12-31 UTC".to_owned(),
        ));
    }
    let at = SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
    if let Some((ahead, text)) = max_ahead
        && at > SystemTime::now() + ahead
    {
        return Err(refuse(format!("must be at most {text} from now")));
    }
    Ok(Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    /// Each edge of a range: in is in, out is refused, unnormalised is
    /// refused even when its value would fit.
    #[test]
    fn ranges_and_normal_form() {
        let ok = |x| duration("f", x, TIME_LIMIT).unwrap();
        assert_eq!(ok(d(0, 1_000_000)), Some(Duration::from_millis(1)));
        assert_eq!(
            ok(d(30 * 86_400, 0)),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(ok(None), None);
        for bad in [
            d(0, 999_999),
            d(30 * 86_400, 1),
            d(i64::MAX, 999_999_999),
            d(1, 1_000_000_000),
            d(0, 2_000_000_000),
            d(1, -1),
            d(-1, 0),
            d(i64::MIN, -999_999_999),
        ] {
            let e = duration("f", bad, TIME_LIMIT).unwrap_err();
            assert!(e.message().starts_with("f: "), "{}", e.message());
            assert!(e.message().contains("1 ms to 30 days"), "{}", e.message());
        }
    }

    /// Timestamps outside 1970..9999, unnormalised, or too far ahead are
    /// refused.
    #[test]
    fn timestamps() {
        let t = |seconds, nanos| Some(prost_types::Timestamp { seconds, nanos });
        assert!(time("t", t(0, 0), None).unwrap().is_some());
        assert!(time("t", t(LATEST_SECONDS, 999_999_999), None).is_ok());
        for bad in [
            t(-1, 0),
            t(LATEST_SECONDS + 1, 0),
            t(i64::MAX, 0),
            t(1, -1),
            t(1, 1_000_000_000),
        ] {
            assert!(time("t", bad, None).is_err(), "{bad:?}");
        }
        let year = Some((Duration::from_secs(365 * DAY), "365 days"));
        assert!(time("eta", t(4_000_000_000, 0), year).is_err());
        assert!(time("eta", t(1, 0), year).is_ok());
    }
}
