//! A worker re-attaches the tasks it runs to a new stream (`hello.held`):
//! koo adopts each one whose lease is current and whose secret the worker
//! proves, and revokes the others with the reason; a worker that says it
//! re-attaches (`hello.reattach`) keeps its leases when koo stops, so that
//! neither a `kill -9` nor a SIGTERM of koo restarts the tasks it runs.

use crate::common;

use common::chaos::{KooProc, lazy_channel};
use common::stream::{StreamWorker, hello};
use common::tasks::*;
use koo::pb::tasks::v1 as pb;
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, work_response::Message as Out,
    worker_service_client::WorkerServiceClient,
};
use std::collections::HashMap;

use tonic::Code;
use tonic::transport::Channel;

on_both!(
    a_hello_adopts_what_it_proves_and_revokes_the_rest,
    adopting_fences_out_the_former_holder,
);

const NAME: &str = "test.reattach.job";

fn claim(id: &str, token: u32, secret: &str) -> wpb::HeldTask {
    wpb::HeldTask {
        task_id: id.into(),
        lease_token: token,
        lease_secret: secret.into(),
        not_started: false,
    }
}

fn reattaching(held: Vec<wpb::HeldTask>) -> wpb::Hello {
    wpb::Hello {
        held,
        reattach: true,
        ..hello("again", &[NAME], &[], 4)
    }
}

/// A fresh connection to `koo`: a worker identity of its own (without
/// keys, holdings are counted per connection).
async fn connection(koo: &Koo) -> Channel {
    Channel::from_shared(format!("http://{}", koo.server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A unary lease of one task of `name`, on a connection of its own: its
/// id, token and secret.
async fn lease(koo: &Koo, name: &str) -> (String, u32, String) {
    let r = WorkerServiceClient::new(connection(koo).await)
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "script".into(),
            task_names: vec![name.into()],
            wait: Some(millis(5000)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.task.expect("a task").id, r.lease_token, r.lease_secret)
}

fn complete(id: &str, token: u32) -> In {
    In::Complete(wpb::Complete {
        task_id: id.into(),
        lease_token: token,
        result: Some(koo_json(serde_json::json!("done"))),
        lease_secret: String::new(),
    })
}

/// Reads koo's messages until `revokes` revokes and `cancels` cancels
/// came (batched or not): the revokes' reasons by task, the cancels.
async fn notices(
    w: &mut StreamWorker,
    revokes: usize,
    cancels: usize,
) -> (HashMap<String, String>, Vec<wpb::CancelRequested>) {
    let (mut revoked, mut cancelled) = (HashMap::new(), Vec::new());
    while revoked.len() < revokes || cancelled.len() < cancels {
        let each = match w.next().await {
            Out::Batch(b) => b.responses.into_iter().filter_map(|r| r.message).collect(),
            one => vec![one],
        };
        for m in each {
            match m {
                Out::Revoked(r) => {
                    revoked.insert(r.task_id, r.reason);
                }
                Out::Cancel(x) => cancelled.push(x),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (revoked, cancelled)
}

/// Tasks leased elsewhere (here: unary leases, whose secrets the worker
/// quotes) are named in a hello: the one proved is adopted and completes
/// on the new stream without a secret, its attempt the first; a cancel
/// asked for meanwhile is passed on. A wrong secret, no secret, a stale
/// token and an unknown task are revoked right after the welcome, each
/// saying why, their leases untouched; a task the worker never started
/// and one of a name the stream does not serve go back to their queues,
/// their attempts given back, and are revoked. Adoption goes past the
/// worker's bound on held tasks (they run already). A malformed claim
/// refuses the hello.
async fn a_hello_adopts_what_it_proves_and_revokes_the_rest(backend: Backend) {
    let koo = start_on_with(backend, 0, |s| s.limits.max_held_per_worker = 1).await;
    let mut c = client(&koo.server);
    let other = "test.reattach.unserved";
    let mut leases = Vec::new();
    for name in [NAME, NAME, NAME, NAME, NAME, NAME, other, NAME] {
        submitted(&mut c, submit(name, serde_json::json!({}))).await;
        leases.push(lease(&koo, name).await);
    }
    let [
        good,
        cancelled,
        bad_secret,
        no_secret,
        stale,
        unstarted,
        unserved,
        past_bound,
    ] = <[_; 8]>::try_from(leases).unwrap();
    c.cancel_task(pb::CancelTaskRequest {
        task_id: cancelled.0.clone(),
        reason: "not needed".into(),
    })
    .await
    .unwrap();
    let unknown = unknown_task_id();
    let held = vec![
        claim(&good.0, good.1, &good.2),
        claim(&cancelled.0, cancelled.1, &cancelled.2),
        claim(&bad_secret.0, bad_secret.1, &good.2),
        claim(&no_secret.0, no_secret.1, ""),
        claim(&stale.0, stale.1 + 1, &stale.2),
        claim(&unknown, 1, &good.2),
        wpb::HeldTask {
            not_started: true,
            ..claim(&unstarted.0, unstarted.1, &unstarted.2)
        },
        claim(&unserved.0, unserved.1, &unserved.2),
        claim(&past_bound.0, past_bound.1, &past_bound.2),
    ];
    let mut w = StreamWorker::open_on(connection(&koo).await, reattaching(held)).await;
    assert!(w.welcome.adopts_held, "{:?}", w.welcome);
    let adopted: HashMap<_, _> = w
        .welcome
        .adopted
        .iter()
        .map(|a| (a.task_id.clone(), (a.lease_token, a.lease_secret.clone())))
        .collect();
    assert_eq!(adopted.len(), 3, "{adopted:?}");
    assert_eq!(adopted[&past_bound.0].0, past_bound.1 + 1);
    let (token, secret) = adopted[&good.0].clone();
    assert_eq!(
        token,
        good.1 + 1,
        "the lease is taken over under the next token"
    );
    assert_eq!(secret.len(), 22);
    assert_ne!(secret, good.2);
    assert_eq!(adopted[&cancelled.0].0, cancelled.1 + 1);
    let (revoked, cancels) = notices(&mut w, 6, 1).await;
    let said = |id: &str, what: &str| {
        let reason = &revoked[id];
        assert!(reason.starts_with("not re-attached: "), "{reason}");
        assert!(reason.contains(what), "{reason} lacks {what:?}");
    };
    said(&bad_secret.0, "not the secret of this lease");
    said(&no_secret.0, "lease_secret: required to re-attach");
    said(&stale.0, "no longer yours");
    said(&unknown, "not found");
    said(&unstarted.0, "never started it");
    said(&unserved.0, "does not serve it");
    assert_eq!(cancels.len(), 1);
    assert_eq!(
        (cancels[0].task_id.as_str(), cancels[0].reason.as_str()),
        (cancelled.0.as_str(), "not needed")
    );
    for (id, state, attempts) in [
        (&bad_secret.0, pb::TaskState::Running, 1),
        (&no_secret.0, pb::TaskState::Running, 1),
        (&unstarted.0, pb::TaskState::Queued, 0),
        (&unserved.0, pb::TaskState::Queued, 0),
    ] {
        let t = get_ok(&mut c, id).await;
        assert_eq!((t.state, t.attempts), (state as i32, attempts), "{t:?}");
    }

    // the old token is fenced out; the new one ends the same attempt
    w.send(complete(&good.0, good.1)).await;
    assert_eq!(w.reply().await.code, Code::Aborted as i32);
    w.send(complete(&good.0, token)).await;
    let reply = w.reply().await;
    assert_eq!(
        (reply.code, reply.state),
        (0, pb::TaskState::Succeeded as i32),
        "{reply:?}"
    );
    assert_eq!(get_ok(&mut c, &good.0).await.attempts, 1);

    let bad = vec![claim("not-an-id", 1, "s")];
    let err = StreamWorker::try_open(connection(&koo).await, reattaching(bad))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("hello.held[0].task_id"),
        "{err:?}"
    );
}

/// A task pushed to a stream that is still open is re-attached to another
/// (a worker whose old connection koo has not yet seen drop): the old
/// stream can no longer hand it back (what its end would do: its token is
/// fenced), and the new stream completes it in its first attempt.
async fn adopting_fences_out_the_former_holder(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let mut old =
        StreamWorker::open_on(connection(&koo).await, hello("old", &[NAME], &[], 1)).await;
    let id = submitted(&mut c, submit(NAME, serde_json::json!({}))).await;
    let pushed = old.task().await;
    let held = vec![claim(&id, pushed.lease_token, &pushed.lease_secret)];
    let mut new = StreamWorker::open_on(connection(&koo).await, reattaching(held)).await;
    let token = new.welcome.adopted[0].lease_token;
    assert_eq!(token, pushed.lease_token + 1);
    let t = get_ok(&mut c, &id).await;
    assert!(t.worker.starts_with("again/"), "{t:?}");
    old.send(In::Release(wpb::Release {
        task_id: id.clone(),
        lease_token: pushed.lease_token,
        reason: "the old stream's end".into(),
    }))
    .await;
    let refused = old.reply().await;
    assert_eq!(refused.code, Code::Aborted as i32, "{refused:?}");
    drop(old);
    new.send(complete(&id, token)).await;
    let reply = new.reply().await;
    assert_eq!(
        (reply.code, reply.state),
        (0, pb::TaskState::Succeeded as i32),
        "{reply:?}"
    );
    let t = get_ok(&mut c, &id).await;
    let log: Vec<&str> = t.attempt_log.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!((t.attempts, log), (1, vec!["succeeded"]), "{t:?}");
}

/// A store that does not answer while a hello's claims are read refuses
/// the hello (`DEADLINE_EXCEEDED`, or `UNAVAILABLE` once the breaker has
/// opened: the worker tries again, its task still running) and changes
/// nothing: once Redis answers again the task is
/// RUNNING under the same lease, and the next hello adopts it. (The
/// breaker is kept closed, so that what answers is the call's own
/// deadline, and the next calls need not wait out a cool-down.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_whose_claims_cannot_be_read_is_refused_and_changes_nothing() {
    let koo = start_on_with(Backend::Redis, 0, |s| {
        // outlasts the hello's read deadline (5 s) while Redis is stopped
        s.tasks.config.lease = std::time::Duration::from_secs(30);
        if let koo::server::StoreSettings::Redis(r) = &mut s.store {
            r.breaker_failures = u32::MAX;
        }
        if let Some(r) = &mut s.tasks.redis {
            r.breaker_failures = u32::MAX;
        }
    })
    .await;
    let mut c = client(&koo.server);
    submitted(&mut c, submit(NAME, serde_json::json!({}))).await;
    let (id, token, secret) = lease(&koo, NAME).await;
    let held = || vec![claim(&id, token, &secret)];
    koo.redis().signal("STOP");
    let refused = StreamWorker::try_open(connection(&koo).await, reattaching(held())).await;
    koo.redis().signal("CONT");
    let err = refused.err().expect("refused");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let t = get_ok(&mut c, &id).await;
    assert_eq!(
        (t.state, t.attempts),
        (pb::TaskState::Running as i32, 1),
        "{t:?}"
    );
    let w = StreamWorker::open_on(connection(&koo).await, reattaching(held())).await;
    let adopted = &w.welcome.adopted;
    assert_eq!(adopted.len(), 1, "{:?}", w.welcome);
    assert_eq!(
        (adopted[0].task_id.as_str(), adopted[0].lease_token),
        (id.as_str(), token + 1)
    );
}

/// One `koo serve` with a 10 s lease (longer than a restart) and no
/// built-in workers, on `store` (`REDIS_URL` or `KOO_DATA_DIR`).
async fn serve(store: (&str, String), dir: &std::path::Path) -> KooProc {
    serve_draining(store, "0ms", dir).await
}

/// [`serve`] with `KOO_SHUTDOWN_DRAIN` (how long a stopping koo still
/// accepts connections).
async fn serve_draining(store: (&str, String), drain: &str, dir: &std::path::Path) -> KooProc {
    let env = [
        (store.0, store.1),
        ("KOO_SHUTDOWN_DRAIN", drain.into()),
        ("KOO_WORKER_CONCURRENCY", "0".into()),
        ("KOO_TASK_LEASE", "10s".into()),
        ("KOO_SCHEDULE_CACHE_CLEANUP", "off".into()),
        ("KOO_SCHEDULE_CACHE_WARM", "off".into()),
        ("KOO_SCHEDULE_DATABASE_MAINTENANCE", "off".into()),
        ("KOO_SCHEDULE_HEALTH_CHECK", "off".into()),
        ("KOO_HTTP_LISTEN", "off".into()),
        ("KOO_LOG", "info".into()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    let mut p = KooProc::new("serve", &["serve"], Some(common::free_port()), env, dir);
    p.start().await;
    p
}

/// The next task pushed to `w`: its id, token and secret.
async fn pushed(w: &mut StreamWorker) -> (String, u32, String) {
    let a = w.task().await;
    (a.task.unwrap().id, a.lease_token, a.lease_secret)
}

/// Completes `task` on a new stream that re-attaches it: it succeeds in
/// its first attempt. The stream, for more work.
async fn reattach_and_complete(port: u16, task: &(String, u32, String)) -> StreamWorker {
    let claims = vec![claim(&task.0, task.1, &task.2)];
    let mut w = StreamWorker::open_on(lazy_channel(port), reattaching(claims)).await;
    let adopted = &w.welcome.adopted;
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].lease_token, task.1 + 1);
    let token = adopted[0].lease_token;
    w.send(complete(&task.0, token)).await;
    let reply = w.reply().await;
    assert_eq!(
        (reply.code, reply.state),
        (0, pb::TaskState::Succeeded as i32),
        "{reply:?}"
    );
    let mut c = pb::task_service_client::TaskServiceClient::new(lazy_channel(port));
    assert_eq!(get_ok(&mut c, &task.0).await.attempts, 1);
    w
}

/// SIGTERM of koo while `w` (re-attaching) holds a task and a plain
/// worker holds another: the first keeps its lease and is re-attached to
/// the restarted koo; the second was handed back, its attempt given back.
async fn a_sigterm_keeps_only_the_reattaching_workers_lease(
    koo: &mut KooProc,
    mut w: StreamWorker,
) {
    let port = koo.port.unwrap();
    let mut c = pb::task_service_client::TaskServiceClient::new(lazy_channel(port));
    let kept_id = submitted(&mut c, submit(NAME, serde_json::json!({}))).await;
    let kept = pushed(&mut w).await;
    assert_eq!(kept.0, kept_id);
    let other_name = "test.reattach.other";
    let mut plain =
        StreamWorker::open_on(lazy_channel(port), hello("plain", &[other_name], &[], 1)).await;
    let back_id = submitted(&mut c, submit(other_name, serde_json::json!({}))).await;
    assert_eq!(plain.task().await.task.unwrap().id, back_id);
    // a re-attaching worker that said it is stopping gets its task handed
    // back, as one that does not re-attach
    let drain_name = "test.reattach.draining";
    let drainer = wpb::Hello {
        reattach: true,
        ..hello("drainer", &[drain_name], &[], 1)
    };
    let mut drainer = StreamWorker::open_on(lazy_channel(port), drainer).await;
    let drained_id = submitted(&mut c, submit(drain_name, serde_json::json!({}))).await;
    assert_eq!(drainer.task().await.task.unwrap().id, drained_id);
    drainer.send(In::Draining(wpb::Draining {})).await;
    // koo reads a stream in order: the reply to a release of no task of
    // its own says the draining was read
    drainer
        .send(In::Release(wpb::Release {
            task_id: unknown_task_id(),
            lease_token: 1,
            reason: "a marker".into(),
        }))
        .await;
    assert_eq!(drainer.reply().await.code, Code::Aborted as i32);
    // (a draining stream is pushed nothing more: this one waits)
    let waits = submitted(&mut c, submit(drain_name, serde_json::json!({}))).await;
    koo.terminate().await;
    let end = w.ended().await;
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let trailer = end.metadata().get("koo-leases-kept");
    assert_eq!(trailer.map(|v| v.to_str().unwrap()), Some("1"), "{end:?}");
    koo.start().await;
    let t = get_ok(&mut c, &kept_id).await;
    assert_eq!(
        (t.state, t.attempts),
        (pb::TaskState::Running as i32, 1),
        "{t:?}"
    );
    for id in [&back_id, &drained_id, &waits] {
        let t = get_ok(&mut c, id).await;
        assert_eq!(
            (t.state, t.attempts),
            (pb::TaskState::Queued as i32, 0),
            "{t:?}"
        );
    }
    reattach_and_complete(port, &kept).await;
}

/// On Redis, a worker that re-attaches runs its tasks through a `kill -9`
/// of koo and through a SIGTERM: each completes on the next koo's stream
/// in its first attempt. A worker that does not is handed its task back at
/// the SIGTERM, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattaching_worker_keeps_its_tasks_through_koo_restarts() {
    let redis = common::TestRedis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut koo = serve(("REDIS_URL", redis.url()), dir.path()).await;
    let port = koo.port.unwrap();
    let mut c = pb::task_service_client::TaskServiceClient::new(lazy_channel(port));
    let mut w = StreamWorker::open_on(lazy_channel(port), reattaching(vec![])).await;
    let first = submitted(&mut c, submit(NAME, serde_json::json!({}))).await;
    let one = pushed(&mut w).await;
    assert_eq!(one.0, first);
    w.send(In::Started(wpb::Started {
        task_ids: vec![first.clone()],
    }))
    .await;
    koo.kill9();
    koo.start().await;
    let w = reattach_and_complete(port, &one).await;
    a_sigterm_keeps_only_the_reattaching_workers_lease(&mut koo, w).await;
}

/// The embedded store with a data directory saves a re-attaching worker's
/// task running at koo's SIGTERM (it hands the others back), and the
/// restarted koo adopts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_on_the_embedded_store_keeps_a_reattaching_workers_task() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = ("KOO_DATA_DIR", data.display().to_string());
    let mut koo = serve(data, dir.path()).await;
    let port = koo.port.unwrap();
    let w = StreamWorker::open_on(lazy_channel(port), reattaching(vec![])).await;
    a_sigterm_keeps_only_the_reattaching_workers_lease(&mut koo, w).await;
}

/// A koo that is stopping (SIGTERM, still accepting connections through
/// its drain) refuses a new `Work` stream `UNAVAILABLE`, so that a
/// re-attaching worker goes on to the next koo rather than adopt its tasks
/// into a session that ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_koo_refuses_new_streams() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let dir = tempfile::tempdir().unwrap();
    let data = (
        "KOO_DATA_DIR",
        dir.path().join("data").display().to_string(),
    );
    let koo = serve_draining(data, "30s", dir.path()).await;
    let port = koo.port.unwrap();
    let mut health = HealthClient::new(lazy_channel(port))
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    koo.signal("TERM");
    // the drain begins when koo reports NOT_SERVING
    loop {
        let status = tokio::time::timeout(common::EVENT_TIMEOUT, health.message())
            .await
            .expect("a health status")
            .unwrap()
            .expect("the watch goes on")
            .status;
        if status == ServingStatus::NotServing as i32 {
            break;
        }
    }
    let err = StreamWorker::try_open(lazy_channel(port), reattaching(vec![]))
        .await
        .err()
        .expect("refused");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("koo is stopping"), "{err:?}");
}
