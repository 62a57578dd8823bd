//! The cron rules of [`super`], pinned: syntax, zones, daylight-saving
//! changes, missed ticks and tick keys.

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

/// A fixed time in the hour before the gap fires once, at its own time:
/// croner 3, searching from that tick, answers the end of the gap, which
/// the expression does not match (found by a black-box test of
/// `59 1 * * *`, which fired at 01:59 EST and again at 03:00 EDT).
#[test]
fn spring_forward_leaves_the_hour_before_the_gap_alone() {
    // (expression, zone, the day's one tick)
    let cases = [
        ("59 1 * * *", "America/New_York", "2027-03-14T06:59:00Z"),
        ("30 1 * * *", "America/New_York", "2027-03-14T06:30:00Z"),
        ("15 1 * * *", "America/Chicago", "2027-03-14T07:15:00Z"),
        ("45 0 * * *", "Europe/London", "2027-03-28T00:45:00Z"),
        ("30 1 * * *", "Europe/Paris", "2027-03-28T00:30:00Z"),
        ("30 1 * * *", "Australia/Sydney", "2027-10-02T15:30:00Z"),
        ("0 59 1 * * *", "America/New_York", "2027-03-14T06:59:00Z"),
    ];
    for (expr, zone, tick) in cases {
        let s = spec(expr, zone);
        let tick = utc(tick);
        let day = s.missed(tick - Duration::hours(12), tick + Duration::hours(12), 10);
        assert_eq!(day.count, 1, "{expr} in {zone}");
        assert_eq!(day.latest.unwrap().at, tick, "{expr} in {zone}");
        // and from the tick itself, the next one is a day later
        let next = s.next_tick(tick).unwrap().at;
        assert!(
            next - tick >= Duration::hours(23),
            "{expr} in {zone}: {next}"
        );
    }
    // the gap's own fixed times still fire once, at its end
    let s = spec("30 2 * * *", "America/New_York");
    let next = s.next_tick(utc("2027-03-14T06:30:00Z")).unwrap();
    assert_eq!(next.at, utc("2027-03-14T07:00:00Z"));
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
