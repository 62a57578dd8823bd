//! Flow control's API over gRPC: rate limits and concurrency caps set,
//! read, listed and deleted (both stores), every bad field named, unknown
//! names NOT_FOUND, the roles (a reader reads, only an admin sets, audited),
//! the limits of the configuration (source CONFIG, replaced at each start,
//! a bad entry refused at start-up), and a worker's key back-off on a
//! failure (`key_retry_after`), refused without a rate-limit key before
//! anything is recorded.

use std::io::BufRead as _;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use crate::common;
use crate::common::auth::{ADMIN, KeysFile, READER, WRITER, all_roles, bearer};
use crate::common::stream::{StreamWorker, hello};

use common::tasks::{Backend, client, get_ok, start_on, start_on_with, submit_ok};
use koo::domain::flow::{ConcurrencyLimit, Limit, Policy, RateLimit, Scope, Source};
use koo::pb::tasks::v1::{self as pb, task_service_client::TaskServiceClient};
use koo::pb::worker::v1::{
    self as wpb, work_request::Message as In, worker_service_client::WorkerServiceClient,
};
use tonic::Code;
use tonic::transport::Channel;

const JOB: &str = "test.limits.job";

on_both!(limits_round_trip, bad_requests_name_their_field);

fn secs(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

fn rate(name: &str, limit: u32, period_s: i64, burst: u32) -> pb::SetRateLimitRequest {
    pb::SetRateLimitRequest {
        rate_limit: Some(pb::RateLimit {
            name: name.into(),
            limit,
            period: secs(period_s),
            burst,
            ..Default::default()
        }),
    }
}

fn cap(name: &str, max: u32, policy: pb::ConcurrencyPolicy) -> pb::SetConcurrencyLimitRequest {
    pb::SetConcurrencyLimitRequest {
        concurrency_limit: Some(pb::ConcurrencyLimit {
            name: name.into(),
            max_running: max,
            policy: policy as i32,
            ..Default::default()
        }),
    }
}

async fn rate_names(c: &mut TaskServiceClient<Channel>) -> Vec<(String, pb::LimitSource)> {
    let r = c
        .list_rate_limits(pb::ListRateLimitsRequest {})
        .await
        .unwrap();
    let limits = r.into_inner().rate_limits;
    limits
        .iter()
        .map(|l| (l.name.clone(), l.source()))
        .collect()
}

async fn cap_names(c: &mut TaskServiceClient<Channel>) -> Vec<(String, pb::LimitSource)> {
    let r = c
        .list_concurrency_limits(pb::ListConcurrencyLimitsRequest {})
        .await;
    let limits = r.unwrap().into_inner().concurrency_limits;
    limits
        .iter()
        .map(|l| (l.name.clone(), l.source()))
        .collect()
}

fn get(name: &str) -> pb::GetRateLimitRequest {
    pb::GetRateLimitRequest { name: name.into() }
}

/// Set, get, list, replace and delete, for both kinds: what is set is what
/// is read, each list holds its own kind by name, an idle bucket's next
/// token is now, and a deleted name is NOT_FOUND.
async fn limits_round_trip(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let before = SystemTime::now() - Duration::from_secs(1);
    let set = c
        .set_rate_limit(rate("keys/openai", 50, 1, 5))
        .await
        .unwrap();
    let l = set.into_inner().rate_limit.unwrap();
    assert_eq!((l.name.as_str(), l.limit, l.burst), ("keys/openai", 50, 5));
    assert_eq!(l.period, secs(1));
    assert_eq!(l.source(), pb::LimitSource::Api);
    let next = l.next_free_time.expect("next_free_time");
    assert!(
        next.seconds
            >= before
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
    );
    assert!(l.backoff_until.is_none());
    // burst 0 reads as 1
    c.set_rate_limit(rate("queues/ai_service", 100, 60, 0))
        .await
        .unwrap();
    let got = c
        .get_rate_limit(get("queues/ai_service"))
        .await
        .unwrap()
        .into_inner();
    let got = got.rate_limit.unwrap();
    assert_eq!((got.limit, got.burst, got.period), (100, 1, secs(60)));
    c.set_rate_limit(rate("tasks/test.limits.job", 5, 1, 1))
        .await
        .unwrap();

    c.set_concurrency_limit(cap("keys/tenant-1", 2, pb::ConcurrencyPolicy::CancelOldest))
        .await
        .unwrap();
    let star = c
        .set_concurrency_limit(cap("keys/*", 3, pb::ConcurrencyPolicy::Unspecified))
        .await
        .unwrap()
        .into_inner()
        .concurrency_limit
        .unwrap();
    assert_eq!(
        star.policy(),
        pb::ConcurrencyPolicy::Wait,
        "unspecified is WAIT"
    );
    let tenant = c
        .get_concurrency_limit(pb::GetConcurrencyLimitRequest {
            name: "keys/tenant-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .concurrency_limit
        .unwrap();
    assert_eq!(tenant.policy(), pb::ConcurrencyPolicy::CancelOldest);
    assert_eq!((tenant.max_running, tenant.running), (2, 0));
    assert_eq!(tenant.source(), pb::LimitSource::Api);

    let api = pb::LimitSource::Api;
    assert_eq!(
        rate_names(&mut c).await,
        [
            ("keys/openai".to_owned(), api),
            ("queues/ai_service".to_owned(), api),
            ("tasks/test.limits.job".to_owned(), api)
        ]
    );
    assert_eq!(
        cap_names(&mut c).await,
        [
            ("keys/*".to_owned(), api),
            ("keys/tenant-1".to_owned(), api)
        ]
    );

    // a set replaces
    c.set_rate_limit(rate("keys/openai", 10, 1, 1))
        .await
        .unwrap();
    let got = c
        .get_rate_limit(get("keys/openai"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rate_limit.unwrap().limit, 10);

    // delete, then NOT_FOUND both ways
    c.delete_rate_limit(pb::DeleteRateLimitRequest {
        name: "keys/openai".into(),
    })
    .await
    .unwrap();
    let e = c.get_rate_limit(get("keys/openai")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("keys/openai"), "{}", e.message());
    let e = c
        .delete_rate_limit(pb::DeleteRateLimitRequest {
            name: "keys/openai".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.delete_concurrency_limit(pb::DeleteConcurrencyLimitRequest {
        name: "keys/*".into(),
    })
    .await
    .unwrap();
    let e = c
        .get_concurrency_limit(pb::GetConcurrencyLimitRequest {
            name: "keys/*".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // a rate limit of a key is not a cap of it
    let e = c
        .delete_concurrency_limit(pb::DeleteConcurrencyLimitRequest {
            name: "keys/openai".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(cap_names(&mut c).await, [("keys/tenant-1".to_owned(), api)]);
    assert_eq!(rate_names(&mut c).await.len(), 2);
    koo.server.shutdown().await;
}

/// Asserts `r` is INVALID_ARGUMENT naming `field` first, bounded.
fn assert_names<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
    assert!(
        e.message().starts_with(&format!("{field}: ")),
        "{field}: {}",
        e.message()
    );
    assert!(e.message().len() < 1100, "{field}: unbounded");
}

/// Every field of every request, wrong, is INVALID_ARGUMENT naming it (a
/// long name quoted, bounded); nothing is stored.
async fn bad_requests_name_their_field(backend: Backend) {
    let koo = start_on(backend, 0).await;
    let mut c = client(&koo.server);
    let long = format!("keys/{}", "x".repeat(5000));
    let no_limit = pb::SetRateLimitRequest { rate_limit: None };
    assert_names(c.set_rate_limit(no_limit).await, "rate_limit");
    for name in [
        "",
        "openai",
        "users/x",
        "keys/",
        long.as_str(),
        "queues/nope",
    ] {
        assert_names(
            c.set_rate_limit(rate(name, 1, 1, 1)).await,
            "rate_limit.name",
        );
    }
    let e = c.set_rate_limit(rate("openai", 1, 1, 1)).await.unwrap_err();
    assert!(e.message().contains("\"openai\""), "{}", e.message());
    assert_names(
        c.set_rate_limit(rate("keys/k", 0, 1, 1)).await,
        "rate_limit.limit",
    );
    assert_names(
        c.set_rate_limit(rate("keys/k", 2_000_000, 86_400, 1)).await,
        "rate_limit.limit",
    );
    assert_names(
        c.set_rate_limit(rate("keys/k", 1, 1, 2_000_000)).await,
        "rate_limit.burst",
    );
    assert_names(
        c.set_rate_limit(rate("keys/k", 1, 86_401, 1)).await,
        "rate_limit.period",
    );
    assert_names(
        c.set_rate_limit(rate("keys/k", 1, -1, 1)).await,
        "rate_limit.period",
    );
    assert_names(
        c.set_rate_limit(rate("keys/k", 1, i64::MAX, 1)).await,
        "rate_limit.period",
    );
    let mut no_period = rate("keys/k", 1, 1, 1);
    no_period.rate_limit.as_mut().unwrap().period = None;
    assert_names(c.set_rate_limit(no_period).await, "rate_limit.period");
    let mut zero = rate("keys/k", 1, 0, 1);
    zero.rate_limit.as_mut().unwrap().period = Some(prost_types::Duration {
        seconds: 0,
        nanos: 1,
    });
    assert_names(c.set_rate_limit(zero).await, "rate_limit.period");

    let no_cap = pb::SetConcurrencyLimitRequest {
        concurrency_limit: None,
    };
    assert_names(c.set_concurrency_limit(no_cap).await, "concurrency_limit");
    let wait = pb::ConcurrencyPolicy::Wait;
    for name in ["", "queues/ai_service", "tasks/x", "tenant"] {
        let r = c.set_concurrency_limit(cap(name, 1, wait)).await;
        assert_names(r, "concurrency_limit.name");
    }
    let r = c.set_concurrency_limit(cap("keys/t", 0, wait)).await;
    assert_names(r, "concurrency_limit.max_running");
    let r = c
        .set_concurrency_limit(cap("keys/t", 1_000_001, wait))
        .await;
    assert_names(r, "concurrency_limit.max_running");
    let mut policy = cap("keys/t", 1, wait);
    policy.concurrency_limit.as_mut().unwrap().policy = 99;
    assert_names(
        c.set_concurrency_limit(policy).await,
        "concurrency_limit.policy",
    );

    // names of reads and deletes
    assert_names(c.get_rate_limit(get("")).await, "name");
    assert_names(c.get_rate_limit(get(&long)).await, "name");
    let r = c
        .delete_rate_limit(pb::DeleteRateLimitRequest { name: "x".into() })
        .await;
    assert_names(r, "name");
    for name in ["queues/ai_service", "tasks/x", ""] {
        let r = c
            .get_concurrency_limit(pb::GetConcurrencyLimitRequest { name: name.into() })
            .await;
        assert_names(r, "name");
        let r = c
            .delete_concurrency_limit(pb::DeleteConcurrencyLimitRequest { name: name.into() })
            .await;
        assert_names(r, "name");
    }
    // unknown but valid: NOT_FOUND
    let e = c.get_rate_limit(get("tasks/none")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(rate_names(&mut c).await.is_empty());
    assert!(cap_names(&mut c).await.is_empty());
    koo.server.shutdown().await;
}

fn configured() -> Vec<Limit> {
    vec![
        Limit::Rate(RateLimit {
            scope: Scope::Key("openai".into()),
            limit: 50,
            period: Duration::from_secs(1),
            burst: 1,
            source: Source::Config,
        }),
        Limit::Concurrency(ConcurrencyLimit {
            key: "*".into(),
            max_running: 2,
            policy: Policy::Wait,
            source: Source::Config,
        }),
    ]
}

/// The configured limits are listed with source CONFIG as soon as koo
/// serves; changed through the API they read API until the next start,
/// which sets them again; limits of other names set through the API stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_are_set_at_every_start() {
    let koo = start_on_with(Backend::Redis, 0, |s| s.tasks.flow_limits = configured()).await;
    let mut c = client(&koo.server);
    let (api, config) = (pb::LimitSource::Api, pb::LimitSource::Config);
    assert_eq!(
        rate_names(&mut c).await,
        [("keys/openai".to_owned(), config)]
    );
    assert_eq!(cap_names(&mut c).await, [("keys/*".to_owned(), config)]);
    c.set_rate_limit(rate("keys/openai", 7, 1, 1))
        .await
        .unwrap();
    c.set_rate_limit(rate("keys/other", 3, 1, 1)).await.unwrap();
    let got = c
        .get_rate_limit(get("keys/openai"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rate_limit.unwrap().source(), api);
    let Some(redis) = koo.redis else {
        unreachable!()
    };
    koo.server.shutdown().await;

    let mut settings = common::test_settings(common::redis_settings(&redis.url()));
    common::tasks::short_intervals(&mut settings, 0);
    settings.tasks.flow_limits = configured();
    let second = common::TestServer::spawn(settings).await;
    let mut c = client(&second);
    assert_eq!(
        rate_names(&mut c).await,
        [
            ("keys/openai".to_owned(), config),
            ("keys/other".to_owned(), api)
        ]
    );
    let got = c
        .get_rate_limit(get("keys/openai"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rate_limit.unwrap().limit, 50);
    second.shutdown().await;
}

/// A bad entry stops `koo serve` at start-up, naming the variable and
/// quoting the entry.
#[test]
fn a_bad_configured_limit_stops_koo() {
    let out = common::serve_refused("KOO_RATE_LIMITS", "keys/ok=5/1s,openai=50/1s");
    assert!(out.contains("\"openai=50/1s\""), "{out}");
    let out = common::serve_refused("KOO_CONCURRENCY_LIMITS", "queues/ai_service=2");
    assert!(out.contains("keys/<concurrency_key>"), "{out}");
}

/// The real binary with a keys file on Redis: the configured limits are
/// listed (source CONFIG) to a reader, who may not set one (nor may a
/// writer); an admin's set leaves one `koo::audit` line naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_read_admins_set_and_are_audited() {
    let redis = common::TestRedis::start().await;
    let keys = KeysFile::new(&all_roles());
    let mut child = common::koo_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-scheduler"])
        .args(["--worker-concurrency", "0"])
        .env("REDIS_URL", redis.url())
        .env("KOO_AUTH_FILE", keys.path())
        .env("KOO_RATE_LIMITS", "keys/openai=50/1s:burst=5")
        .env("KOO_CONCURRENCY_LIMITS", "keys/*=2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = common::ChildGuard(child);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let serving = next_line(&mut rx, "koo serving gRPC").await;
    let addr = serving
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |key| TaskServiceClient::with_interceptor(channel.clone(), bearer(Some(key)));

    let mut reader = with(READER);
    let listed = reader
        .list_rate_limits(pb::ListRateLimitsRequest {})
        .await
        .unwrap();
    let l = &listed.into_inner().rate_limits[0];
    assert_eq!((l.name.as_str(), l.limit, l.burst), ("keys/openai", 50, 5));
    assert_eq!(l.source(), pb::LimitSource::Config);
    let caps = reader
        .get_concurrency_limit(pb::GetConcurrencyLimitRequest {
            name: "keys/*".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        caps.into_inner().concurrency_limit.unwrap().source(),
        pb::LimitSource::Config
    );
    for key in [READER, WRITER] {
        let e = with(key)
            .set_rate_limit(rate("keys/x", 1, 1, 1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = with(key)
            .delete_concurrency_limit(pb::DeleteConcurrencyLimitRequest {
                name: "keys/*".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    with(ADMIN)
        .set_rate_limit(rate("keys/anthropic", 5, 1, 1))
        .await
        .unwrap();
    // the refused calls above are audited too, with their code
    let line = next_line(&mut rx, "principal=\"ci-admin\"").await;
    assert!(line.contains("koo::audit"), "{line}");
    for want in [
        "principal=\"ci-admin\"",
        "koo.tasks.v1.TaskService/SetRateLimit",
        "keys/anthropic",
        "code=\"Ok\"",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
}

/// The next line of `rx` containing `what` (bounded).
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> String {
    tokio::time::timeout(common::EVENT_TIMEOUT, async {
        loop {
            let line = rx.recv().await.expect("koo's log ended");
            if line.contains(what) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {what}"))
}

fn job(key: &str) -> pb::SubmitTaskRequest {
    pb::SubmitTaskRequest {
        name: JOB.into(),
        category: pb::TaskCategory::Research as i32,
        max_retries: Some(3),
        rate_limit_key: key.into(),
        ..Default::default()
    }
}

fn fail_task(l: &wpb::LeaseTaskResponse, key_retry_after: Option<i64>) -> wpb::FailTaskRequest {
    wpb::FailTaskRequest {
        task_id: l.task.as_ref().unwrap().id.clone(),
        lease_token: l.lease_token,
        message: "429 Too Many Requests".into(),
        retryable: true,
        lease_secret: l.lease_secret.clone(),
        key_retry_after: key_retry_after.and_then(secs),
        ..Default::default()
    }
}

async fn lease(w: &mut WorkerServiceClient<Channel>) -> wpb::LeaseTaskResponse {
    let r = w
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "limits-test".into(),
            task_names: vec![JOB.into()],
            queues: vec!["research".into()],
            wait: secs(5),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.task.is_some(), "a task leased");
    r
}

/// FailTask's key_retry_after: bad values name the field; a task without a
/// rate_limit_key is FAILED_PRECONDITION and stays RUNNING under its lease
/// (nothing recorded); with a key, the key's back-off shows on its limit
/// and the task is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_task_backs_off_the_key() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let mut w = WorkerServiceClient::new(koo.server.channel.clone());
    let plain = submit_ok(&mut c, job("")).await;
    let l = lease(&mut w).await;
    let e = w.fail_task(fail_task(&l, Some(30))).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().starts_with("key_retry_after:"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("rate_limit_key"), "{}", e.message());
    let t = get_ok(&mut c, &plain.id).await;
    assert_eq!(
        (t.state(), t.attempts),
        (pb::TaskState::Running, 1),
        "nothing recorded"
    );
    for bad in [-1, 86_401, i64::MAX] {
        let e = w.fail_task(fail_task(&l, Some(bad))).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with("key_retry_after:"),
            "{}",
            e.message()
        );
    }
    let ended = w.fail_task(fail_task(&l, None)).await.unwrap().into_inner();
    assert_eq!(
        ended.state(),
        pb::TaskState::Scheduled,
        "the usual fail: retried"
    );

    c.set_rate_limit(rate("keys/openai", 100, 1, 1))
        .await
        .unwrap();
    let keyed = submit_ok(&mut c, job("openai")).await;
    assert_eq!(keyed.rate_limit_key, "openai");
    let l = lease_id(&mut w, &keyed.id).await;
    let before = SystemTime::now();
    let ended = w
        .fail_task(fail_task(&l, Some(30)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state(), pb::TaskState::Scheduled);
    let limit = c
        .get_rate_limit(get("keys/openai"))
        .await
        .unwrap()
        .into_inner();
    let until = limit
        .rate_limit
        .unwrap()
        .backoff_until
        .expect("backoff_until");
    let ahead = until.seconds
        - before
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!((28..=31).contains(&ahead), "backoff_until {ahead} s ahead");
    koo.server.shutdown().await;
}

/// Leases until task `id` comes (the retried plain task may come first).
async fn lease_id(w: &mut WorkerServiceClient<Channel>, id: &str) -> wpb::LeaseTaskResponse {
    for _ in 0..5 {
        let l = lease(w).await;
        if l.task.as_ref().unwrap().id == id {
            return l;
        }
    }
    panic!("task {id} was not leased")
}

/// On a Work stream, a fail with key_retry_after of a held task without a
/// rate_limit_key is refused in its reply (FAILED_PRECONDITION, the field
/// named under `fail.`), and the task stays held: the same fail without
/// it then ends the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_fail_without_a_key_is_refused_and_the_task_stays_held() {
    let koo = start_on(Backend::Redis, 0).await;
    let mut c = client(&koo.server);
    let mut s = StreamWorker::open(&koo.server, hello("limits", &[JOB], &[], 1)).await;
    let task = submit_ok(&mut c, job("")).await;
    let t = s.task().await;
    let fail = |key_retry_after| {
        In::Fail(wpb::Fail {
            task_id: task.id.clone(),
            lease_token: t.lease_token,
            message: "429".into(),
            retryable: true,
            key_retry_after,
            ..Default::default()
        })
    };
    s.send(fail(secs(5))).await;
    let reply = s.reply().await;
    assert_eq!(reply.code, Code::FailedPrecondition as i32, "{reply:?}");
    assert!(
        reply.message.starts_with("fail.key_retry_after:"),
        "{}",
        reply.message
    );
    assert_eq!(
        get_ok(&mut c, &task.id).await.state(),
        pb::TaskState::Running
    );
    s.send(fail(None)).await;
    let reply = s.reply().await;
    assert_eq!(reply.code, 0, "{reply:?}");
    assert_eq!(reply.state(), pb::TaskState::Scheduled);
    koo.server.shutdown().await;
}
