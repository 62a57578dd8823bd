//! Helpers the benchmarks share: our own redis-server on a free loopback
//! port (never anyone else's), the real koo binary, and /proc readings.

#![allow(dead_code)] // each benchmark uses a different part

pub mod cluster;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long Redis and koo get to start.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Lines of koo's log kept for error messages.
const LOG_TAIL: usize = 40;

/// Kills and reaps a child when dropped, so that neither Redis nor koo
/// outlives the benchmark, whether it finishes, fails or panics.
pub struct ChildGuard {
    pub name: &'static str,
    pub child: Child,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} (pid {}) exited unexpectedly: {status}",
                self.name,
                self.pid()
            ),
            Err(e) => bail!("cannot check on {} (pid {}): {e}", self.name, self.pid()),
        }
    }

    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A port that is free right now. Another process could take it before
/// redis-server binds it; then redis-server exits and [`start_redis`] tries
/// again with a fresh port.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// The last `n` lines of a file, for error messages.
pub fn file_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return format!("(cannot read {})", path.display());
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Our own redis-server.
pub struct RedisServer {
    pub guard: ChildGuard,
    pub url: String,
    pub version: String,
    log_path: PathBuf,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // The log only matters when Redis fails to start, and then no
        // RedisServer exists; don't let one file per run pile up.
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// Starts our own redis-server on a free loopback port with `extra`
/// arguments, working in `tmp`.
pub async fn start_redis(redis_server: &str, tmp: &Path, extra: &[&str]) -> Result<RedisServer> {
    let tmp = tmp.to_path_buf();
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let port = free_port()?;
        // Redis logs to stdout by default; send that and any start-up error
        // to a file so a failure can be explained.
        let log_path = tmp.join(format!("koo-bench-redis-{port}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let child = Command::new(redis_server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // No persistence: nothing is written to disk, and no fork for
            // snapshots competes with the benchmark.
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(&tmp)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {:?} (install redis-server or set KOO_BENCH_REDIS_SERVER)",
                    redis_server
                )
            })?;
        let mut guard = ChildGuard {
            name: "redis-server",
            child,
        };
        match wait_for_redis(&mut guard, port).await {
            Ok(version) => {
                return Ok(RedisServer {
                    guard,
                    url: format!("redis://127.0.0.1:{port}/0"),
                    version,
                    log_path,
                });
            }
            Err(e) if guard.has_exited() && attempt < ATTEMPTS => {
                eprintln!(
                    "redis-server on port {port} did not start ({e:#}); retrying on another port"
                );
            }
            Err(e) => {
                return Err(e.context(format!(
                    "redis-server did not come up on 127.0.0.1:{port}; its log ({}) ends with:\n{}",
                    log_path.display(),
                    file_tail(&log_path, 15)
                )));
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Polls until our redis-server answers PING, then checks with `INFO server`
/// that the Redis answering is the process we started (so the benchmark
/// never writes to somebody else's Redis). Returns Redis's version.
pub async fn wait_for_redis(guard: &mut ChildGuard, port: u16) -> Result<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))?;
    let probe = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut last_error = String::from("no attempt made");
    loop {
        guard.check_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "redis-server did not answer PING on 127.0.0.1:{port} within {STARTUP_TIMEOUT:?} (last error: {last_error})"
            );
        }
        let attempt = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&probe)
                .await?;
            let _: String = redis::cmd("PING").query_async(&mut conn).await?;
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(info)
        };
        match attempt.await {
            Ok(info) => {
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .map(|v| v.trim().to_owned())
                };
                let pid = field("process_id").and_then(|p| p.parse::<u32>().ok());
                if pid != Some(guard.pid()) {
                    bail!(
                        "127.0.0.1:{port} is answered by a Redis with pid {pid:?}, not the one we started (pid {}); \
                         refusing to use it",
                        guard.pid()
                    );
                }
                return Ok(field("redis_version").unwrap_or_else(|| "unknown".to_owned()));
            }
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The koo server under test.
pub struct KooServer {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl KooServer {
    pub fn recent_log(&self) -> String {
        let tail = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// An error, with koo's last log lines, if koo has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.guard
            .check_alive()
            .map_err(|e| anyhow!("{e:#}; koo's log ends with:\n{}", self.recent_log()))
    }
}

/// Starts `bin serve` on a free port with `args` and `envs`, and waits until
/// it announces its address.
pub fn start_koo(bin: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<KooServer> {
    let child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .env("KOO_LOG", "info")
        // the HTTP listener's default port would collide between servers
        // (an older binary ignores the variable)
        .env("KOO_HTTP_LISTEN", "off")
        // The address is parsed from the text log; keep it plain text.
        .env("KOO_LOG_FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start koo ({bin})"))?;
    let mut guard = ChildGuard { name: "koo", child };
    let stderr = guard
        .child
        .stderr
        .take()
        .context("koo's stderr is not piped")?;
    let log_tail = Arc::new(Mutex::new(VecDeque::new()));
    let (tx, rx) = mpsc::channel();
    {
        let log_tail = log_tail.clone();
        // Drains koo's stderr for the whole run: a pipe nobody reads fills up
        // and then blocks koo's logging, and with it koo.
        std::thread::Builder::new()
            .name("koo-stderr".to_owned())
            .spawn(move || drain_koo_log(stderr, tx, log_tail))
            .context("cannot start the thread that reads koo's log")?;
    }
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut koo = KooServer {
        guard,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        log_tail,
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(addr) => {
                koo.addr = addr;
                return Ok(koo);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                koo.check_alive()?;
                if Instant::now() >= deadline {
                    bail!(
                        "koo did not log `koo serving gRPC` with its address within {STARTUP_TIMEOUT:?}; its log ends with:\n{}",
                        koo.recent_log()
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stderr closed before the line: koo is exiting.
                std::thread::sleep(Duration::from_millis(200));
                koo.check_alive()?;
                bail!(
                    "koo closed its log without announcing its address; its log ends with:\n{}",
                    koo.recent_log()
                );
            }
        }
    }
}

/// Reads koo's log line by line until it closes: sends the serving address
/// once, keeps the last lines for error messages, and echoes warnings and
/// errors (a breaker opening mid-run matters when reading the numbers).
pub fn drain_koo_log(
    stderr: impl Read,
    tx: mpsc::Sender<SocketAddr>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(stderr);
    let mut raw = Vec::new();
    let mut announced = false;
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = strip_ansi(String::from_utf8_lossy(&raw).trim_end());
        if !announced
            && line.contains("koo serving gRPC")
            && let Some(addr) = parse_addr(&line)
        {
            announced = true;
            let _ = tx.send(addr);
        } else if line.contains(" WARN ") || line.contains(" ERROR ") {
            eprintln!("  [koo] {line}");
        }
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// The `addr=127.0.0.1:NNNNN` field of a text log line.
pub fn parse_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("addr=")? + "addr=".len()..];
    let value = rest.split_whitespace().next()?.trim_matches('"');
    value.parse().ok()
}

/// Removes terminal colour sequences, in case the logger adds them even
/// though stderr is a pipe and NO_COLOR is set.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters... final byte in '@'..='~'.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// koo's resident memory from `/proc/<pid>/status`: (VmRSS, VmHWM) in bytes.
pub fn read_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets koo's VmHWM to its current RSS (Linux ≥ 4.0), so the next reading
/// is the peak of one cell rather than of the whole run.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// A whole-number knob from the environment, or `default` when unset.
pub fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}: {v:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The `p`th percentile of sorted values, interpolated.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = (sorted.len() - 1) as f64 * p / 100.0;
    let (f, c) = (k.floor() as usize, k.ceil() as usize);
    sorted[f] + (sorted[c] - sorted[f]) * (k - f as f64)
}

/// A process's CPU time so far (user + system, from `/proc/<pid>/stat`), s.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces, hence the last ')'):
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`; 100, the
/// value on every Linux we run on, if getconf cannot say).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .filter(|&t: &f64| t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A figure's goal.
#[derive(Clone, Copy)]
pub enum Goal {
    /// Reported only.
    None,
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

impl Goal {
    fn text(self) -> Option<String> {
        match self {
            Goal::None => None,
            Goal::AtLeast(g) => Some(format!(">= {g}")),
            Goal::AtMost(g) => Some(format!("<= {g}")),
            Goal::Below(g) => Some(format!("< {g}")),
        }
    }

    fn met(self, v: f64) -> Option<bool> {
        match self {
            Goal::None => None,
            Goal::AtLeast(g) => Some(v >= g),
            Goal::AtMost(g) => Some(v <= g),
            Goal::Below(g) => Some(v < g),
        }
    }
}

/// Figures gathered over repetitions, reported as median and min..max.
#[derive(Default)]
pub struct Figures {
    order: Vec<&'static str>,
    values: std::collections::HashMap<&'static str, (Vec<f64>, Goal)>,
}

impl Figures {
    pub fn add(&mut self, name: &'static str, value: f64, goal: Goal) {
        let entry = self.values.entry(name).or_insert_with(|| {
            self.order.push(name);
            (Vec::new(), goal)
        });
        entry.0.push(value);
    }

    /// One JSON line per figure (median, spread, goal, whether the median
    /// met it) to stdout and `out`, and a table to stderr.
    pub fn report(&self, out: &mut File, label: &str) {
        use std::io::Write as _;
        eprintln!(
            "\n{:<40} {:>12} {:>25} {:>8} {:>5}",
            "figure", "median", "min..max", "goal", "met"
        );
        for name in &self.order {
            let (values, goal) = &self.values[name];
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let median = percentile(&sorted, 50.0);
            let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
            let met = goal.met(median);
            let line = serde_json::json!({
                "system": "koo", "mode": "summary", "figure": name, "label": label,
                "median": median, "min": min, "max": max, "values": values,
                "goal": goal.text(), "met": met,
            });
            println!("{line}");
            let _ = writeln!(out, "{line}");
            eprintln!(
                "{name:<40} {median:>12.3} {:>25} {:>8} {:>5}",
                format!("{min:.3}..{max:.3}"),
                goal.text().unwrap_or_default(),
                met.map_or("", |m| if m { "yes" } else { "NO" })
            );
        }
    }
}

/// The koo binary to measure: `KOO_BENCH_BIN` (another build, e.g. the
/// previous main's, for a side-by-side comparison), else this build's.
pub fn koo_bin() -> String {
    std::env::var("KOO_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_koo").to_owned())
}

/// Commands a Redis has run so far (`INFO commandstats`): those run by
/// scripts and by clients (every `calls=` but EVALSHA's), and the EVALSHA
/// calls; `None` when the server cannot be asked. Differences of two
/// readings are what a run cost Redis in commands, whatever the machine's
/// noise.
pub async fn redis_calls(url: &str) -> Option<(u64, u64)> {
    let stats = info_commandstats(url).await?;
    let (mut commands, mut scripts) = (0, 0);
    for (name, n) in commandstats(&stats) {
        if name == "evalsha" {
            scripts += n;
        } else {
            commands += n;
        }
    }
    Some((commands, scripts))
}

/// Microseconds Redis has spent in script calls (`EVALSHA`, their inner
/// commands included) since its stats were last reset.
pub async fn redis_script_usec(url: &str) -> Option<u64> {
    let stats = info_commandstats(url).await?;
    let line = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))?;
    let usec = line.split(',').find_map(|f| f.strip_prefix("usec="))?;
    usec.parse().ok()
}

/// The median of `n` sequential `PING`s from this process over one
/// redis-rs connection (ms): a bare round trip to Redis on this machine,
/// what each of a lone task's calls pays before any work.
pub async fn redis_ping_p50(url: &str, n: usize) -> Option<f64> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
        took.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    took.get(took.len() / 2).copied()
}

/// The `INFO commandstats` of the Redis at `url` (`None` when it cannot be
/// read: no Redis, as on the embedded store).
async fn info_commandstats(url: &str) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .ok()
}

/// Each command's name and call count in an `INFO commandstats` reply.
pub fn commandstats(stats: &str) -> impl Iterator<Item = (&str, u64)> {
    stats.lines().filter_map(|line| {
        let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
        Some((name, rest.split(',').next()?.parse().ok()?))
    })
}

/// Reads a `WatchTasks` stream until `n` distinct tasks have been seen
/// SUCCEEDED, within 600 s: what a drain waits for (completions may come
/// before the submit that made them returns). Returns their ids.
pub async fn await_successes(
    watch: &mut tonic::Streaming<koo::pb::tasks::v1::WatchTasksResponse>,
    n: usize,
) -> Result<std::collections::HashSet<String>> {
    let mut done = std::collections::HashSet::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while done.len() < n {
        let event = tokio::time::timeout_at(deadline, watch.message())
            .await
            .map_err(|_| anyhow!("only {} of {n} completions seen in 600 s", done.len()))??
            .ok_or_else(|| anyhow!("WatchTasks ended"))?;
        if event.state == koo::pb::tasks::v1::TaskState::Succeeded as i32 {
            done.insert(event.task_id);
        }
    }
    Ok(done)
}
