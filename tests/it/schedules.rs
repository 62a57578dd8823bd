//! Periodic schedules end to end (issue 6): the seed's defaults, the
//! ScheduleService RPCs and their refusals, exactly one task per tick across
//! several schedulers, changes made through one instance taking effect on
//! another, and the missed-tick policy after downtime. Real gRPC, real Redis.
//!
//! Tests that count ticks run their schedulers on a clock they move ahead
//! ([`Scheduler`], [`step`]) instead of waiting for ticks in real time.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::tasks::*;
use common::{TestRedis, TestServer};
use koo::pb::schedule::v1::{self as spb, schedule_service_client::ScheduleServiceClient};
use koo::pb::tasks::v1 as pb;
use koo::schedule::{ScheduleStore, Schedules};
use koo::store::RedisStore;
use koo::store::clock::Clock;
use koo::store::tasks::TaskStore;
use koo::tasks::engine::TaskEngine;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

fn schedules(server: &TestServer) -> ScheduleServiceClient<Channel> {
    ScheduleServiceClient::new(server.channel.clone())
}

/// A schedule submitting `task` (a name no worker serves, so its tasks stay
/// queued and countable) on `cron`.
fn every(name: &str, cron: &str, task: &str) -> spb::Schedule {
    spb::Schedule {
        name: name.into(),
        cron: cron.into(),
        task: Some(spb::TaskTemplate {
            name: task.into(),
            category: pb::TaskCategory::Research as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn create(c: &mut ScheduleServiceClient<Channel>, s: spb::Schedule) -> spb::Schedule {
    c.create_schedule(spb::CreateScheduleRequest {
        schedule: Some(s),
        paused: false,
    })
    .await
    .unwrap()
    .into_inner()
    .schedule
    .unwrap()
}

async fn get(c: &mut ScheduleServiceClient<Channel>, name: &str) -> spb::Schedule {
    c.get_schedule(spb::GetScheduleRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap()
}

/// Every queued task named `name`: its schedule tick (ms) → how many.
async fn ticks(server: &TestServer, name: &str) -> BTreeMap<i64, usize> {
    let mut c = client(server);
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_active_tasks(pb::ListActiveTasksRequest {
                name: name.into(),
                page_size: 500,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for t in page.tasks {
            let at = t.schedule_time.expect("a scheduled task has its tick");
            *out.entry(at.seconds * 1000 + i64::from(at.nanos) / 1_000_000)
                .or_insert(0) += 1;
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Waits until `name` has at least `n` ticks' tasks (a tick is a second: a
/// bounded read loop, nothing signals it).
async fn wait_ticks(server: &TestServer, name: &str, n: usize) -> BTreeMap<i64, usize> {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = ticks(server, name).await;
        if t.len() >= n {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "only {} ticks of {name}",
            t.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn short_defaults(s: &mut koo::server::Settings, crons: [&str; 4]) {
    s.schedule.defaults = koo::schedule::defaults::from_config(crons, "UTC").unwrap();
    s.schedule.reload_interval = Duration::from_millis(200);
}

/// A koo on `redis` with its scheduler on or off.
async fn instance(redis: &TestRedis, scheduler: bool) -> TestServer {
    let mut settings = common::test_settings(common::redis_settings(&redis.url()));
    let koo::server::StoreSettings::Redis(r) = &settings.store else {
        unreachable!()
    };
    settings.tasks.redis = Some(r.clone());
    short_intervals(&mut settings, 0);
    short_defaults(&mut settings, ["off"; 4]);
    settings.schedule.enabled = scheduler;
    let server = TestServer::spawn(settings).await;
    server
        .wait_health(
            "",
            tonic_health::pb::health_check_response::ServingStatus::Serving,
        )
        .await;
    server
}

/// How often a test's [`Scheduler`] looks for changes (and so how soon it
/// sees its clock moved).
const RELOAD: Duration = Duration::from_millis(50);

/// A scheduler as `koo scheduler` composes it (the schedule store and the
/// task engine on `redis`, no gRPC), on `clock`, in a runtime of its own:
/// [`Scheduler::kill`] drops everything it was doing where it stands, as
/// SIGKILL does to the process.
struct Scheduler {
    runtime: Option<tokio::runtime::Runtime>,
    stop: CancellationToken,
    run: Option<tokio::task::JoinHandle<()>>,
}

impl Scheduler {
    fn start(redis: &TestRedis, clock: &Clock) -> Self {
        let mut settings = common::test_settings(common::redis_settings(&redis.url()));
        short_intervals(&mut settings, 0);
        let koo::server::StoreSettings::Redis(config) = settings.store.clone() else {
            unreachable!()
        };
        let tasks = settings.tasks.config.clone();
        let defaults = koo::schedule::defaults::from_config(["off"; 4], "UTC").unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let (clock, until) = (clock.clone(), stop.clone());
        let run = runtime.spawn(async move {
            let store = RedisStore::connect(&config).expect("a Redis URL");
            let prefix = tasks.prefix.clone();
            let engine = TaskEngine::new(TaskStore::redis(store.clone(), &prefix), tasks);
            let schedules =
                Schedules::new(ScheduleStore::redis(store, &prefix), engine).with_clock(clock);
            koo::schedule::run(schedules, defaults, RELOAD, until).await;
        });
        Self {
            runtime: Some(runtime),
            stop,
            run: Some(run),
        }
    }

    /// Kills it: its runtime goes with every task in it (ticks being fired
    /// included), nothing winds down.
    fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Stops it as a signal stops `koo scheduler`: the loop ends, then the
    /// process (here its runtime) does.
    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(run) = self.run.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Moves `clock` a second ahead and waits until the task of the tick of
/// `witness` (a task name fired every second) now due is stored: the
/// scheduler has then run its loop past that tick.
async fn step(clock: &Clock, server: &TestServer, witness: &str) {
    clock.advance(Duration::from_secs(1));
    let due = clock.now_ms() / 1000 * 1000;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !ticks(server, witness).await.keys().any(|ms| *ms >= due) {
        assert!(
            tokio::time::Instant::now() < until,
            "no tick of {witness} at {due}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` [`step`]s.
async fn steps(clock: &Clock, server: &TestServer, witness: &str, n: usize) {
    for _ in 0..n {
        step(clock, server, witness).await;
    }
}

/// [`step`]s until the ticks of `name` satisfy `done`; those ticks.
async fn step_until(
    clock: &Clock,
    server: &TestServer,
    witness: &str,
    name: &str,
    done: impl Fn(&BTreeMap<i64, usize>) -> bool,
) -> BTreeMap<i64, usize> {
    for _ in 0..30 {
        let t = ticks(server, name).await;
        if done(&t) {
            return t;
        }
        step(clock, server, witness).await;
    }
    panic!("{name}: {:?}", ticks(server, name).await);
}

on_both!(defaults_exist_and_fire, rpcs_and_refusals);

/// The seed's four defaults are there out of the box (here with short
/// intervals), and they fire through the normal task path: each firing is
/// a task carrying its schedule's name and tick, in history too.
async fn defaults_exist_and_fire(backend: Backend) {
    let koo = start_on_with(backend, 2, |s| {
        short_defaults(s, ["* * * * * *", "*/30 * * * *", "0 * * * *", "off"]);
    })
    .await;
    let mut c = schedules(&koo.server);
    // the scheduler stores the defaults as it starts
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = c
            .list_schedules(spb::ListSchedulesRequest::default())
            .await
            .unwrap()
            .into_inner();
        if list.schedules.len() == 3 {
            break list;
        }
        assert!(tokio::time::Instant::now() < until, "{list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<&str> = list.schedules.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["cache-cleanup", "cache-warm", "database-maintenance"]
    );
    for s in &list.schedules {
        assert_eq!(s.source, spb::ScheduleSource::Config as i32);
        assert_eq!(s.time_zone, "UTC");
        assert_eq!(s.next_fire_times.len(), 5);
    }
    assert_eq!(list.schedules[1].cron, "*/30 * * * *");
    assert_eq!(
        list.schedules[2].task.as_ref().unwrap().name,
        "koo.tasks.database.maintenance"
    );
    // cache cleanup every second: it runs, and its run is recorded
    let mut tasks = client(&koo.server);
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let run = loop {
        let s = get(&mut c, "cache-cleanup").await;
        if let Some(run) = s
            .last_run
            .clone()
            .filter(|r| r.state == pb::TaskState::Succeeded as i32)
        {
            break run;
        }
        assert!(tokio::time::Instant::now() < until, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(run.tick_time.is_some() && !run.triggered);
    let task = get_ok(&mut tasks, &run.task_id).await;
    assert_eq!(task.name, "koo.tasks.cache.cleanup");
    assert_eq!(task.schedule, "cache-cleanup");
    assert_eq!(task.schedule_time, run.tick_time);
    let history = tasks
        .list_task_history(pb::ListTaskHistoryRequest {
            name: "koo.tasks.cache.cleanup".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        history.tasks.iter().any(|t| t.schedule == "cache-cleanup"),
        "{history:?}"
    );
}

/// Every RPC, and the refusals: invalid cron or zone (quoting the parser),
/// duplicate names, unknown names, bad masks, deleting a default.
async fn rpcs_and_refusals(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        short_defaults(s, ["*/10 * * * *", "off", "off", "off"]);
    })
    .await;
    let mut c = schedules(&koo.server);
    let created = create(
        &mut c,
        spb::Schedule {
            time_zone: "Europe/Paris".into(),
            missed_tick_policy: spb::MissedTickPolicy::RunOnce as i32,
            ..every("nightly-report", "30 2 * * *", "koo.examples.report")
        },
    )
    .await;
    assert_eq!(created.source, spb::ScheduleSource::Api as i32);
    assert_eq!(created.next_fire_times.len(), 5);
    assert!(created.last_run.is_none());
    // 02:30 in Paris is 00:30 or 01:30 UTC
    let first = created.next_fire_times[0].seconds;
    assert!(matches!((first % 86400) / 60, 30 | 90), "{created:?}");
    let err = c
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(every("nightly-report", "* * * * *", "x")),
            paused: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // created paused: stored paused, with no fire times, until resumed (the
    // schedule's own `paused` is output only and ignored)
    let paused = c
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(every("created-paused", "* * * * *", "x")),
            paused: true,
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(
        paused.paused && paused.next_fire_times.is_empty(),
        "{paused:?}"
    );
    assert!(get(&mut c, "created-paused").await.paused);
    let ignored = create(
        &mut c,
        spb::Schedule {
            paused: true,
            ..every("output-only", "* * * * *", "x")
        },
    )
    .await;
    assert!(!ignored.paused, "{ignored:?}");
    for name in ["created-paused", "output-only"] {
        c.delete_schedule(spb::DeleteScheduleRequest { name: name.into() })
            .await
            .unwrap();
    }
    for (s, field, quote) in [
        (
            every("bad-cron", "61 * * * *", "x"),
            "schedule.cron",
            "61 * * * *",
        ),
        (
            spb::Schedule {
                time_zone: "Mars/Olympus".into(),
                ..every("bad-zone", "* * * * *", "x")
            },
            "schedule.time_zone",
            "Mars/Olympus",
        ),
        (
            every("bad name", "* * * * *", "x"),
            "schedule.name",
            "bad name",
        ),
        (
            spb::Schedule {
                task: None,
                ..every("no-task", "* * * * *", "x")
            },
            "schedule.task",
            "required",
        ),
        // a soft limit past the hard one: every tick's submit would be
        // refused, so the template is refused when saved (a hard limit
        // alone brings the default soft limit down to it)
        (
            spb::Schedule {
                task: Some(spb::TaskTemplate {
                    time_limit: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    soft_time_limit: Some(prost_types::Duration {
                        seconds: 90,
                        nanos: 0,
                    }),
                    ..every("short-limit", "* * * * *", "x").task.unwrap()
                }),
                ..every("short-limit", "* * * * *", "x")
            },
            "schedule.task.soft_time_limit",
            "must not exceed",
        ),
        (
            spb::Schedule {
                task: Some(spb::TaskTemplate {
                    queue: "nowhere".into(),
                    ..every("no-queue", "* * * * *", "x").task.unwrap()
                }),
                ..every("no-queue", "* * * * *", "x")
            },
            "schedule.task.queue",
            "nowhere",
        ),
        (
            spb::Schedule {
                task: Some(spb::TaskTemplate {
                    max_retries: Some(1001),
                    ..every("many-retries", "* * * * *", "x").task.unwrap()
                }),
                ..every("many-retries", "* * * * *", "x")
            },
            "schedule.task.max_retries",
            "must be 0 to 1000, got 1001",
        ),
    ] {
        let err = c
            .create_schedule(spb::CreateScheduleRequest {
                schedule: Some(s),
                paused: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {err:?}");
        assert!(err.message().contains(quote), "{quote}: {err:?}");
    }
    // surrounding whitespace (a shell's newline, padding) is not stored
    let padded = create(
        &mut c,
        spb::Schedule {
            time_zone: " America/New_York ".into(),
            ..every("padded", &format!("{}0 3 * * *\n", " ".repeat(10_000)), "x")
        },
    )
    .await;
    assert_eq!(
        (padded.cron.as_str(), padded.time_zone.as_str()),
        ("0 3 * * *", "America/New_York")
    );
    c.delete_schedule(spb::DeleteScheduleRequest {
        name: "padded".into(),
    })
    .await
    .unwrap();
    for name in ["nope", ""] {
        let err = c
            .get_schedule(spb::GetScheduleRequest { name: name.into() })
            .await
            .unwrap_err();
        let code = if name.is_empty() {
            Code::InvalidArgument
        } else {
            Code::NotFound
        };
        assert_eq!(err.code(), code, "{err:?}");
    }
    // update only the cron: the zone and the task stay
    let updated = c
        .update_schedule(spb::UpdateScheduleRequest {
            schedule: Some(every("nightly-report", "0 3 * * *", "ignored")),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["cron".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert_eq!(updated.cron, "0 3 * * *");
    assert_eq!(updated.time_zone, "Europe/Paris");
    assert_eq!(updated.task.unwrap().name, "koo.examples.report");
    let err = c
        .update_schedule(spb::UpdateScheduleRequest {
            schedule: Some(every("nightly-report", "0 3 * * *", "x")),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["colour".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .update_schedule(spb::UpdateScheduleRequest {
            schedule: Some(every("missing", "0 3 * * *", "x")),
            update_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // pause: no next fire times; resume: back
    let paused = c
        .pause_schedule(spb::PauseScheduleRequest {
            name: "nightly-report".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(paused.paused && paused.next_fire_times.is_empty());
    let resumed = c
        .resume_schedule(spb::ResumeScheduleRequest {
            name: "nightly-report".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert!(!resumed.paused && resumed.next_fire_times.len() == 5);
    // trigger now: a task with the schedule's name, shown as the last run
    let task = c
        .trigger_schedule(spb::TriggerScheduleRequest {
            name: "nightly-report".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(task.name, "koo.examples.report");
    assert_eq!(task.schedule, "nightly-report");
    let run = get(&mut c, "nightly-report").await.last_run.unwrap();
    assert!(run.triggered);
    assert_eq!(run.task_id, task.id);
    assert_eq!(run.state, pb::TaskState::Queued as i32);
    // list pages
    create(&mut c, every("a-first", "@daily", "x")).await;
    let page = c
        .list_schedules(spb::ListSchedulesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.schedules[0].name, "a-first");
    let rest = c
        .list_schedules(spb::ListSchedulesRequest {
            page_size: 10,
            page_token: page.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = rest.schedules.iter().map(|s| s.name.as_str()).collect();
    // the cache-cleanup default may still be on its way in
    assert!(names.ends_with(&["nightly-report"]), "{names:?}");
    // delete: gone; a default cannot be deleted (switch it off instead)
    c.delete_schedule(spb::DeleteScheduleRequest {
        name: "nightly-report".into(),
    })
    .await
    .unwrap();
    let err = c
        .delete_schedule(spb::DeleteScheduleRequest {
            name: "nightly-report".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match c
            .delete_schedule(spb::DeleteScheduleRequest {
                name: "cache-cleanup".into(),
            })
            .await
        {
            Err(e) if e.code() == Code::NotFound && tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => break e,
            Ok(_) => panic!("a default was deleted"),
        }
    };
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("KOO_SCHEDULE_CACHE_CLEANUP=off"),
        "{err:?}"
    );
}

/// Three schedulers on one Redis fire an every-second schedule for a
/// minute (of their clock): every tick has exactly one task, through one
/// scheduler's kill (its runtime dropped mid-tick, as SIGKILL drops a `koo
/// scheduler`) and another's stop along with the instance serving the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_task_per_tick_across_instances() {
    let redis = TestRedis::start().await;
    let a = instance(&redis, false).await;
    let b = instance(&redis, false).await;
    let clock = Clock::system();
    let first = Scheduler::start(&redis, &clock);
    let second = Scheduler::start(&redis, &clock);
    let killed = Scheduler::start(&redis, &clock);
    create(
        &mut schedules(&a),
        every("heartbeat", "* * * * * *", "koo.examples.tick"),
    )
    .await;
    // a minute of ticks: one scheduler is killed after 20 s, another
    // stopped (and the first instance with it) after 40 s
    steps(&clock, &b, "koo.examples.tick", 20).await;
    killed.kill();
    steps(&clock, &b, "koo.examples.tick", 20).await;
    first.stop().await;
    drop(a);
    steps(&clock, &b, "koo.examples.tick", 20).await;
    schedules(&b)
        .pause_schedule(spb::PauseScheduleRequest {
            name: "heartbeat".into(),
        })
        .await
        .unwrap();
    // A negative check: a second task for a tick (a submit still under way
    // as the pause lands) would show within this; nothing signals its absence.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(second);
    let t = ticks(&b, "koo.examples.tick").await;
    let twice: Vec<_> = t.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ticks with more than one task: {twice:?}");
    let (first, last) = (*t.keys().next().unwrap(), *t.keys().last().unwrap());
    assert_eq!(
        (last - first) / 1000 + 1,
        t.len() as i64,
        "a tick was skipped: {:?}",
        t.keys().collect::<Vec<_>>()
    );
    assert!(t.len() >= 55, "{} ticks in a minute", t.len());
}

/// Pause, resume, update and delete made through one instance take effect
/// on another (here the only one running the scheduler; the other serves the
/// API). The scheduler's clock moves a second at a time; a second schedule
/// (`witness`) shows how far the scheduler has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_take_effect_on_another_instance() {
    let redis = TestRedis::start().await;
    let api = instance(&redis, false).await;
    let runner = instance(&redis, false).await;
    let clock = Clock::system();
    let _scheduler = Scheduler::start(&redis, &clock);
    let mut c = schedules(&api);
    const WITNESS: &str = "koo.examples.witness";
    create(&mut c, every("witness", "* * * * * *", WITNESS)).await;
    create(&mut c, every("pulse", "* * * * * *", "koo.examples.pulse")).await;
    let pulse = "koo.examples.pulse";
    let before = step_until(&clock, &runner, WITNESS, pulse, |t| t.len() >= 2)
        .await
        .len();
    c.pause_schedule(spb::PauseScheduleRequest {
        name: "pulse".into(),
    })
    .await
    .unwrap();
    // the runner reloads at its next wake; a tick already on its way may land
    steps(&clock, &runner, WITNESS, 2).await;
    let paused = ticks(&runner, pulse).await.len();
    assert!(paused <= before + 2, "{before} then {paused}");
    steps(&clock, &runner, WITNESS, 3).await;
    assert_eq!(
        ticks(&runner, pulse).await.len(),
        paused,
        "fired while paused"
    );
    // resume through the other instance's API as well
    schedules(&runner)
        .resume_schedule(spb::ResumeScheduleRequest {
            name: "pulse".into(),
        })
        .await
        .unwrap();
    step_until(&clock, &runner, WITNESS, pulse, |t| t.len() >= paused + 2).await;
    // update: every other second, and another task name
    c.update_schedule(spb::UpdateScheduleRequest {
        schedule: Some(every("pulse", "*/2 * * * * *", "koo.examples.pulse2")),
        update_mask: None,
    })
    .await
    .unwrap();
    let pulse2 = "koo.examples.pulse2";
    let even = step_until(&clock, &runner, WITNESS, pulse2, |t| t.len() >= 3).await;
    assert!(
        even.keys().all(|ms| (ms / 1000) % 2 == 0),
        "{:?}",
        even.keys().collect::<Vec<_>>()
    );
    // delete: no more ticks
    c.delete_schedule(spb::DeleteScheduleRequest {
        name: "pulse".into(),
    })
    .await
    .unwrap();
    steps(&clock, &runner, WITNESS, 2).await;
    let after = ticks(&runner, pulse2).await.len();
    steps(&clock, &runner, WITNESS, 3).await;
    assert_eq!(ticks(&runner, pulse2).await.len(), after);
}

/// After downtime longer than several ticks, a `skip` schedule goes on
/// from its next tick, a `run once` schedule runs its latest missed tick
/// once (not a burst), then goes on. The downtime is five seconds of the
/// schedulers' clock, moved ahead while none runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_follow_the_policy_after_a_restart() {
    let redis = TestRedis::start().await;
    let koo = instance(&redis, false).await;
    let clock = Clock::system();
    let scheduler = Scheduler::start(&redis, &clock);
    let mut c = schedules(&koo);
    create(&mut c, every("skipper", "* * * * * *", "koo.examples.skip")).await;
    create(
        &mut c,
        spb::Schedule {
            missed_tick_policy: spb::MissedTickPolicy::RunOnce as i32,
            ..every("catcher", "* * * * * *", "koo.examples.once")
        },
    )
    .await;
    let (skip, once) = ("koo.examples.skip", "koo.examples.once");
    step_until(&clock, &koo, skip, skip, |t| t.len() >= 2).await;
    step_until(&clock, &koo, skip, once, |t| t.len() >= 2).await;
    drop(c);
    scheduler.stop().await;
    drop(koo);
    let stopped = clock.now_ms();
    clock.advance(Duration::from_secs(5));
    // ticks from here on are the new scheduler's regular ones
    let restarting = clock.now_ms();
    let koo = instance(&redis, false).await;
    let _scheduler = Scheduler::start(&redis, &clock);
    // two ticks past the restart (the first may be the catch-up itself)
    let after = |t: &BTreeMap<i64, usize>| t.keys().filter(|ms| **ms > restarting).count() >= 2;
    let skip_ticks = step_until(&clock, &koo, skip, skip, after).await;
    let once_ticks = step_until(&clock, &koo, skip, once, after).await;
    // ticks of the downtime that ran
    // (a tick due less than a second before the scheduler started is late,
    // not missed: it runs whatever the policy)
    let skipped = t_between(&skip_ticks, stopped, restarting - 1000);
    assert!(skipped.is_empty(), "skip ran missed ticks: {skipped:?}");
    // run once: the first tick after the stop is the latest missed one
    // (the scheduler's start-up, which reads its own now, may take it past
    // `restarting`), and from it on no tick is lost or repeated (a tick
    // passed less than a second before start-up was neither caught up nor
    // fired)
    let since_stop: Vec<i64> = once_ticks
        .keys()
        .copied()
        .filter(|ms| *ms > stopped)
        .collect();
    assert!(
        since_stop.len() >= 2 && since_stop[0] >= restarting - 2000,
        "not the latest missed tick: {once_ticks:?}, stopped {stopped}, restarting {restarting}"
    );
    assert!(
        since_stop.windows(2).all(|w| w[1] - w[0] == 1000),
        "a tick lost or repeated: {since_stop:?}"
    );
}

/// Ticks after the old instance stopped and before the new one started.
fn t_between(t: &BTreeMap<i64, usize>, stopped: i64, restarting: i64) -> Vec<i64> {
    t.keys()
        .copied()
        .filter(|ms| *ms > stopped && *ms < restarting)
        .collect()
}

/// Run-time edits to a default survive a restart with the same
/// configuration; a changed configuration replaces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_edits_survive_restarts_until_the_configuration_changes() {
    let redis = TestRedis::start().await;
    let start = |cron: &'static str| {
        let redis = &redis;
        async move {
            let mut settings = common::test_settings(common::redis_settings(&redis.url()));
            let koo::server::StoreSettings::Redis(r) = &settings.store else {
                unreachable!()
            };
            settings.tasks.redis = Some(r.clone());
            short_intervals(&mut settings, 0);
            short_defaults(&mut settings, [cron, "off", "off", "off"]);
            let server = TestServer::spawn(settings).await;
            let mut c = schedules(&server);
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match c
                    .get_schedule(spb::GetScheduleRequest {
                        name: "cache-cleanup".into(),
                    })
                    .await
                {
                    Ok(s) if s.get_ref().schedule.as_ref().unwrap().task.is_some() => break,
                    _ => {
                        assert!(tokio::time::Instant::now() < until);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            server
        }
    };
    let koo = start("*/10 * * * *").await;
    let mut c = schedules(&koo);
    c.update_schedule(spb::UpdateScheduleRequest {
        schedule: Some(spb::Schedule {
            name: "cache-cleanup".into(),
            cron: "*/15 * * * *".into(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["cron".into()],
        }),
    })
    .await
    .unwrap();
    c.pause_schedule(spb::PauseScheduleRequest {
        name: "cache-cleanup".into(),
    })
    .await
    .unwrap();
    drop(c);
    drop(koo);
    // same configuration: the edits stay
    let koo = start("*/10 * * * *").await;
    let s = get(&mut schedules(&koo), "cache-cleanup").await;
    assert_eq!(s.cron, "*/15 * * * *");
    assert!(s.paused);
    drop(koo);
    // the configuration changed: it wins
    let koo = start("*/20 * * * *").await;
    let mut c = schedules(&koo);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = get(&mut c, "cache-cleanup").await;
        if s.cron == "*/20 * * * *" {
            assert!(!s.paused);
            break;
        }
        assert!(tokio::time::Instant::now() < until, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis restarted empty: the scheduler notices, stores the configured
/// defaults again and goes on firing them; nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_come_back_after_redis_restarts_empty() {
    let mut redis = TestRedis::start().await;
    let mut settings = common::test_settings(common::redis_settings(&redis.url()));
    let koo::server::StoreSettings::Redis(r) = &settings.store else {
        unreachable!()
    };
    settings.tasks.redis = Some(r.clone());
    short_intervals(&mut settings, 0);
    short_defaults(&mut settings, ["off", "off", "off", "* * * * * *"]);
    let koo = TestServer::spawn(settings).await;
    wait_ticks(&koo, "koo.tasks.health_check.run", 1).await;
    redis.restart().await;
    // the default is stored again and fires again
    let mut c = schedules(&koo);
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = c
            .get_schedule(spb::GetScheduleRequest {
                name: "health-check".into(),
            })
            .await
        {
            let s = s.into_inner().schedule.unwrap();
            assert_eq!(s.source, spb::ScheduleSource::Config as i32);
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the default never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_ticks(&koo, "koo.tasks.health_check.run", 1).await;
}

/// A tick whose schedulers all died between its idempotency claim and its
/// task (here: the task removed from Redis after the only scheduler that
/// fired it stopped) is finished by the next scheduler to start: it finds
/// the recent claim without a task, takes it over and stores the tick's
/// task. Before, only the schedulers that fired a tick retried it, so the
/// tick was lost although a scheduler was alive at every moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_scheduler_finishes_ticks_left_without_a_task() {
    let redis = TestRedis::start().await;
    let first = instance(&redis, true).await;
    let mut c = schedules(&first);
    create(
        &mut c,
        every("orphan", "* * * * * *", "koo.examples.orphan"),
    )
    .await;
    wait_ticks(&first, "koo.examples.orphan", 1).await;
    drop(c);
    first.shutdown().await;

    // Pick one fired tick and make it an orphan: its claim stays, its task
    // goes (as if Redis had restarted between the two writes).
    let mut r = redis.conn().await;
    let claims: Vec<String> = redis::cmd("KEYS")
        .arg("*:v1:idem:schedule:orphan:*")
        .query_async(&mut r)
        .await
        .unwrap();
    let claim = claims.first().expect("a fired tick has a claim").clone();
    let held: String = redis::cmd("GET")
        .arg(&claim)
        .query_async(&mut r)
        .await
        .unwrap();
    let orphaned_id = held.split('|').nth(1).unwrap().to_owned();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{orphaned_id}*"))
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no keys of task {orphaned_id}");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut r)
        .await
        .unwrap();
    let zsets: Vec<String> = redis::cmd("KEYS")
        .arg("*:v1:{t:*}:*")
        .query_async(&mut r)
        .await
        .unwrap();
    for z in zsets {
        let kind: String = redis::cmd("TYPE")
            .arg(&z)
            .query_async(&mut r)
            .await
            .unwrap();
        if kind == "zset" {
            let _: () = redis::cmd("ZREM")
                .arg(&z)
                .arg(&orphaned_id)
                .query_async(&mut r)
                .await
                .unwrap();
        }
    }

    // The next scheduler takes the claim over and stores the tick's task.
    let second = instance(&redis, true).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    let new_id = loop {
        let now: Option<String> = redis::cmd("GET")
            .arg(&claim)
            .query_async(&mut r)
            .await
            .unwrap();
        if let Some(id) = now.as_deref().and_then(|v| v.split('|').nth(1))
            && id != orphaned_id
        {
            break id.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the orphaned tick {claim} was never finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let task = get_ok(&mut client(&second), &new_id).await;
    assert_eq!(task.schedule, "orphan");
    assert!(task.schedule_time.is_some(), "{task:?}");
}
