//! The chaos suite's parts (issue 11): koo processes built from this tree
//! that can be killed, stopped and restarted; the fault log; the ledger of
//! executions that the handlers write outside koo; and the checker that
//! classifies every acknowledged task from the ledger, as Jepsen's queue
//! checker does. `tests/chaos.rs` drives them.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use koo::pb::tasks::v1 as pb;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Wall-clock milliseconds: the unit of the ledger and the fault log (both
/// written by several processes, so a shared clock, not an `Instant`).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A lazily connected channel to `port`: it reconnects by itself after the
/// process behind the port is killed and restarted.
pub fn lazy_channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy()
}

/// Two `koo serve` processes, `serve-a` and `serve-b`, on `redis_url`,
/// with `workers` built-in slots each, short task intervals and none of the
/// built-in schedules; their logs go to `dir`. The cluster-wide tests
/// (flow control, compute on miss, tags, the invalidation stream) run on
/// these.
pub async fn serve_pair(redis_url: String, workers: usize, dir: &Path) -> Vec<KooProc> {
    let env: Vec<(String, String)> = [
        ("REDIS_URL", redis_url),
        ("KOO_WORKER_CONCURRENCY", workers.to_string()),
        ("KOO_TASK_LEASE", "2s".into()),
        ("KOO_TASK_SWEEP_INTERVAL", "200ms".into()),
        ("KOO_WORKER_POLL_INTERVAL", "20ms".into()),
        ("KOO_SCHEDULE_CACHE_CLEANUP", "off".into()),
        ("KOO_SCHEDULE_CACHE_WARM", "off".into()),
        ("KOO_SCHEDULE_DATABASE_MAINTENANCE", "off".into()),
        ("KOO_SCHEDULE_HEALTH_CHECK", "off".into()),
        ("KOO_SHUTDOWN_DRAIN", "0ms".into()),
        ("KOO_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut procs = Vec::new();
    for name in ["serve-a", "serve-b"] {
        let port = super::free_port();
        let mut p = KooProc::new(name, &["serve"], Some(port), env.clone(), dir);
        p.start().await;
        procs.push(p);
    }
    procs
}

/// A koo process (`serve`, `worker`) started from this tree's binary, with
/// only the configuration given here (nothing leaks in from the caller's
/// environment) and its log appended to a file of the run's directory.
pub struct KooProc {
    pub name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The gRPC port of a `koo serve` (kept across restarts).
    pub port: Option<u16>,
    child: Option<Child>,
    log: PathBuf,
}

impl KooProc {
    pub fn new(
        name: &str,
        args: &[&str],
        port: Option<u16>,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> Self {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(port) = port {
            args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
        }
        Self {
            name: name.into(),
            args,
            env,
            port,
            child: None,
            log: dir.join(format!("{name}.log")),
        }
    }

    /// Starts the process; a `koo serve` is waited for until it is SERVING.
    pub async fn start(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the process log");
        let mut cmd = super::koo_command();
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        if let Some(port) = self.port {
            wait_serving(&self.name, port).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the process to exit (koo's graceful stop).
    pub async fn terminate(&mut self) {
        let mut c = self.child.take().expect("running");
        super::tasks::signal(&c, "TERM");
        let status = tokio::task::spawn_blocking(move || c.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{} exited with {status}", self.name);
    }

    /// Sends `sig` ("STOP", "CONT") to the process.
    pub fn signal(&self, sig: &str) {
        super::tasks::signal(self.child.as_ref().expect("running"), sig);
    }
}

impl Drop for KooProc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("CONT");
        }
        self.kill9();
    }
}

/// Waits until the `koo serve` on `port` answers SERVING. A process start
/// has no event to await from outside but its port: a bounded poll.
pub async fn wait_serving(name: &str, port: u16) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut health = HealthClient::new(lazy_channel(port));
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        req.set_timeout(Duration::from_millis(500));
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), health.check(req)).await
            && r.get_ref().status == ServingStatus::Serving as i32
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{name} on port {port} never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One execution a handler saw, as its ledger line says.
#[derive(Debug, Clone)]
pub struct Exec {
    pub task_id: String,
    pub attempt: i64,
    pub token: i64,
    pub pid: u32,
    pub ms: i64,
}

/// Every execution in the ledger files, per task, in lease order.
pub fn read_ledger(paths: &[PathBuf]) -> HashMap<String, Vec<Exec>> {
    let mut out: HashMap<String, Vec<Exec>> = HashMap::new();
    for path in paths {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a torn ledger line in {path:?} ({e}): {line}"));
            let exec = Exec {
                task_id: v["task_id"].as_str().unwrap().to_owned(),
                attempt: v["attempt"].as_i64().unwrap(),
                token: v["token"].as_i64().unwrap(),
                pid: v["pid"].as_u64().unwrap() as u32,
                ms: v["ms"].as_i64().unwrap(),
            };
            out.entry(exec.task_id.clone()).or_default().push(exec);
        }
    }
    for execs in out.values_mut() {
        execs.sort_by_key(|e| (e.token, e.ms));
    }
    out
}

/// The kinds of fault the suite injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of a koo process or the Python worker (then a restart).
    Kill9,
    /// SIGSTOP past the lease, then SIGCONT: a zombie.
    Stop,
    /// Redis SIGKILLed and restarted from its AOF.
    RedisRestart,
    /// `CLIENT PAUSE`.
    Pause,
    /// A `DEBUG SLEEP` loop.
    Slow,
}

impl FaultKind {
    pub const ALL: [FaultKind; 5] = [
        FaultKind::Kill9,
        FaultKind::Stop,
        FaultKind::RedisRestart,
        FaultKind::Pause,
        FaultKind::Slow,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Kill9 => "kill9",
            FaultKind::Stop => "stop",
            FaultKind::RedisRestart => "redis_restart",
            FaultKind::Pause => "pause",
            FaultKind::Slow => "slow",
        }
    }

    /// Redis faults touch every process at once.
    fn is_redis(self) -> bool {
        matches!(
            self,
            FaultKind::RedisRestart | FaultKind::Pause | FaultKind::Slow
        )
    }
}

/// One injected fault: what, on which process ids (those whose executions
/// it can interrupt: the process itself, and for a `koo serve` the Python
/// worker whose stream it holds), and when.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: FaultKind,
    pub target: String,
    pub pids: Vec<u32>,
    pub start_ms: i64,
    pub end_ms: i64,
}

/// The faults of a run, each printed with its time as it ends.
pub struct FaultLog {
    t0: i64,
    pub faults: Vec<Fault>,
}

impl FaultLog {
    pub fn new(t0: i64) -> Self {
        Self {
            t0,
            faults: Vec::new(),
        }
    }

    pub fn record(&mut self, fault: Fault) {
        eprintln!(
            "chaos: fault #{} at +{:.3}s for {:.3}s: {} {} pids={:?}",
            self.faults.len() + 1,
            (fault.start_ms - self.t0) as f64 / 1000.0,
            (fault.end_ms - fault.start_ms) as f64 / 1000.0,
            fault.kind.label(),
            fault.target,
            fault.pids
        );
        self.faults.push(fault);
    }

    pub fn count(&self, kind: FaultKind) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }

    /// Whether a fault can explain why `first`'s execution did not stand
    /// and the task ran again at `next_ms`: a kill or stop of the process
    /// running it, or any Redis fault, between its lease and the next
    /// start. The ledger has the handler's start; its lease was granted
    /// before, by up to `lead` when the process was stopped in between.
    pub fn explains(&self, first: &Exec, next_ms: i64, lead: Duration) -> bool {
        self.faults.iter().any(|f| {
            f.start_ms <= next_ms
                && f.end_ms >= first.ms - lead.as_millis() as i64
                && (f.kind.is_redis() || f.pids.contains(&first.pid))
        })
    }
}

/// A submit that returned OK.
#[derive(Debug, Clone)]
pub struct Acked {
    pub key: String,
    pub task_id: String,
}

/// What koo says of an acknowledged task once the run has quiesced.
#[derive(Debug, Clone)]
pub enum Seen {
    Task(Box<pb::Task>),
    NotFound,
}

/// Every acknowledged task, classified.
#[derive(Debug, Default)]
pub struct Verdict {
    pub tasks: usize,
    pub done_once: usize,
    /// Ran more than once, each extra run after a fault that explains it.
    pub dup_explained: usize,
    pub dup_unexplained: Vec<String>,
    /// Acknowledged, and koo does not know it.
    pub lost: Vec<String>,
    /// Not in a final state when the run quiesced.
    pub stuck: Vec<String>,
    /// Ended otherwise than SUCCEEDED.
    pub failed: Vec<String>,
    /// SUCCEEDED without an execution in the ledger, or with a result that
    /// is not the latest lease's (a fenced zombie's report that stood).
    pub wrong_result: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.dup_unexplained.is_empty()
            && self.lost.is_empty()
            && self.stuck.is_empty()
            && self.failed.is_empty()
            && self.wrong_result.is_empty()
    }
}

/// Classifies each acknowledged task from koo's final word on it, the
/// ledger of executions and the fault log.
pub fn classify(
    acked: &[Acked],
    seen: &HashMap<String, Seen>,
    ledger: &HashMap<String, Vec<Exec>>,
    faults: &FaultLog,
    lead: Duration,
) -> Verdict {
    let mut v = Verdict {
        tasks: acked.len(),
        ..Verdict::default()
    };
    let none = Vec::new();
    for a in acked {
        let task = match seen.get(&a.task_id) {
            Some(Seen::Task(t)) => t,
            _ => {
                v.lost.push(a.task_id.clone());
                continue;
            }
        };
        if task.state < pb::TaskState::Succeeded as i32 {
            v.stuck.push(format!("{} ({:?})", a.task_id, task.state()));
            continue;
        }
        if task.state != pb::TaskState::Succeeded as i32 {
            v.failed.push(format!(
                "{} ({:?}: {:?})",
                a.task_id,
                task.state(),
                task.error
            ));
            continue;
        }
        let execs = ledger.get(&a.task_id).unwrap_or(&none);
        let result = task
            .result
            .as_ref()
            .and_then(|r| koo::grpc::json::to_serde(r).ok());
        // JSON numbers come back from koo as doubles
        let latest = execs.last().map(|e| e.token as f64);
        let stood = result.as_ref().and_then(|r| r["token"].as_f64());
        if latest.is_none() || stood != latest {
            v.wrong_result.push(format!(
                "{}: result {result:?}, ledger {execs:?}",
                a.task_id
            ));
            continue;
        }
        match execs.len() {
            1 => v.done_once += 1,
            _ if execs
                .windows(2)
                .all(|w| faults.explains(&w[0], w[1].ms, lead)) =>
            {
                v.dup_explained += 1
            }
            _ => v.dup_unexplained.push(format!("{}: {execs:?}", a.task_id)),
        }
    }
    v
}

/// Checks a schedule's ticks (tick ms → tasks stored) over the window in
/// which a scheduler was alive throughout: `(missing, doubled)`.
pub fn check_ticks(
    ticks: &std::collections::BTreeMap<i64, usize>,
    from_ms: i64,
    to_ms: i64,
) -> (Vec<i64>, Vec<i64>) {
    let first = from_ms.div_euclid(1000) * 1000 + 1000;
    let missing = (first..=to_ms)
        .step_by(1000)
        .filter(|t| !ticks.contains_key(t))
        .collect();
    let doubled = ticks
        .iter()
        .filter(|(_, n)| **n != 1)
        .map(|(t, _)| *t)
        .collect();
    (missing, doubled)
}
