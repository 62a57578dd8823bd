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
//!   Either way a tick never fires twice.
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
        if expression.len() > MAX_EXPRESSION {
            return Err(invalid(format!(
                "it is {} bytes, over the limit of {MAX_EXPRESSION}",
                expression.len()
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
                if at > after && self.is_first_occurrence(found.naive_local(), at) {
                    return Some(at);
                }
            }
        })
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
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().expect("RFC 3339 instant")
    }

    fn spec(expr: &str, zone: &str) -> CronSpec {
        CronSpec::parse(expr, zone).unwrap_or_else(|e| panic!("{expr} in {zone:?}: {e}"))
    }

    fn instants(ticks: &[Tick]) -> Vec<DateTime<Utc>> {
        ticks.iter().map(|t| t.at).collect()
    }

    /// Every tick in `(since, now]`, by walking the forward search.
    fn all_ticks(spec: &CronSpec, since: DateTime<Utc>, now: DateTime<Utc>) -> Vec<Tick> {
        let mut out = Vec::new();
        let mut after = since;
        while let Some(t) = spec.next_tick(after) {
            if t.at > now {
                break;
            }
            after = t.at;
            out.push(t);
        }
        out
    }

    #[test]
    fn five_field_expression() {
        let s = spec("30 9 * * MON-FRI", "");
        assert_eq!(s.expression(), "30 9 * * MON-FRI");
        assert_eq!(s.zone(), "UTC");
        assert!(!s.has_seconds());
        // 2026-01-02 is a Friday.
        let ticks = s.next_after(utc("2026-01-02T09:30:00Z"), 3);
        assert_eq!(
            instants(&ticks),
            [
                utc("2026-01-05T09:30:00Z"),
                utc("2026-01-06T09:30:00Z"),
                utc("2026-01-07T09:30:00Z"),
            ]
        );
        assert_eq!(ticks[0].key, "2026-01-05T09:30:00[UTC]");
        assert_eq!(
            ticks[0].idempotency_key("report"),
            "schedule:report:2026-01-05T09:30:00[UTC]"
        );
    }

    #[test]
    fn six_field_expression() {
        let s = spec(" 15 */20 * * * * ", "UTC");
        assert_eq!(s.expression(), "15 */20 * * * *");
        assert!(s.has_seconds());
        assert_eq!(
            instants(&s.next_after(utc("2026-05-01T10:00:15Z"), 3)),
            [
                utc("2026-05-01T10:20:15Z"),
                utc("2026-05-01T10:40:15Z"),
                utc("2026-05-01T11:00:15Z"),
            ]
        );
    }

    #[test]
    fn fractions_of_a_second_are_ignored() {
        let s = spec("*/10 * * * * *", "");
        let t = |ms| utc("2026-05-01T10:00:10Z") + Duration::milliseconds(ms);
        let ticks = s.next_after(t(500), 2);
        assert_eq!(
            instants(&ticks),
            [utc("2026-05-01T10:00:20Z"), utc("2026-05-01T10:00:30Z")]
        );
        assert_eq!(s.next_after(t(-1), 1)[0].at, t(0));
        let m = s.missed(t(-1), t(20_999), 1);
        assert_eq!((m.count, m.capped), (1, true));
        assert_eq!(m.latest.unwrap().at, utc("2026-05-01T10:00:30Z"));
    }

    #[test]
    fn aliases_and_names() {
        let after = utc("2026-01-01T00:00:00Z");
        let next = |expr: &str| spec(expr, "").next_after(after, 1)[0].at;
        assert_eq!(next("@hourly"), utc("2026-01-01T01:00:00Z"));
        assert_eq!(next("@daily"), utc("2026-01-02T00:00:00Z"));
        assert_eq!(next("@weekly"), utc("2026-01-04T00:00:00Z")); // a Sunday
        assert_eq!(next("@monthly"), utc("2026-02-01T00:00:00Z"));
        assert_eq!(next("@yearly"), utc("2027-01-01T00:00:00Z"));
        assert_eq!(next("@DAILY"), utc("2026-01-02T00:00:00Z"));
        assert_eq!(next("0 12 1 jan *"), utc("2026-01-01T12:00:00Z"));
        assert_eq!(next("0 0 * * SAT"), utc("2026-01-03T00:00:00Z"));
        assert!(!spec("@daily", "").has_seconds());
    }

    #[test]
    fn day_of_month_and_day_of_week_must_both_match() {
        // The 1st of a month that is a Monday: June 2026.
        let s = spec("0 0 1 * MON", "");
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:00Z"), 1)[0].at,
            utc("2026-06-01T00:00:00Z")
        );
    }

    #[test]
    fn every_second_gives_consecutive_seconds() {
        let s = spec("* * * * * *", "Europe/Paris");
        let start = utc("2026-07-14T21:59:58Z");
        let ticks = s.next_after(start, 5);
        let expected: Vec<_> = (1..=5).map(|i| start + Duration::seconds(i)).collect();
        assert_eq!(instants(&ticks), expected);
        assert_eq!(ticks[1].key, "2026-07-15T00:00:00[Europe/Paris]");
    }

    #[test]
    fn invalid_expression_quotes_it_and_the_reason() {
        let err = CronSpec::parse("61 * * * *", "").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(r#"invalid cron expression "61 * * * *": "#),
            "{msg}"
        );
        let reason = "61 * * * *".parse::<Cron>().unwrap_err().to_string();
        assert!(msg.ends_with(&reason), "{msg} / {reason}");
        assert!(matches!(err, SpecError::InvalidCron { .. }));

        for bad in [
            "",
            "* * *",
            "* * * * * * *",
            "@reboot",
            "*/0 * * * *",
            "0 0 * * FUNDAY",
        ] {
            let err = CronSpec::parse(bad, "UTC").unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid cron expression {bad:?}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn expression_that_never_fires_is_refused() {
        let err = CronSpec::parse("0 0 30 2 *", "").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid cron expression "0 0 30 2 *": it never matches a date (such as February 30)"#
        );
        // Rare but real: February 29th.
        let s = spec("0 0 29 2 *", "");
        assert_eq!(
            s.next_after(utc("2026-01-01T00:00:00Z"), 1)[0].at,
            utc("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn unknown_zone() {
        let err = CronSpec::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(err, SpecError::UnknownZone("Mars/Olympus".into()));
        assert_eq!(err.to_string(), r#"unknown time zone "Mars/Olympus""#);
        assert!(CronSpec::parse("* * * * *", "utc+2").is_err());
        assert_eq!(
            spec("* * * * *", "America/New_York").zone(),
            "America/New_York"
        );
    }

    #[test]
    fn zone_shifts_fire_times() {
        let s = spec("0 9 * * *", "Europe/Paris");
        let ticks = s.next_after(utc("2026-03-28T00:00:00Z"), 2);
        // CET (+1) then, after the 29 March change, CEST (+2).
        assert_eq!(
            instants(&ticks),
            [utc("2026-03-28T08:00:00Z"), utc("2026-03-29T07:00:00Z")]
        );
        assert_eq!(ticks[1].key, "2026-03-29T09:00:00[Europe/Paris]");
    }

    #[test]
    fn fall_back_fixed_time_fires_once_at_first_occurrence() {
        // New York, 2026-11-01: 02:00 EDT -> 01:00 EST; 01:30 happens at
        // 05:30Z (EDT) and again at 06:30Z (EST).
        let s = spec("30 1 * * *", "America/New_York");
        let ticks = s.next_after(utc("2026-10-31T12:00:00Z"), 3);
        assert_eq!(
            instants(&ticks),
            [
                utc("2026-11-01T05:30:00Z"),
                utc("2026-11-02T06:30:00Z"),
                utc("2026-11-03T06:30:00Z"),
            ]
        );
        assert_eq!(ticks[0].key, "2026-11-01T01:30:00[America/New_York]");
        // From inside the repeated hour, before or after the second 01:30,
        // that day's tick is in the past.
        for after in ["2026-11-01T06:10:00Z", "2026-11-01T06:45:00Z"] {
            assert_eq!(
                s.next_after(utc(after), 1)[0].at,
                utc("2026-11-02T06:30:00Z")
            );
        }
        let day = s.missed(utc("2026-11-01T04:00:00Z"), utc("2026-11-01T12:00:00Z"), 10);
        assert_eq!(day.count, 1);
        assert_eq!(day.latest.unwrap().at, utc("2026-11-01T05:30:00Z"));
    }

    #[test]
    fn fall_back_interval_schedule_never_repeats_a_key() {
        let s = spec("*/15 * * * *", "America/New_York");
        let ticks = s.next_after(utc("2026-11-01T04:00:00Z"), 12);
        let keys: HashSet<_> = ticks.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys.len(), ticks.len(), "{ticks:#?}");
        let local: Vec<_> = ticks
            .iter()
            .map(|t| &t.key[11..16]) // HH:MM
            .collect();
        assert_eq!(
            local,
            [
                "00:15", "00:30", "00:45", "01:00", "01:15", "01:30", "01:45", // EDT
                "02:00", "02:15", "02:30", "02:45", "03:00", // EST
            ]
        );
        // 01:45 EDT is 05:45Z; 02:00 EST is 07:00Z: the second pass is quiet.
        assert_eq!(ticks[6].at, utc("2026-11-01T05:45:00Z"));
        assert_eq!(ticks[7].at, utc("2026-11-01T07:00:00Z"));
        // Starting from inside the second pass agrees.
        assert_eq!(
            s.next_after(utc("2026-11-01T06:20:00Z"), 1)[0].at,
            utc("2026-11-01T07:00:00Z")
        );

        let every_second = spec("* * * * * *", "America/New_York");
        let ticks = every_second.next_after(utc("2026-11-01T05:59:58Z"), 4);
        assert_eq!(
            instants(&ticks),
            [
                utc("2026-11-01T05:59:59Z"),
                utc("2026-11-01T07:00:00Z"),
                utc("2026-11-01T07:00:01Z"),
                utc("2026-11-01T07:00:02Z"),
            ]
        );
    }

    #[test]
    fn spring_forward_fixed_time_fires_once_at_end_of_gap() {
        // New York, 2026-03-08: 02:00 EST -> 03:00 EDT; 02:30 does not exist.
        let s = spec("30 2 * * *", "America/New_York");
        let ticks = s.next_after(utc("2026-03-07T12:00:00Z"), 3);
        assert_eq!(
            instants(&ticks),
            [
                utc("2026-03-08T07:00:00Z"), // 03:00 EDT, the first instant after the gap
                utc("2026-03-09T06:30:00Z"), // 02:30 EDT
                utc("2026-03-10T06:30:00Z"),
            ]
        );
        assert_eq!(ticks[0].key, "2026-03-08T03:00:00[America/New_York]");
        assert_eq!(ticks[1].key, "2026-03-09T02:30:00[America/New_York]");
        let day = s.missed(utc("2026-03-08T05:00:00Z"), utc("2026-03-08T20:00:00Z"), 10);
        assert_eq!(day.count, 1);
        assert_eq!(day.latest.unwrap().at, utc("2026-03-08T07:00:00Z"));
    }

    #[test]
    fn spring_forward_interval_schedule_skips_the_gap() {
        let s = spec("30 * * * *", "America/New_York");
        let ticks = s.next_after(utc("2026-03-08T05:00:00Z"), 3);
        // 00:30 EST, 01:30 EST, (02:30 skipped), 03:30 EDT.
        assert_eq!(
            instants(&ticks),
            [
                utc("2026-03-08T05:30:00Z"),
                utc("2026-03-08T06:30:00Z"),
                utc("2026-03-08T07:30:00Z"),
            ]
        );
        assert_eq!(ticks[2].key, "2026-03-08T03:30:00[America/New_York]");
    }

    #[test]
    fn missed_returns_latest_and_count() {
        let s = spec("*/10 * * * *", "");
        let since = utc("2026-05-01T10:05:00Z");
        let now = utc("2026-05-01T10:50:00Z");
        let m = s.missed(since, now, DEFAULT_MISSED_CAP);
        assert_eq!(m.count, 5); // 10:10 .. 10:50
        assert!(!m.capped);
        let latest = m.latest.unwrap();
        assert_eq!(latest.at, now); // at or before `now`
        assert_eq!(latest.key, "2026-05-01T10:50:00[UTC]");

        // `since` itself is excluded.
        let m = s.missed(utc("2026-05-01T10:10:00Z"), utc("2026-05-01T10:19:59Z"), 10);
        assert_eq!((m.latest, m.count, m.capped), (None, 0, false));
        // An empty or backwards window.
        assert_eq!(s.missed(now, now, 10).count, 0);
        assert_eq!(s.missed(now, since, 10).latest, None);
    }

    #[test]
    fn missed_respects_the_cap() {
        let s = spec("* * * * * *", "");
        let since = utc("2026-01-01T00:00:00Z");
        let now = utc("2026-02-01T00:00:00Z"); // 2.6 million ticks
        let started = std::time::Instant::now();
        let m = s.missed(since, now, DEFAULT_MISSED_CAP);
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(m.count, DEFAULT_MISSED_CAP);
        assert!(m.capped);
        assert_eq!(m.latest.unwrap().at, now);

        let m = s.missed(since, now + Duration::milliseconds(999), 3);
        assert_eq!((m.count, m.capped), (3, true));
        assert_eq!(m.latest.unwrap().at, now);

        let m = s.missed(since, now, 0);
        assert_eq!((m.count, m.capped), (0, true));
        assert_eq!(m.latest.unwrap().at, now);

        // Exactly `cap` ticks is not capped.
        let m = s.missed(since, since + Duration::seconds(3), 3);
        assert_eq!((m.count, m.capped), (3, false));
    }

    #[test]
    fn capped_missed_agrees_with_walking_every_tick() {
        // Windows ending inside or just after DST changes, where croner's
        // backward search is least like its forward search.
        // (expression, zone, window in days)
        let cases = [
            ("30 2 * * *", "America/New_York", 10),
            ("30 1 * * *", "America/New_York", 10),
            ("*/15 * * * *", "America/New_York", 3),
            ("0 * * * *", "Europe/Paris", 3),
            ("30 2 * * *", "Europe/Paris", 10),
            ("*/20 1-3 * * *", "Europe/Paris", 10),
            ("0 30 1 * * 0", "America/New_York", 40),
            ("0 0 1 * MON", "UTC", 800),
        ];
        let ends = [
            "2026-03-08T06:59:59Z",
            "2026-03-08T07:00:00Z",
            "2026-03-08T07:00:30Z",
            "2026-03-08T07:45:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T01:30:00Z",
            "2026-11-01T05:30:00Z",
            "2026-11-01T06:15:00Z",
            "2026-11-01T06:30:00Z",
            "2026-11-01T07:00:00Z",
            "2026-10-25T00:40:00Z",
            "2026-10-25T01:20:00Z",
        ];
        for (expr, zone, days) in cases {
            let s = spec(expr, zone);
            for end in ends {
                let now = utc(end);
                let since = now - Duration::days(days);
                let every = all_ticks(&s, since, now);
                for cap in [0, 1, 2, 5] {
                    let m = s.missed(since, now, cap);
                    assert_eq!(
                        m.count,
                        every.len().min(cap),
                        "{expr} {zone} {end} cap {cap}"
                    );
                    assert_eq!(m.capped, every.len() > cap, "{expr} {zone} {end} cap {cap}");
                    assert_eq!(
                        m.latest.as_ref(),
                        every.last(),
                        "{expr} {zone} {end} cap {cap}"
                    );
                }
            }
        }
    }

    #[test]
    fn keys_are_unique_across_dst_changes() {
        // Lord Howe Island moves its clocks by half an hour.
        for zone in ["America/New_York", "Europe/Paris", "Australia/Lord_Howe"] {
            for expr in ["*/30 * * * *", "30 1 * * *", "30 2 * * *", "0 0,30 2 * * *"] {
                let s = spec(expr, zone);
                // A month from each start covers every change of 2026.
                for start in [
                    "2026-03-01T00:00:00Z",
                    "2026-04-01T00:00:00Z",
                    "2026-10-01T00:00:00Z",
                ] {
                    let ticks = s.next_after(utc(start), 1_500);
                    let keys: HashSet<_> = ticks.iter().map(|t| &t.key).collect();
                    assert_eq!(keys.len(), ticks.len(), "{expr} in {zone} from {start}");
                    assert!(
                        ticks.windows(2).all(|w| w[0].at < w[1].at),
                        "{expr} in {zone}"
                    );
                }
            }
        }
    }
}
