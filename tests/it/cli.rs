//! The client commands (`koo cache|task|cron|queue|limit|ps|top`) as real processes:
//! the built `koo` binary run against a `koo serve` the test starts (the
//! embedded store, built-in workers), its exit codes, tables and `--json`
//! output (parsed with serde_json); bad input, an unreachable target, auth;
//! `koo top` in a real pseudo-terminal (tmux).

use crate::common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::auth::{KeysFile, READER, all_roles};
use common::{ChildGuard as Guard, EVENT_TIMEOUT, free_port, koo_command, logged_addr};

/// `koo serve` (embedded store) on an ephemeral port: the process and its
/// gRPC address (its log is drained to the end: koo writes audit lines on
/// admin calls).
fn serve(env: &[(&str, &str)]) -> (Guard, String) {
    let env: Vec<(&str, &str)> = [("KOO_LOG", "info")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let (served, lines) = common::serve_logged(&env);
    let addr = logged_addr(&lines, "koo serving gRPC")
        .unwrap_or_else(|| panic!("koo serve did not start: {lines:#?}"));
    (served, addr)
}

/// What a client command did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        &self.stdout
    }

    /// stdout's lines as JSON values.
    fn json_lines(&self) -> Vec<serde_json::Value> {
        self.ok()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    /// stdout as one JSON value.
    fn json(&self) -> serde_json::Value {
        let mut all = self.json_lines();
        assert_eq!(all.len(), 1, "{}", self.stdout);
        all.remove(0)
    }
}

/// Runs `koo ARGS` against `target` (stdout is a pipe, not a terminal).
fn koo_at(target: &str, env: &[(&str, &str)], args: &[&str]) -> Run {
    let out: Output = koo_command()
        .env("KOO_TARGET", target)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run koo");
    Run {
        code: out.status.code().expect("exited, not signalled"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Cache commands: set, get (text and JSON), keys, del, clear, stats; a
/// missing key exits 1; bad JSON and an unknown level exit 2 naming the
/// argument.
#[test]
fn cache_commands() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    assert!(
        koo(&[
            "cache",
            "set",
            "user:1",
            r#"{"name":"ada"}"#,
            "--ttl",
            "60s"
        ])
        .ok()
        .starts_with("stored")
    );
    koo(&[
        "cache",
        "set",
        "user:2",
        "plain words",
        "--text",
        "--level",
        "session",
    ])
    .ok();
    assert_eq!(
        koo(&["cache", "get", "user:1"]).ok().trim(),
        r#"{"name":"ada"}"#
    );
    assert_eq!(
        koo(&["cache", "get", "user:2", "--level", "session"])
            .ok()
            .trim(),
        "plain words"
    );
    let got = koo(&["cache", "get", "user:1", "--json"]).json();
    assert_eq!(got["found"], true);
    assert_eq!(got["value"]["json"]["name"], "ada");
    assert!(got["ttl"].as_str().unwrap().ends_with('s'), "{got}");
    koo(&["cache", "set", "user:3", "3"]).ok();
    let keys: Vec<String> = koo(&["cache", "keys", "user:*"])
        .ok()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(keys.contains(&"user:1".to_owned()) && keys.contains(&"user:3".to_owned()));
    // a listing cut by its limit says so on stderr; a whole one does not
    let cut = koo(&["cache", "keys", "user:*", "--limit", "1"]);
    assert_eq!(cut.ok().lines().count(), 1);
    assert!(cut.stderr.contains("--limit"), "{}", cut.stderr);
    assert!(!koo(&["cache", "keys", "user:*"]).stderr.contains("--limit"));
    assert_eq!(
        koo(&["cache", "del", "user:1", "nope"]).ok().trim(),
        "deleted 1"
    );
    let missing = koo(&["cache", "get", "user:1"]);
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("not found"), "{}", missing.stderr);
    let stats = koo(&["cache", "stats", "--json"]).json();
    assert!(
        stats["metrics"]["total"]["hits"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            >= 3,
        "{stats}"
    );
    assert!(
        koo(&["cache", "stats"])
            .ok()
            .lines()
            .any(|l| l.starts_with("session"))
    );
    assert_eq!(
        koo(&["cache", "clear", "--level", "app", "--json"]).json()["deletedCount"],
        "1"
    );
    assert_eq!(
        koo(&["cache", "keys", "--json"]).json()["keys"],
        serde_json::Value::Null
    );

    let bad = koo(&["cache", "set", "k", "{nope"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("VALUE") && bad.stderr.contains("not JSON"),
        "{}",
        bad.stderr
    );
    let bad = koo(&["cache", "get", "k", "--level", "galaxy"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--level"), "{}", bad.stderr);
    let bad = koo(&["cache", "clear"]);
    assert_eq!(bad.code, 2, "clear needs its level named");
}

/// `koo cache get-or-compute`: a miss runs the task (the built-in echo)
/// once and prints its result, which is then cached; a bad `--arg` exits 2
/// naming it.
#[test]
fn cache_get_or_compute() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let compute = [
        "cache",
        "get-or-compute",
        "stats:today",
        "--task",
        "koo.diagnostics.echo",
        "--kwargs",
        r#"{"result":{"visits":7}}"#,
        "--ttl",
        "60s",
    ];
    assert_eq!(koo(&compute).ok().trim(), r#"{"visits":7}"#);
    assert_eq!(
        koo(&["cache", "get", "stats:today"]).ok().trim(),
        r#"{"visits":7}"#
    );
    let again = koo(&[&compute[..], &["--json"]].concat()).json();
    assert_eq!(again["computed"], serde_json::Value::Null, "{again}");
    let bad = koo(&[
        "cache",
        "get-or-compute",
        "k",
        "--task",
        "t",
        "--arg",
        "{nope",
    ]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--arg"), "{}", bad.stderr);
}

/// Task commands: submit --wait (exit 0 on success, 1 on failure), get,
/// ls, history, dead, requeue, watch, cancel, retry; bad kwargs exit 2.
#[test]
fn task_commands() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let ok = koo(&[
        "task",
        "submit",
        "koo.diagnostics.sleep",
        "--category",
        "research",
        "--kwargs",
        r#"{"seconds":1.2,"steps":3}"#,
        "--wait",
    ]);
    let out = ok.ok();
    let id = out.lines().next().unwrap().trim().to_owned();
    // no terminal: the id, then a line per change, the last one the end
    assert!(out.lines().any(|l| l.contains("step 1 of 3")), "{out}");
    assert!(
        out.lines().last().unwrap().contains("succeeded 100%"),
        "{out}"
    );
    let task = koo(&["task", "get", &id, "--json"]).json();
    assert_eq!(task["state"], "TASK_STATE_SUCCEEDED");
    assert_eq!(task["result"]["slept_seconds"], 1.2);
    assert!(
        koo(&["task", "get", &id])
            .ok()
            .contains("state:    succeeded")
    );

    let failed = koo(&[
        "task",
        "submit",
        "koo.diagnostics.fail_times",
        "--category",
        "research",
        "--kwargs",
        r#"{"failures":1}"#,
        "--max-retries",
        "0",
        "--wait",
        "--json",
    ]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let events: Vec<serde_json::Value> = failed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // every line is a Task, the submit's own included
    let failed_id = events[0]["id"].as_str().unwrap().to_owned();
    assert!(
        events.iter().all(|e| e["id"] == failed_id.as_str()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["state"], "TASK_STATE_FAILED");
    let history = koo(&["task", "history", "--state", "failed", "--json"]).json_lines();
    assert!(
        history.iter().any(|t| t["id"] == failed_id.as_str()),
        "{history:?}"
    );
    assert!(koo(&["task", "dead"]).ok().contains(&failed_id));
    assert!(
        koo(&["task", "history"])
            .ok()
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("succeeded"))
    );
    assert_eq!(koo(&["task", "requeue", &failed_id]).ok().trim(), failed_id);
    // its second attempt succeeds
    assert_eq!(koo(&["task", "watch", &failed_id]).code, 0);

    let later = koo(&[
        "task",
        "submit",
        "koo.diagnostics.noop",
        "--category",
        "database",
        "--countdown",
        "1h",
    ]);
    let later_id = later.ok().trim().to_owned();
    // categories by koo's own names (also the queues')
    let none = koo(&["task", "ls", "--category", "pdf_processing", "--json"]);
    assert_eq!(none.ok(), "");
    let listed = koo(&["task", "ls", "--queue", "database", "--json"]).json_lines();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "TASK_STATE_SCHEDULED");
    assert!(
        koo(&["task", "ls"])
            .ok()
            .lines()
            .any(|l| l.starts_with(&later_id) && l.contains("scheduled"))
    );
    assert_eq!(
        koo(&["task", "cancel", &later_id]).ok().trim(),
        format!("{later_id} cancelled")
    );
    assert_eq!(
        koo(&["task", "watch", &later_id]).code,
        1,
        "a cancelled task exits 1"
    );
    let retried = koo(&["task", "retry", &later_id, "--json"]).json();
    assert_ne!(retried["state"], "TASK_STATE_CANCELLED", "{retried}");

    let bad = koo(&[
        "task",
        "submit",
        "x",
        "--category",
        "research",
        "--kwargs",
        "[1]",
    ]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("--kwargs") && bad.stderr.contains("object"),
        "{}",
        bad.stderr
    );
    let bad = koo(&["task", "submit", "x"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--category"), "{}", bad.stderr);
    let gone = koo(&["task", "get", &common::tasks::unknown_task_id()]);
    assert_eq!(gone.code, 3);
    assert!(gone.stderr.contains("NOT_FOUND"), "{}", gone.stderr);
}

/// Schedules: create, ls, get, pause, resume, trigger (its task runs), rm.
#[test]
fn cron_commands() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let created = koo(&[
        "cron",
        "create",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--task",
        "koo.diagnostics.echo",
        "--category",
        "research",
        "--kwargs",
        r#"{"result":"hi"}"#,
        "--json",
    ])
    .json();
    assert_eq!(created["name"], "nightly");
    assert_eq!(created["task"]["kwargs"]["result"], "hi");
    assert!(
        koo(&["cron", "ls"])
            .ok()
            .lines()
            .any(|l| l.starts_with("nightly") && l.contains("active"))
    );
    assert_eq!(
        koo(&["cron", "pause", "nightly", "--json"]).json()["paused"],
        true
    );
    assert!(
        koo(&["cron", "get", "nightly"])
            .ok()
            .contains("paused:    true")
    );
    assert_eq!(
        koo(&["cron", "resume", "nightly", "--json"]).json()["paused"],
        serde_json::Value::Null
    );
    let task_id = koo(&["cron", "trigger", "nightly"]).ok().trim().to_owned();
    let watched = koo(&["task", "watch", &task_id, "--json"]).json_lines();
    assert_eq!(watched.last().unwrap()["result"], "hi");
    let listed = koo(&["cron", "ls", "--json"]).json_lines();
    assert!(listed.iter().any(|s| s["name"] == "nightly"), "{listed:?}");
    // the trigger's run says so, with its task and end (it has no tick)
    let shown = koo(&["cron", "get", "nightly"]);
    let shown = shown.ok();
    let last = shown
        .lines()
        .find(|l| l.starts_with("last run"))
        .unwrap_or("");
    assert!(
        last.contains("succeeded (triggered)")
            && last.contains(&task_id)
            && last.contains("ended "),
        "{shown}"
    );
    // --paused creates it paused (it fires nothing until resumed)
    let paused = koo(&[
        "cron",
        "create",
        "held",
        "--cron",
        "* * * * *",
        "--task",
        "koo.diagnostics.noop",
        "--category",
        "research",
        "--paused",
        "--json",
    ])
    .json();
    assert_eq!(paused["paused"], true, "{paused}");
    assert!(
        koo(&["cron", "get", "held"])
            .ok()
            .contains("paused:    true")
    );
    koo(&["cron", "rm", "nightly"]).ok();
    let gone = koo(&["cron", "get", "nightly"]);
    assert_eq!(gone.code, 3);
    assert!(gone.stderr.contains("NOT_FOUND"), "{}", gone.stderr);
}

/// `task submit --expires`: a duration (the task, held in a paused queue,
/// ends CANCELLED "expired" and `task watch` exits 1) or an RFC 3339 time
/// (shown by `task get`); a malformed value exits 2 naming the flag, an
/// expiry before the countdown exits 3 naming the field.
#[test]
fn task_expiry_commands() {
    let (_koo, addr) = serve(&[("KOO_TASK_SWEEP_INTERVAL", "100ms")]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    koo(&["queue", "pause", "research"]).ok();
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "task",
            "submit",
            "koo.diagnostics.noop",
            "--category",
            "research",
        ];
        args.extend_from_slice(extra);
        koo(&args)
    };
    let stale = submit(&["--expires", "300ms"]).ok().trim().to_owned();
    let watched = koo(&["task", "watch", &stale, "--json"]);
    assert_eq!(watched.code, 1, "{}{}", watched.stdout, watched.stderr);
    let last = watched
        .stdout
        .lines()
        .last()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    assert_eq!(last["state"], "TASK_STATE_CANCELLED", "{last}");
    let task = koo(&["task", "get", &stale, "--json"]).json();
    assert_eq!(task["error"]["message"], "cancelled: expired", "{task}");

    // a day ahead, in whole seconds, given with an offset
    let at = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 86_400, 0).unwrap();
    let offset = chrono::FixedOffset::east_opt(3600).unwrap();
    let given = at
        .with_timezone(&offset)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    let utc = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let fresh = submit(&["--expires", &given]).ok().trim().to_owned();
    let task = koo(&["task", "get", &fresh, "--json"]).json();
    let shown = task.get("expireTime").or_else(|| task.get("expire_time"));
    assert_eq!(shown.and_then(|v| v.as_str()), Some(utc.as_str()), "{task}");
    assert!(
        koo(&["task", "get", &fresh])
            .ok()
            .lines()
            .any(|l| l.starts_with("expires:") && l.contains(&utc[..10])),
        "task get shows the expiry"
    );

    let bad = submit(&["--expires", "soon"]);
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("--expires") && bad.stderr.contains("RFC 3339"),
        "{}",
        bad.stderr
    );
    let never = submit(&["--expires", "1s", "--countdown", "1m"]);
    assert_eq!(never.code, 3, "{}", never.stderr);
    assert!(
        never.stderr.contains("INVALID_ARGUMENT") && never.stderr.contains("expire_after"),
        "{}",
        never.stderr
    );
}

/// Queues: pause (a task submitted then stays queued), ls shows who and
/// why, resume (the task runs); an unknown queue exits 3 naming the field.
#[test]
fn queue_commands() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let paused = koo(&[
        "queue", "pause", "research", "--reason", "upgrade", "--json",
    ])
    .json();
    assert_eq!(paused["state"], "QUEUE_STATE_PAUSED");
    assert_eq!(paused["pause"]["reason"], "upgrade");
    let task_id = koo(&[
        "task",
        "submit",
        "koo.diagnostics.noop",
        "--category",
        "research",
    ])
    .ok()
    .trim()
    .to_owned();
    let listed = koo(&["queue", "ls"]);
    let row = listed
        .ok()
        .lines()
        .find(|l| l.starts_with("research"))
        .unwrap_or_default();
    assert!(
        row.contains("paused") && row.contains("upgrade"),
        "{}",
        listed.stdout
    );
    let metrics = koo(&["queue", "ls", "--json"]).json_lines();
    let research = metrics.iter().find(|q| q["name"] == "research").unwrap();
    assert_eq!(research["metrics"]["queued"], "1", "{research}");
    koo(&["queue", "resume", "research"]).ok();
    let watched = koo(&["task", "watch", &task_id, "--json"]).json_lines();
    assert_eq!(watched.last().unwrap()["state"], "TASK_STATE_SUCCEEDED");
    let unknown = koo(&["queue", "pause", "nope"]);
    assert_eq!(unknown.code, 3);
    assert!(
        unknown.stderr.contains("queue: unknown queue \"nope\""),
        "{}",
        unknown.stderr
    );
}

/// `koo ps` lists the built-in workers; an unreachable target exits 3
/// naming it; with auth on, the key is needed.
#[test]
fn ps_unreachable_and_auth() {
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, addr) = serve(&[
        ("KOO_AUTH_FILE", path.to_str().unwrap()),
        ("KOO_WORKER_CONCURRENCY", "2"),
    ]);
    let denied = koo_at(&addr, &[], &["ps"]);
    assert_eq!(denied.code, 3);
    assert!(
        denied.stderr.contains("UNAUTHENTICATED"),
        "{}",
        denied.stderr
    );
    let workers = koo_at(&addr, &[("KOO_API_KEY", READER)], &["ps", "--json"]).json_lines();
    assert!(!workers.is_empty());
    assert!(
        workers.iter().all(|w| w["kind"] == "WORKER_KIND_BUILTIN"),
        "{workers:?}"
    );
    let table = koo_at(&addr, &[], &["ps", "--api-key", READER]);
    assert!(
        table.ok().lines().nth(1).unwrap().contains("builtin"),
        "{}",
        table.stdout
    );

    let nowhere = format!("127.0.0.1:{}", free_port());
    let down = koo_at(&nowhere, &[], &["cache", "stats", "--timeout", "2s"]);
    assert_eq!(down.code, 3);
    assert!(
        down.stderr
            .contains(&format!("cannot reach koo at {nowhere}")),
        "{}",
        down.stderr
    );
    assert_eq!(down.stderr.lines().count(), 1, "{}", down.stderr);

    // a zero timeout is a usage error, not a call cancelled before it is sent
    let zero = koo_at(&addr, &[], &["cache", "stats", "--timeout", "0s"]);
    assert_eq!(zero.code, 2, "{}", zero.stderr);
    assert!(zero.stderr.contains("above zero"), "{}", zero.stderr);

    // a listener that accepts and never speaks HTTP/2 (a hung proxy): a
    // stream's opening is bounded by --timeout too, and the deadline is
    // called one
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap().to_string();
    for args in [
        &["cache", "watch", "--timeout", "1s"][..],
        &["cache", "stats", "--timeout", "1s"][..],
    ] {
        let mut child = koo_command()
            .env("KOO_TARGET", &mute_addr)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + EVENT_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("koo {args:?} still waits on a mute listener");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut said = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
        assert_eq!(status.code(), Some(3), "{args:?}: {said}");
        assert!(said.contains("DEADLINE_EXCEEDED"), "{args:?}: {said}");
    }
}

/// A tmux server of its own (its socket named after the test), killed when
/// the test ends.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.0, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux (scripts/test installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// Polls the screen until `check` accepts it.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(Instant::now() < deadline, "{what}; the screen:\n{screen}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The SCHEDULED column of `queue`'s row on `koo top`'s screen.
fn scheduled(screen: &str, queue: &str) -> Option<i64> {
    let screen = screen.replace('│', " ");
    let row = screen
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == queue))?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    let at = cells.iter().position(|c| *c == queue)?;
    cells.get(at + 3)?.parse().ok()
}

/// `koo top` in a 120x40 pseudo-terminal: the queues appear, a task
/// submitted for later shows in its queue's SCHEDULED column, `q` quits.
#[test]
fn top_in_a_terminal() {
    let (_koo, addr) = serve(&[]);
    let tmux = Tmux(format!("koo-cli-test-{}", std::process::id()));
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        env!("CARGO_BIN_EXE_koo"),
        "top",
        "--target",
        &addr,
        "--interval",
        "200ms",
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    let screen = tmux.wait_for("the queues", |s| {
        [
            "QUEUE",
            "research",
            "pdf_processing",
            "health_check",
            "workers",
        ]
        .iter()
        .all(|w| s.contains(w))
    });
    assert_eq!(scheduled(&screen, "research"), Some(0), "{screen}");
    koo_at(
        &addr,
        &[],
        &[
            "task",
            "submit",
            "koo.diagnostics.noop",
            "--category",
            "research",
            "--countdown",
            "1h",
        ],
    )
    .ok();
    tmux.wait_for("the scheduled task", |s| {
        scheduled(s, "research") == Some(1)
    });
    let quit = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(quit.status.success());
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while tmux.run(&["has-session", "-t", "top"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "koo top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// TLS and mTLS: `https://` with `--tls-ca` and a client certificate
/// (`--tls-cert`, `--tls-key`) reaches a koo that requires one; without
/// the certificate, or in plaintext, it cannot (exit 3).
#[test]
fn tls_and_client_certificates() {
    use common::certs::{Ca, CertDir};
    let dir = CertDir::new();
    let ca = Ca::new("cli-test-ca");
    let (cert, key) = dir.write_pair("server", &ca.server("localhost"));
    let (client_cert, client_key) = dir.write_pair("client", &ca.client("spiffe://koo.test/cli"));
    let ca_path = dir.write("ca.crt", &ca.cert);
    let (_koo, addr) = serve(&[
        ("KOO_TLS_CERT", cert.to_str().unwrap()),
        ("KOO_TLS_KEY", key.to_str().unwrap()),
        ("KOO_TLS_CLIENT_CA", ca_path.to_str().unwrap()),
    ]);
    let https = format!("https://{addr}");
    let tls = [
        "--tls-ca",
        ca_path.to_str().unwrap(),
        "--tls-cert",
        client_cert.to_str().unwrap(),
        "--tls-key",
        client_key.to_str().unwrap(),
    ];
    let with_cert: Vec<&str> = ["ps", "--json"].into_iter().chain(tls).collect();
    assert!(!koo_at(&https, &[], &with_cert).json_lines().is_empty());
    // the same through the variables, and --tls instead of https://
    let env = [
        ("KOO_CLIENT_TLS_CA", ca_path.to_str().unwrap()),
        ("KOO_CLIENT_TLS_CERT", client_cert.to_str().unwrap()),
        ("KOO_CLIENT_TLS_KEY", client_key.to_str().unwrap()),
    ];
    koo_at(&addr, &env, &["cache", "stats", "--tls"]).ok();

    let no_cert = koo_at(&https, &[], &["ps", "--tls-ca", ca_path.to_str().unwrap()]);
    assert_eq!(no_cert.code, 3, "{}", no_cert.stderr);
    // says why, not only "transport error" (the server's TLS alert, or
    // the connection it closed, depending on when the client notices)
    assert!(
        no_cert.stderr.contains("CertificateRequired")
            || no_cert.stderr.contains("give --tls-cert and --tls-key"),
        "{}",
        no_cert.stderr
    );
    let plain = koo_at(&addr, &[], &["ps", "--timeout", "2s"]);
    assert_eq!(plain.code, 3, "{}", plain.stderr);
    assert!(
        plain.stderr.contains("if it serves TLS"),
        "{}",
        plain.stderr
    );
    let half = koo_at(
        &https,
        &[],
        &["ps", "--tls-cert", client_cert.to_str().unwrap()],
    );
    assert_eq!(half.code, 2, "{}", half.stderr);
    assert!(half.stderr.contains("--tls-key"), "{}", half.stderr);
}

/// `koo cache get` of a raw value whose reader goes away after one byte
/// (`| head -c1`) ends quietly with exit 0, as text output does.
#[test]
fn a_closed_pipe_ends_a_raw_get_quietly() {
    use koo::pb::cache::v1::{self as cpb, cache_service_client::CacheServiceClient};
    use std::io::Read as _;
    let (_koo, addr) = serve(&[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut cache = CacheServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        // far more than a pipe's buffer, so that the write meets the closed pipe
        let value = cpb::CacheValue {
            kind: Some(cpb::cache_value::Kind::Raw(vec![b'x'; 1 << 20].into())),
        };
        cache
            .set(cpb::SetRequest {
                level: cpb::CacheLevel::App as i32,
                key: "big".into(),
                value: Some(value),
                ttl: None,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let mut child = koo_command()
        .env("KOO_TARGET", &addr)
        .args(["cache", "get", "big"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run koo cache get");
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"x");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}

/// Debounced submits: `--debounce-key` with `--debounce-window`; a second
/// submit inside the window names the same task (deduplicated) and the
/// task runs once with its arguments; a key without a window exits 2.
#[test]
fn debounced_submits() {
    let (_koo, addr) = serve(&[]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let submit = |result: u32| {
        koo(&[
            "task",
            "submit",
            "koo.diagnostics.echo",
            "--category",
            "research",
            "--kwargs",
            &format!(r#"{{"result":{result}}}"#),
            "--debounce-key",
            "doc-7",
            "--debounce-window",
            "1s",
            "--json",
        ])
        .json()
    };
    let first = submit(1);
    let second = submit(2);
    let id = first["task"]["id"].as_str().unwrap().to_owned();
    assert_eq!(second["task"]["id"], id.as_str(), "{second}");
    assert_eq!(second["deduplicated"], true, "{second}");
    assert_eq!(second["task"]["debounceKey"], "doc-7", "{second}");
    assert_eq!(koo(&["task", "watch", &id]).code, 0);
    let task = koo(&["task", "get", &id, "--json"]).json();
    assert_eq!(task["result"], 2.0, "{task}");
    assert_eq!(task["attempts"], 1, "{task}");
    let bad = koo(&[
        "task",
        "submit",
        "x",
        "--category",
        "research",
        "--debounce-key",
        "k",
    ]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("--debounce-window"), "{}", bad.stderr);
}

/// Limits (`koo limit`), on Redis: set-rate and set-concurrency print the
/// limit as stored, ls lists both kinds (the configured cap with source
/// config), get of a key shows its rate limit and its cap, rm removes
/// both, and then get is NOT_FOUND; a bad name exits 3 naming the field;
/// `koo task submit --rate-limit-key --concurrency-key` stores both keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_commands() {
    let redis = common::TestRedis::start().await;
    let url = redis.url();
    let (_koo, addr) = serve(&[("REDIS_URL", &url), ("KOO_CONCURRENCY_LIMITS", "keys/*=4")]);
    let koo = |args: &[&str]| koo_at(&addr, &[], args);
    let set = koo(&[
        "limit",
        "set-rate",
        "keys/openai",
        "--limit",
        "50",
        "--per",
        "1s",
        "--burst",
        "5",
        "--json",
    ])
    .json();
    assert_eq!(set["name"], "keys/openai", "{set}");
    assert_eq!(
        (set["limit"].clone(), set["burst"].clone()),
        (50.into(), 5.into()),
        "{set}"
    );
    assert_eq!(set["period"], "1s", "{set}");
    assert_eq!(set["source"], "LIMIT_SOURCE_API", "{set}");
    let cap = koo(&[
        "limit",
        "set-concurrency",
        "keys/openai",
        "--max",
        "2",
        "--policy",
        "cancel-oldest",
        "--json",
    ])
    .json();
    assert_eq!(cap["policy"], "CONCURRENCY_POLICY_CANCEL_OLDEST", "{cap}");
    let listed = koo(&["limit", "ls"]);
    let rows: Vec<&str> = listed.ok().lines().collect();
    assert!(rows[0].starts_with("NAME"), "{}", listed.stdout);
    assert!(
        rows.iter().any(|r| r.starts_with("keys/openai")
            && r.contains("rate")
            && r.contains("50/1s burst 5")),
        "{}",
        listed.stdout
    );
    assert!(
        rows.iter()
            .any(|r| r.starts_with("keys/*") && r.contains("concurrency") && r.contains("config")),
        "{}",
        listed.stdout
    );
    let both = koo(&["limit", "get", "keys/openai", "--json"]).json_lines();
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[1]["maxRunning"], 2, "{both:?}");
    let only = koo(&["limit", "get", "keys/openai", "--concurrency", "--json"]).json_lines();
    assert_eq!(only.len(), 1, "{only:?}");
    let removed = koo(&["limit", "rm", "keys/openai"]);
    assert!(
        removed.ok().contains("rate limit and concurrency limit"),
        "{}",
        removed.stdout
    );
    let gone = koo(&["limit", "get", "keys/openai"]);
    assert_ne!(gone.code, 0);
    assert!(gone.stderr.contains("NOT_FOUND"), "{}", gone.stderr);
    assert!(
        gone.stderr
            .contains("no rate limit and no concurrency limit"),
        "{}",
        gone.stderr
    );
    let bad = koo(&["limit", "set-rate", "openai", "--limit", "5", "--per", "1s"]);
    assert_eq!(bad.code, 3, "{}", bad.stderr);
    assert!(bad.stderr.contains("rate_limit.name"), "{}", bad.stderr);

    let submitted = koo(&[
        "task",
        "submit",
        "koo.diagnostics.noop",
        "--category",
        "research",
        "--rate-limit-key",
        "openai",
        "--concurrency-key",
        "tenant-1",
        "--json",
    ])
    .json();
    assert_eq!(submitted["task"]["rateLimitKey"], "openai", "{submitted}");
    assert_eq!(
        submitted["task"]["concurrencyKey"], "tenant-1",
        "{submitted}"
    );
}
