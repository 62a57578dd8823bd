//! Task expiry (SubmitTaskRequest `expire_time` / `expire_after`,
//! Celery's `expires`) on both stores: a task not started by its expiry
//! ends CANCELLED ("cancelled: expired") instead of running late, by the
//! sweep in a paused queue and by the lease itself when no sweep runs; its
//! pending dependents are cancelled naming it; a task that started in time
//! is never stopped by it, and a retry past it ends CANCELLED; bad
//! expiries are refused naming the field.

use std::time::{Duration, SystemTime};

use crate::common;

use common::tasks::{
    Backend, client, get_ok, millis, start_on, start_on_with, submit, submit_ok, wait_task,
};
use koo::pb::schedule::v1 as spb;
use koo::pb::schedule::v1::schedule_service_client::ScheduleServiceClient;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1 as wpb;
use koo::pb::worker::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const JOB: &str = "test.expiry.job";
const LATER: &str = "test.expiry.later";

on_both!(
    an_expired_task_in_a_paused_queue_never_starts,
    the_lease_ends_an_expired_task_without_a_sweep,
    a_pending_dependent_of_an_expired_task_is_cancelled_naming_it,
    a_running_task_is_never_stopped_by_its_expiry,
    bad_expiries_are_refused_naming_the_field,
    a_schedule_s_fired_tasks_expire_after_their_submit,
);

// the scenarios that apply on a Redis Cluster too
crate::on_cluster_too!(a_schedule_s_fired_tasks_expire_after_their_submit,);

fn job(name: &str, category: pb::TaskCategory) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        category: category as i32,
        ..submit(name, serde_json::json!({}))
    }
}

fn expiring_after(name: &str, ms: u64) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        expire_after: Some(millis(ms)),
        ..job(name, pb::TaskCategory::Research)
    }
}

fn lease(names: &[&str], wait_ms: u64) -> wpb::LeaseTaskRequest {
    wpb::LeaseTaskRequest {
        worker_name: "expiry-test".into(),
        task_names: names.iter().map(|n| (*n).to_owned()).collect(),
        queues: vec!["research".into(), "cache".into()],
        wait: (wait_ms > 0).then(|| millis(wait_ms)),
    }
}

async fn lease_one(
    w: &mut WorkerServiceClient<Channel>,
    names: &[&str],
    wait_ms: u64,
) -> Option<(pb::Task, u32)> {
    let r = w
        .lease_task(lease(names, wait_ms))
        .await
        .unwrap()
        .into_inner();
    r.task.map(|t| (t, r.lease_token))
}

fn error_message(t: &pb::Task) -> String {
    t.error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default()
}

fn cancelled(t: &pb::Task) -> bool {
    t.state == pb::TaskState::Cancelled as i32
}

/// A task that expires in a paused queue never starts: the sweep ends it
/// CANCELLED ("cancelled: expired") soon after its expiry, as WatchTask
/// shows, counted as cancelled; one whose expiry has not passed waits and
/// runs normally once the queue resumes.
async fn an_expired_task_in_a_paused_queue_never_starts(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    c.pause_queue(pb::PauseQueueRequest {
        queue: "research".into(),
        reason: "expiry test".into(),
    })
    .await
    .unwrap();
    let short = submit_ok(&mut c, expiring_after(JOB, 300)).await;
    let long = submit_ok(&mut c, expiring_after(JOB, 60_000)).await;
    let expire = short.expire_time.expect("expire_time is shown");
    let created = short.create_time.unwrap();
    let expire_ms = expire.seconds * 1000 + i64::from(expire.nanos / 1_000_000);
    let created_ms = created.seconds * 1000 + i64::from(created.nanos / 1_000_000);
    // koo's clock at the submit; the store's stamps create_time a little later
    assert!(
        (250..=305).contains(&(expire_ms - created_ms)),
        "expires 300 ms after its submit: {created:?} {expire:?}"
    );

    let ended = wait_task(&mut c, &short.id, cancelled).await;
    assert_eq!(error_message(&ended), "cancelled: expired");
    assert_eq!(ended.attempts, 0, "it never started");
    assert!(ended.start_time.is_none(), "{ended:?}");
    let end = ended.end_time.unwrap();
    let end_ms = end.seconds * 1000 + i64::from(end.nanos / 1_000_000);
    assert!(end_ms >= expire_ms, "ended at {end_ms}, expiry {expire_ms}");
    assert_eq!(ended.expire_time, Some(expire));
    let queued = get_ok(&mut c, &long.id).await;
    assert_eq!(queued.state(), pb::TaskState::Queued);
    let metrics = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    let research = metrics
        .queues
        .iter()
        .find(|q| q.queue == "research")
        .unwrap();
    assert_eq!((research.queued, research.running), (1, 0));

    c.resume_queue(pb::ResumeQueueRequest {
        queue: "research".into(),
    })
    .await
    .unwrap();
    let (leased, token) = lease_one(&mut w, &[JOB], 5_000)
        .await
        .expect("the live one runs");
    assert_eq!(leased.id, long.id);
    w.complete_task(wpb::CompleteTaskRequest {
        task_id: long.id.clone(),
        lease_token: token,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        get_ok(&mut c, &long.id).await.state(),
        pb::TaskState::Succeeded
    );
    assert!(lease_one(&mut w, &[JOB], 0).await.is_none());
}

/// With no sweep running, the lease itself never hands out an expired
/// task: a worker waiting for another task (due after the first one's
/// expiry) gets that one, and the expired one ends CANCELLED without an
/// attempt.
async fn the_lease_ends_an_expired_task_without_a_sweep(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| {
        s.tasks.config.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let expiring = submit_ok(&mut c, expiring_after(JOB, 200)).await;
    let later = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            countdown: Some(millis(400)),
            ..job(LATER, pb::TaskCategory::Research)
        },
    )
    .await;
    // leases of LATER scan past the expiring task until LATER is due
    let (leased, _) = lease_one(&mut w, &[LATER], 10_000)
        .await
        .expect("LATER runs");
    assert_eq!(leased.id, later.id);
    assert!(
        lease_one(&mut w, &[JOB], 0).await.is_none(),
        "an expired task is never handed out"
    );
    let t = get_ok(&mut c, &expiring.id).await;
    assert_eq!(
        (t.state(), error_message(&t).as_str(), t.attempts),
        (pb::TaskState::Cancelled, "cancelled: expired", 0)
    );
}

/// A PENDING task whose dependency expired is cancelled naming it; a
/// PENDING task that itself expires while it waits ends "expired".
async fn a_pending_dependent_of_an_expired_task_is_cancelled_naming_it(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    c.pause_queue(pb::PauseQueueRequest {
        queue: "research".into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let blocker = submit_ok(&mut c, job(JOB, pb::TaskCategory::Research)).await;
    // 100 older PENDING tasks in the dependent's queue: its release must not
    // wait for the sweep's repair of pending tasks, which looks at the 100
    // oldest of a queue
    for _ in 0..100 {
        submit_ok(
            &mut c,
            pb::SubmitTaskRequest {
                depends_on: vec![blocker.id.clone()],
                ..job(JOB, pb::TaskCategory::Cache)
            },
        )
        .await;
    }
    // submitted after the fillers, so that its 300 ms cannot run out before
    // its dependent is submitted, however slow the machine
    let first = submit_ok(&mut c, expiring_after(JOB, 300)).await;
    let dependent = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![first.id.clone()],
            ..job(JOB, pb::TaskCategory::Cache)
        },
    )
    .await;
    let waits_too_long = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            depends_on: vec![blocker.id.clone()],
            expire_after: Some(millis(300)),
            ..job(JOB, pb::TaskCategory::Cache)
        },
    )
    .await;
    assert_eq!(dependent.state(), pb::TaskState::Pending);
    let t = wait_task(&mut c, &dependent.id, cancelled).await;
    assert_eq!(
        error_message(&t),
        format!("dependency {} ended CANCELLED", first.id)
    );
    let t = wait_task(&mut c, &waits_too_long.id, cancelled).await;
    assert_eq!(error_message(&t), "cancelled: expired");
    assert_eq!(
        get_ok(&mut c, &blocker.id).await.state(),
        pb::TaskState::Queued
    );
}

/// A task that started before its expiry runs to its end (a success
/// stays a success); a retry that would start after it ends CANCELLED
/// ("cancelled: expired") instead of waiting for nothing.
async fn a_running_task_is_never_stopped_by_its_expiry(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let succeeds = submit_ok(&mut c, expiring_after(JOB, 300)).await;
    let retries = submit_ok(&mut c, expiring_after(JOB, 300)).await;
    let (a, a_token) = lease_one(&mut w, &[JOB], 0).await.unwrap();
    let (b, b_token) = lease_one(&mut w, &[JOB], 0).await.unwrap();
    assert_eq!(
        (a.id.as_str(), b.id.as_str()),
        (succeeds.id.as_str(), retries.id.as_str())
    );
    // a task due after both expiries: once the sweep has queued it, they
    // have passed (an event, not a timer)
    let marker = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            countdown: Some(millis(500)),
            ..job(LATER, pb::TaskCategory::Research)
        },
    )
    .await;
    wait_task(&mut c, &marker.id, |t| t.state() == pb::TaskState::Queued).await;
    assert_eq!(get_ok(&mut c, &a.id).await.state(), pb::TaskState::Running);
    let done = w
        .complete_task(wpb::CompleteTaskRequest {
            task_id: a.id.clone(),
            lease_token: a_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), pb::TaskState::Succeeded);
    let failed = w
        .fail_task(wpb::FailTaskRequest {
            task_id: b.id.clone(),
            lease_token: b_token,
            message: "flaky".into(),
            retryable: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state(), pb::TaskState::Cancelled);
    assert_eq!(
        error_message(&get_ok(&mut c, &b.id).await),
        "cancelled: expired"
    );
    // before its expiry: a retry due before it is scheduled, one due after
    // it would wait for nothing and ends the task now
    let soon = submit_ok(&mut c, expiring_after(JOB, 60_000)).await;
    let late = submit_ok(&mut c, expiring_after(JOB, 60_000)).await;
    for (task, delay_ms, want) in [
        (&soon, 1_000, pb::TaskState::Scheduled),
        (&late, 120_000, pb::TaskState::Cancelled),
    ] {
        let (leased, token) = lease_one(&mut w, &[JOB], 0).await.unwrap();
        assert_eq!(leased.id, task.id);
        let failed = w
            .fail_task(wpb::FailTaskRequest {
                task_id: leased.id.clone(),
                lease_token: token,
                message: "rate limited".into(),
                retryable: true,
                retry_delay: Some(millis(delay_ms)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(failed.state(), want, "retry in {delay_ms} ms");
    }
    assert_eq!(
        error_message(&get_ok(&mut c, &late.id).await),
        "cancelled: expired"
    );
}

fn refused(e: tonic::Status, field: &str, detail: &str) {
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(field),
        "names {field}: {}",
        e.message()
    );
    assert!(
        e.message().contains(detail),
        "says {detail}: {}",
        e.message()
    );
    assert!(e.message().len() < 400, "{}", e.message());
}

/// An expiry in the past, one not after the countdown or ETA, both forms
/// at once, and out-of-range values are INVALID_ARGUMENT naming the field
/// (with the values); nothing is stored.
async fn bad_expiries_are_refused_naming_the_field(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let now = SystemTime::now();
    let past = prost_types::Timestamp::from(now - Duration::from_secs(60));
    let soon = prost_types::Timestamp::from(now + Duration::from_secs(5));
    let cases = [
        (
            pb::SubmitTaskRequest {
                expire_time: Some(past),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_time",
            "is in the past",
        ),
        (
            pb::SubmitTaskRequest {
                expire_after: Some(millis(1000)),
                countdown: Some(millis(2000)),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_after",
            "is not after the countdown or ETA",
        ),
        (
            pb::SubmitTaskRequest {
                expire_time: Some(soon),
                eta: Some(prost_types::Timestamp::from(now + Duration::from_secs(10))),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_time",
            "may start 20",
        ),
        (
            pb::SubmitTaskRequest {
                expire_time: Some(soon),
                expire_after: Some(millis(1000)),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_after",
            "not both",
        ),
        (
            pb::SubmitTaskRequest {
                expire_after: Some(prost_types::Duration {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_after",
            "out of range",
        ),
        (
            pb::SubmitTaskRequest {
                expire_after: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                }),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_after",
            "out of range",
        ),
        (
            pb::SubmitTaskRequest {
                expire_time: Some(prost_types::Timestamp {
                    seconds: 253_402_300_799,
                    nanos: 0,
                }),
                ..job(JOB, pb::TaskCategory::Research)
            },
            "expire_time",
            "from now",
        ),
    ];
    for (request, field, detail) in cases {
        refused(c.submit_task(request).await.unwrap_err(), field, detail);
    }
    let m = c
        .get_task_metrics(pb::GetTaskMetricsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        m.queues.iter().all(|q| q.queued == 0 && q.scheduled == 0),
        "nothing stored: {m:?}"
    );
}

fn ms_of(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos / 1_000_000)
}

/// A schedule's `expire_after` (Celery beat's `expires`) is kept and shown,
/// and each task it fires expires that long after its submit: one no
/// worker serves ends CANCELLED ("cancelled: expired").
async fn a_schedule_s_fired_tasks_expire_after_their_submit(backend: Backend) {
    const FIRED: &str = "test.expiry.fired";
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut events = c
        .watch_tasks(pb::WatchTasksRequest {
            name: FIRED.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut s = ScheduleServiceClient::new(koo.server.channel.clone());
    let schedule = spb::Schedule {
        name: "expiring".into(),
        cron: "* * * * * *".into(),
        task: Some(spb::TaskTemplate {
            name: FIRED.into(),
            category: pb::TaskCategory::Research as i32,
            expire_after: Some(millis(300)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let created = s
        .create_schedule(spb::CreateScheduleRequest {
            schedule: Some(schedule),
            paused: false,
        })
        .await
        .unwrap()
        .into_inner()
        .schedule
        .unwrap();
    assert_eq!(created.task.unwrap().expire_after, Some(millis(300)));
    let first = tokio::time::timeout(common::EVENT_TIMEOUT, events.message())
        .await
        .expect("a tick fires")
        .unwrap()
        .unwrap();
    s.pause_schedule(spb::PauseScheduleRequest {
        name: "expiring".into(),
    })
    .await
    .unwrap();
    let t = wait_task(&mut c, &first.task_id, cancelled).await;
    assert_eq!(error_message(&t), "cancelled: expired");
    let after = ms_of(t.expire_time.as_ref().unwrap()) - ms_of(t.create_time.as_ref().unwrap());
    // koo's clock at the submit; the store's stamps create_time a little later
    assert!(
        (250..=305).contains(&after),
        "expires {after} ms after its submit"
    );
    assert_eq!(t.schedule, "expiring");
}
