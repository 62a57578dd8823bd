//! Dead-letter retention: a task that ended FAILED or TIMED_OUT keeps its
//! task (arguments, error, attempt log) for `KOO_DEAD_LETTER_TTL`, beyond
//! `RESULT_EXPIRES`, within the cap per queue; CleanupTasks and database
//! maintenance leave it alone unless asked. Every scenario runs on both
//! stores, with a 1 s result TTL so that nothing waits an hour.

use crate::common;

use std::time::Duration;

use common::tasks::{
    Backend, Koo, client, failing, get_ok, start_on_with, submit, submit_ok, wait_task,
};
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use koo::server::Settings;
use tonic::transport::Channel;

/// Results expire after 1 s; dead letters are kept 60 s; `cap` ended tasks
/// (and as many dead letters) per queue.
fn short_results(cap: u64) -> impl FnOnce(&mut Settings) {
    move |s| {
        s.tasks.config.result_ttl = Duration::from_secs(1);
        s.tasks.config.limits.dead_ttl = Duration::from_secs(60);
        s.tasks.config.limits.history = cap;
    }
}

/// Submits a task that fails for good at its first attempt; waits for FAILED.
async fn dead_letter(c: &mut TaskServiceClient<Channel>) -> String {
    let id = submit_ok(c, failing(100, 0)).await.id;
    let t = wait_task(c, &id, |t| t.state == pb::TaskState::Failed as i32).await;
    assert_eq!(t.attempts, 1);
    id
}

/// Submits a task that succeeds; waits for SUCCEEDED.
async fn succeeded(c: &mut TaskServiceClient<Channel>) -> String {
    let id = submit_ok(c, submit("koo.diagnostics.noop", serde_json::json!({})))
        .await
        .id;
    wait_task(c, &id, |t| t.state == pb::TaskState::Succeeded as i32).await;
    id
}

/// Whether GetTask still finds the task.
async fn found(c: &mut TaskServiceClient<Channel>, id: &str) -> bool {
    match c.get_task(pb::GetTaskRequest { task_id: id.into() }).await {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => panic!("GetTask {id}: {s}"),
    }
}

/// Polls until one of `ids` is no longer found (an expiry has no event to
/// await); its index.
async fn first_gone(c: &mut TaskServiceClient<Channel>, ids: &[&str]) -> usize {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        for (i, id) in ids.iter().enumerate() {
            if !found(c, id).await {
                return i;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "none of {ids:?} expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The remaining TTL (ms) of task `id`'s hash and attempt log in Redis.
async fn pttls(koo: &Koo, id: &str) -> (i64, i64) {
    let mut conn = koo.redis().conn().await;
    let key = format!("koo:v1:{{t:{}}}:task:{id}", id.split('~').next().unwrap());
    let task: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let log: i64 = redis::cmd("PTTL")
        .arg(format!("{key}:log"))
        .query_async(&mut conn)
        .await
        .unwrap();
    (task, log)
}

/// A FAILED task is still readable, with its error and attempt log, after
/// its result TTL passed (a succeeded task of the same age is gone), its
/// keys in Redis expire with the dead-letter TTL, and RequeueDeadLetters
/// (`all`) runs it again.
async fn dead_letters_outlive_results(backend: Backend) {
    let koo = start_on_with(backend, 1, short_results(10_000)).await;
    let mut c = client(&koo.server);
    let dead = dead_letter(&mut c).await;
    let done = succeeded(&mut c).await;
    if backend == Backend::Redis {
        let (task, log) = pttls(&koo, &dead).await;
        assert!(
            task > 30_000 && log > 30_000,
            "dead letter PTTL {task}/{log}"
        );
        let (task, _) = pttls(&koo, &done).await;
        assert!((0..=1000).contains(&task), "result PTTL {task}");
    }
    assert_eq!(first_gone(&mut c, &[&done, &dead]).await, 0);
    let t = get_ok(&mut c, &dead).await;
    assert_eq!(t.state, pb::TaskState::Failed as i32);
    assert!(t.error.is_some(), "{t:?}");
    assert_eq!(t.attempt_log.len(), 1, "{t:?}");
    let requeued = c
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            task_ids: vec![],
            all: true,
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids;
    assert_eq!(requeued, vec![dead.clone()]);
    let t = wait_task(&mut c, &dead, |t| {
        t.attempts == 2 && t.state == pb::TaskState::Failed as i32
    })
    .await;
    assert_eq!(t.attempt_log.len(), 2);
}

/// With a cap of two dead letters per queue, the third failure trims the
/// oldest: that one gets the result TTL (and expires), the two kept ones
/// keep the dead-letter TTL and can be requeued by id after the result TTL.
async fn trimmed_dead_letter_expires_like_a_result(backend: Backend) {
    let koo = start_on_with(backend, 1, short_results(2)).await;
    let mut c = client(&koo.server);
    let ids = [
        dead_letter(&mut c).await,
        dead_letter(&mut c).await,
        dead_letter(&mut c).await,
    ];
    if backend == Backend::Redis {
        let mut short = 0;
        for id in &ids {
            let (task, log) = pttls(&koo, id).await;
            if task <= 1000 {
                assert!(log <= 1000, "log PTTL {log}");
                short += 1;
            } else {
                assert!(task > 30_000, "dead letter PTTL {task}");
            }
        }
        assert_eq!(short, 1, "one dead letter trimmed by the cap");
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let gone = first_gone(&mut c, &refs).await;
    let kept: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != gone)
        .map(|(_, id)| id.clone())
        .collect();
    for id in &kept {
        assert!(found(&mut c, id).await, "kept dead letter {id} is readable");
    }
    let requeued = c
        .requeue_dead_letters(pb::RequeueDeadLettersRequest {
            task_ids: kept.clone(),
            all: false,
        })
        .await
        .unwrap()
        .into_inner()
        .task_ids;
    assert_eq!(requeued, kept);
}

/// Database maintenance and CleanupTasks with `older_than` 0 remove ended
/// tasks but keep dead letters younger than the dead-letter TTL; asked to
/// (`include_dead_letters`), CleanupTasks removes them too.
async fn cleanup_keeps_dead_letters_unless_asked(backend: Backend) {
    let koo = start_on_with(backend, 1, |_| {}).await;
    let mut c = client(&koo.server);
    let dead = dead_letter(&mut c).await;
    let done = succeeded(&mut c).await;
    let maintenance = submit_ok(
        &mut c,
        pb::SubmitTaskRequest {
            category: pb::TaskCategory::Database as i32,
            ..submit(
                "koo.tasks.database.maintenance",
                serde_json::json!({ "older_than_hours": 0 }),
            )
        },
    )
    .await
    .id;
    wait_task(&mut c, &maintenance, |t| {
        t.state == pb::TaskState::Succeeded as i32
    })
    .await;
    assert!(!found(&mut c, &done).await, "maintenance removed {done}");
    assert!(found(&mut c, &dead).await, "maintenance kept {dead}");
    let kept = c
        .cleanup_tasks(pb::CleanupTasksRequest {
            older_than: Some(prost_types::Duration::default()),
            include_dead_letters: false,
            hours_old: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kept.removed_dead_letters, 0, "{kept:?}");
    assert!(found(&mut c, &dead).await, "CleanupTasks kept {dead}");
    let removed = c
        .cleanup_tasks(pb::CleanupTasksRequest {
            older_than: Some(prost_types::Duration::default()),
            include_dead_letters: true,
            hours_old: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed_dead_letters, 1, "{removed:?}");
    assert!(!found(&mut c, &dead).await, "CleanupTasks removed {dead}");
}

on_both!(
    dead_letters_outlive_results,
    trimmed_dead_letter_expires_like_a_result,
    cleanup_keeps_dead_letters_unless_asked,
);
