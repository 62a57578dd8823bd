//! Cron schedule specifications: parsing, fire times and tick keys.
//!
//! A periodic job fires *exactly once per tick across any number of koo
//! instances*. Every instance computes the fire times of every schedule by
//! itself, with this module, and submits the tick's task with the idempotency
//! key `schedule:{name}:{tick_key}` ([`Tick::idempotency_key`]). Whichever
//! instance submits first wins; the others get the existing task back. For that
//! to work, every instance must agree on two things, whatever its wall clock
//! said when it woke up:
//!
//! * **which instants are ticks** — a pure function of the expression, the
//!   zone and the zone database, never of when or from where the search
//!   started ([`CronSpec::next_after`], [`CronSpec::missed`]);
//! * **the name of each tick** — [`Tick::key`], derived from the *scheduled*
//!   fire time, never from the time the instance happened to notice it.
//!
//! # Syntax
//!
//! Expressions are parsed by [`croner`], the crate `tokio-cron-scheduler`
//! 0.15 parses with, configured like its `Job::new*` / `Job::new_async_tz`
//! constructors (day-of-month **and** day-of-week must both match, see
//! [`DOM_AND_DOW`]) except that the seconds field is optional:
//!
//! * five fields `min hour dom mon dow`, or six `sec min hour dom mon dow`
//!   (a seven-field form with a year is refused);
//! * `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`, `@hourly`
//!   (case-insensitive; `@reboot` is not a schedule and is refused);
//! * names `JAN`–`DEC`, `SUN`–`SAT` (case-insensitive), ranges, lists and steps
//!   (`MON-FRI`, `1,15`, `*/5`), plus croner's `L`, `W`, `#` and `?`.
//!
//! # Time zones
//!
//! Expressions are read in an IANA zone (`Europe/Paris`, `America/New_York`;
//! `UTC` when none is given), using the zone database compiled into
//! `chrono-tz`. The same koo binary therefore computes the same ticks on every
//! machine, whatever its `TZ` or `/usr/share/zoneinfo`.
//!
//! # Daylight saving time
//!
//! The rule: **every local wall-clock time fires at most once, at its first
//! occurrence.**
//!
//! * **Clocks go back** (e.g. New York, 2026-11-01, 02:00 EDT → 01:00 EST, so
//!   01:00–01:59:59 happens twice): a tick whose local time is in the repeated
//!   hour fires once, at the *first* (daylight-time) occurrence. `30 1 * * *`
//!   fires at 01:30 EDT (05:30 UTC) and not again at 01:30 EST. This also
//!   holds for schedules that fire many times an hour: `*/15 * * * *` fires at
//!   01:00, 01:15, 01:30, 01:45 EDT, then stays quiet during the second pass
//!   through 01:xx, and resumes at 02:00 EST — its local times 01:00–01:45 have
//!   already fired. (croner itself would yield both occurrences for such
//!   schedules; this module drops the second one.)
//! * **Clocks go forward** (e.g. New York, 2026-03-08, 02:00 EST → 03:00 EDT,
//!   so 02:00–02:59:59 never happens), this is croner's behaviour:
//!   - a *fixed-time* schedule, i.e. a single second, a single minute and a
//!     single hour (`30 2 * * *`, `0 30 2 * * 0`), fires **once, at the first
//!     instant after the gap** (03:00:00 EDT) on the days it is due;
//!   - any other schedule (a wildcard, step, list or range in the second,
//!     minute or hour field: `30 * * * *`, `0,30 2 * * *`) **skips** the ticks
//!     that fall in the gap.
//!
//!   Either way a tick never fires twice, and only a local time the
//!   expression matches moves to the end of the gap: `59 1 * * *` fires at
//!   01:59 EST and not again at 03:00 EDT (croner itself answers 03:00 EDT
//!   when searching from 01:59 EST; `CronSpec::is_due` drops it).
//!
//! # Tick keys
//!
//! [`Tick::key`] is the tick's local wall-clock time, to the second, followed
//! by the zone in brackets (the RFC 9557 suffix form), e.g.
//! `2026-11-01T01:30:00[America/New_York]`. Because the key is the *local*
//! time, the two instants of a repeated local time (01:30 EDT and 01:30 EST)
//! would get the same key, so even an instance that somehow computed the
//! second one would be deduplicated by the idempotency key — a second line of
//! defence behind the rule above. A tick moved to the end of a spring-forward
//! gap is keyed by the time it actually fires (`2026-03-08T03:00:00[…]`); a
//! fixed-time schedule has one time a day, so that cannot collide with another
//! of its ticks. The zone is part of the key so that moving a schedule from
//! one zone to another never makes a new tick look like an old one that
//! already ran (the price: a tick due at the moment of the change may run in
//! both zones).
//!
//! # Missed ticks
//!
//! After downtime the caller asks [`CronSpec::missed`] for the ticks in
//! `(since, now]`: the latest one (to run once on catch-up) and how many there
//! were, counted up to a cap so that `* * * * * *` after a month of downtime
//! does not walk through 2.6 million seconds.
//!
//! # Why not take fire times from `tokio-cron-scheduler`
//!
//! As of 0.15.1 its jobs cannot be trusted with either of the two things above:
//!
//! * a job callback gets `(Uuid, JobScheduler)`, not the scheduled time, and
//!   the scheduler records `last_tick` as the time its 500 ms poll noticed the
//!   job (and updates `next_tick` concurrently with the callback);
//! * `Job::new_async_tz` uses the zone only for the first fire time: later ones
//!   use the zone's UTC offset *frozen when the job was created*, so after a
//!   DST change the job fires an hour early or late (upstream issues #87 and
//!   #107, still open).
//!
//! So whatever wakes an instance up, the instance asks this module which tick
//! is due ([`CronSpec::missed`] since the last tick it handled) and keys the
//! task by that tick, not by the wake-up time.

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};

/// Day-of-month and day-of-week must **both** match (`0 0 1 * MON`: the 1st of
/// the month when it is a Monday), as in `tokio-cron-scheduler`'s `Job::new*`
/// constructors, so that what koo computes is what that scheduler would run.
/// Classic Vixie cron would fire when *either* matches.
pub const DOM_AND_DOW: bool = true;

/// Longest cron expression accepted (bytes); real ones are under 100.
pub const MAX_EXPRESSION: usize = 256;

/// A reasonable cap for [`CronSpec::missed`]'s count.
pub const DEFAULT_MISSED_CAP: usize = 1000;

/// Why a schedule specification was refused. The message is meant for the
/// user (it becomes an `INVALID_ARGUMENT`), so it quotes what they sent and
/// the parser's own reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The cron expression does not parse, or never matches any date.
    #[error("invalid cron expression {}: {reason}", crate::quote::quote(expr))]
    InvalidCron {
        /// The expression as given.
        expr: String,
        /// croner's message (or ours, for an expression that never fires).
        reason: String,
    },
    /// The time zone is not an IANA name known to `chrono-tz`.
    #[error("unknown time zone {}", crate::quote::quote(.0))]
    UnknownZone(String),
}

/// One fire time of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tick {
    /// The scheduled instant.
    pub at: DateTime<Utc>,
    /// Names the tick: its local wall-clock time and zone, e.g.
    /// `2026-11-01T01:30:00[America/New_York]` (see the module doc).
    pub key: String,
}

impl Tick {
    /// The task idempotency key for this tick of schedule `schedule`:
    /// `schedule:{schedule}:{key}`.
    pub fn idempotency_key(&self, schedule: &str) -> String {
        format!("schedule:{schedule}:{}", self.key)
    }
}

/// What [`CronSpec::missed`] found in `(since, now]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// The latest tick at or before `now` and after `since`, if any.
    pub latest: Option<Tick>,
    /// How many ticks fell in `(since, now]`, at most the cap.
    pub count: usize,
    /// Whether counting stopped at the cap (there may be more).
    pub capped: bool,
}

/// A parsed cron expression and the zone it is read in.
#[derive(Debug, Clone)]
pub struct CronSpec {
    cron: Cron,
    expression: String,
    tz: Tz,
    has_seconds: bool,
}

impl CronSpec {
    /// Parses `expr` (five or six fields, or an `@` alias) to be read in the
    /// IANA zone `zone` (`""` means `UTC`). Surrounding whitespace is ignored.
    ///
    /// Also refuses an expression that never fires (`0 0 30 2 *`): croner
    /// would otherwise spend a noticeable time searching for it on every call.
    pub fn parse(expr: &str, zone: &str) -> Result<Self, SpecError> {
        let expression = expr.trim();
        let zone = zone.trim();
        let invalid = |reason: String| SpecError::InvalidCron {
            expr: expr.to_string(),
            reason,
        };
        // croner's own message may quote the expression: keep it short
        if expr.len() > MAX_EXPRESSION {
            return Err(invalid(format!(
                "it is {} bytes, over the limit of {MAX_EXPRESSION}",
                expr.len()
            )));
        }

        let tz: Tz = if zone.is_empty() {
            Tz::UTC
        } else {
            zone.parse()
                .map_err(|_| SpecError::UnknownZone(zone.to_string()))?
        };

        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .dom_and_dow(DOM_AND_DOW)
            .build()
            .parse(expression)
            .map_err(|e| invalid(e.to_string()))?;
        // croner expands aliases, so its pattern always has 5 or 6 fields here.
        let has_seconds = cron.pattern.as_str().split_whitespace().count() == 6;

        let spec = CronSpec {
            cron,
            expression: expression.to_string(),
            tz,
            has_seconds,
        };
        match spec
            .cron
            .find_next_occurrence(&Utc::now().with_timezone(&tz), false)
        {
            Ok(_) => Ok(spec),
            Err(CronError::TimeSearchLimitExceeded) => Err(invalid(
                "it never matches a date (such as February 30)".to_string(),
            )),
            Err(e) => Err(invalid(e.to_string())),
        }
    }

    /// The expression as given (trimmed).
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The zone's IANA name (`UTC` when none was given).
    pub fn zone(&self) -> &str {
        self.tz.name()
    }

    /// Whether the expression has a seconds field (six fields).
    pub fn has_seconds(&self) -> bool {
        self.has_seconds
    }

    /// The next `n` ticks strictly after `after`, in order. A local time
    /// repeated when clocks go back yields one tick (see the module doc), so
    /// no two ticks share a key. Fewer than `n` only if croner gives up
    /// searching (a pattern matching extremely rarely).
    pub fn next_after(&self, after: DateTime<Utc>, n: usize) -> Vec<Tick> {
        self.ticks_after(after)
            .take(n)
            .map(|at| self.tick(at))
            .collect()
    }

    /// The first tick strictly after `after`.
    pub fn next_tick(&self, after: DateTime<Utc>) -> Option<Tick> {
        self.ticks_after(after).next().map(|at| self.tick(at))
    }

    /// The ticks in `(since, now]`: the latest (the one to run on catch-up)
    /// and how many there were, counting at most `cap` (so the work is
    /// bounded whatever the gap; with `cap == 0` only `latest` is computed).
    pub fn missed(&self, since: DateTime<Utc>, now: DateTime<Utc>, cap: usize) -> Missed {
        if now <= since {
            return Missed {
                latest: None,
                count: 0,
                capped: false,
            };
        }
        let mut latest = None;
        let mut count = 0;
        for at in self.ticks_after(since) {
            if at > now {
                return Missed {
                    latest: latest.map(|at| self.tick(at)),
                    count,
                    capped: false,
                };
            }
            if count == cap {
                // More than `cap` ticks: find the latest one without walking
                // through all of them.
                let latest = self.latest_at_or_before(now, at);
                return Missed {
                    latest: Some(self.tick(latest)),
                    count,
                    capped: true,
                };
            }
            latest = Some(at);
            count += 1;
        }
        // croner gave up searching: report what was found.
        Missed {
            latest: latest.map(|at| self.tick(at)),
            count,
            capped: false,
        }
    }

    /// The latest tick at or before `now`, given `known`, a tick at or before
    /// `now`.
    ///
    /// croner can search backwards, but around a spring-forward gap its
    /// backward search does not land where the forward search does (it snaps
    /// a fixed-time tick to the last instant *before* the gap), so backward
    /// search only picks a starting point a few matches back, and the answer
    /// comes from the forward search that defines the ticks.
    fn latest_at_or_before(&self, now: DateTime<Utc>, known: DateTime<Utc>) -> DateTime<Utc> {
        // Three matches back from `now`, or from `known` if croner cannot
        // search backwards at all (then this walks every tick: slow, but
        // only for patterns croner can hardly search either way).
        let mut start = known.with_timezone(&self.tz);
        let mut back = whole_second(now).with_timezone(&self.tz);
        for _ in 0..3 {
            match self.cron.find_previous_occurrence(&back, false) {
                Ok(earlier) => {
                    back = earlier;
                    start = earlier;
                }
                Err(_) => break,
            }
        }
        let start = start.with_timezone(&Utc).max(known);
        let mut latest = known;
        for at in std::iter::once(start).chain(self.ticks_after(start)) {
            if at > now {
                break;
            }
            if at == start && at != known && !self.is_tick(at) {
                continue;
            }
            latest = at;
        }
        latest
    }

    /// Whether `at` is one of the schedule's ticks.
    fn is_tick(&self, at: DateTime<Utc>) -> bool {
        self.ticks_after(at - Duration::seconds(1)).next() == Some(at)
    }

    /// The ticks strictly after `after`, in order: croner's forward search,
    /// minus the second occurrence of a repeated local time.
    fn ticks_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        // croner keeps the sub-second part of the instant it starts from;
        // ticks are whole seconds, and none lies in (floor(after), after].
        let mut cursor = whole_second(after).with_timezone(&self.tz);
        std::iter::from_fn(move || {
            loop {
                // croner searches in local time from the cursor's wall-clock
                // time and, for a repeated local time, returns its first
                // occurrence; from a cursor in the second pass through a
                // repeated hour that can be an instant before `after`.
                let found = self.cron.find_next_occurrence(&cursor, false).ok()?;
                cursor = found;
                let at = found.with_timezone(&Utc);
                if at > after
                    && self.is_first_occurrence(found.naive_local(), at)
                    && self.is_due(&found)
                {
                    return Some(at);
                }
            }
        })
    }

    /// Whether croner's `found` is a tick: its local time matches the
    /// expression, or it is the first instant after a spring-forward gap
    /// that skipped a local time the expression matches (a fixed-time tick
    /// moved to the end of the gap). croner 3 also answers the end of a gap
    /// when searching from a tick in the hour before it (`59 1 * * *` from
    /// 01:59 EST gave 03:00 EDT on the day New York skips 02:xx), which
    /// would fire that schedule twice that day.
    fn is_due(&self, found: &DateTime<Tz>) -> bool {
        if self.cron.is_time_matching(found).unwrap_or(false) {
            return true;
        }
        let before = *found - Duration::seconds(1);
        let (from, to) = (before.naive_local(), found.naive_local());
        // no gap just before `found` (its offset is the same a second
        // earlier): a local time croner should not have answered
        if to - from <= Duration::seconds(1) {
            return false;
        }
        // the skipped local times, read in the offset before the gap
        let offset = before.fixed_offset().timezone();
        let step = Duration::seconds(if self.has_seconds { 1 } else { 60 });
        let mut local = from + Duration::seconds(1);
        while local < to {
            let skipped = offset.from_local_datetime(&local).single();
            if skipped.is_some_and(|t| self.cron.is_time_matching(&t).unwrap_or(false)) {
                return true;
            }
            local += step;
        }
        false
    }

    /// Whether `at` is the first (or only) instant with local time `local`.
    fn is_first_occurrence(&self, local: NaiveDateTime, at: DateTime<Utc>) -> bool {
        match self.tz.from_local_datetime(&local).earliest() {
            Some(first) => first.with_timezone(&Utc) == at,
            // A gap: croner moved the tick to the end of it; it is unique.
            None => true,
        }
    }

    fn tick(&self, at: DateTime<Utc>) -> Tick {
        let local = at.with_timezone(&self.tz).naive_local();
        Tick {
            at,
            key: format!("{}[{}]", local.format("%Y-%m-%dT%H:%M:%S"), self.tz.name()),
        }
    }
}

/// `at` without its fraction of a second (rounded down).
fn whole_second(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(at.timestamp(), 0).unwrap_or(at)
}

#[cfg(test)]
mod tests;
