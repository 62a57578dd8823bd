//! Helpers for tests that run the Python example worker
//! (`examples/python-worker`) as real processes, and a TCP proxy that can
//! partition a connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// The example's directory.
pub fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python-worker")
}

/// The Python with the example's requirements (the SDK, installed from the
/// repo, and pypdf): `KOO_TEST_PYTHON` (set by `scripts/test`), else the
/// example's `setup.sh` is run once (creating or refreshing its virtualenv).
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Ok(p) = std::env::var("KOO_TEST_PYTHON") {
                return PathBuf::from(p);
            }
            let out = Command::new(example_dir().join("setup.sh"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run examples/python-worker/setup.sh");
            assert!(out.status.success(), "setup.sh failed");
            let stdout = String::from_utf8(out.stdout).unwrap();
            PathBuf::from(
                stdout
                    .lines()
                    .last()
                    .expect("setup.sh prints the python")
                    .trim(),
            )
        })
        .clone()
}

/// A running Python example worker and the events it prints.
pub struct PyWorker {
    pub child: Child,
    events: mpsc::UnboundedReceiver<serde_json::Value>,
    /// Every event read so far, in order.
    pub seen: Vec<serde_json::Value>,
}

impl PyWorker {
    /// Starts `worker.py` against `addr` with extra arguments and
    /// environment.
    pub fn start(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Self {
        let python = tokio::task::block_in_place(python);
        let mut child = Command::new(python)
            .arg(example_dir().join("worker.py"))
            .args(["--target", &addr.to_string()])
            .args(args)
            .env_remove("OPENAI_BASE_URL")
            .env_remove("KOO_WORKER_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python worker");
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Err(_) => eprintln!("worker stdout (not an event): {line}"),
                }
            }
        });
        Self {
            child,
            events,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event that `check` accepts (events it passes over
    /// are kept in `seen`).
    pub async fn wait_for(
        &mut self,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        if let Some(e) = self.seen.iter().find(|e| check(e)) {
            return e.clone();
        }
        let until = tokio::time::Instant::now() + super::EVENT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(until, self.events.recv()).await {
                Err(_) => panic!("no {what} event; saw {:?}", self.seen),
                Ok(None) => panic!("the worker exited before {what}; saw {:?}", self.seen),
                Ok(Some(e)) => {
                    self.seen.push(e.clone());
                    if check(&e) {
                        return e;
                    }
                }
            }
        }
    }

    /// Waits for an event named `event` about `task_id`.
    pub async fn wait_task_event(&mut self, event: &str, task_id: &str) -> serde_json::Value {
        self.wait_for(&format!("{event} of {task_id}"), |e| {
            e["event"] == event && e["task_id"] == task_id
        })
        .await
    }

    /// The welcome's worker id.
    pub async fn worker_id(&mut self) -> String {
        let w = self.wait_for("welcome", |e| e["event"] == "welcome").await;
        w["worker_id"].as_str().unwrap().to_owned()
    }

    /// Reads the events that have arrived so far, without waiting.
    pub fn drain(&mut self) -> &[serde_json::Value] {
        while let Ok(e) = self.events.try_recv() {
            self.seen.push(e);
        }
        &self.seen
    }

    /// Kills the worker with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        super::tasks::signal(&self.child, "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example's fake OpenAI-compatible server.
pub struct FakeOpenAi {
    child: Child,
    pub base_url: String,
}

impl FakeOpenAi {
    pub fn start() -> Self {
        let python = tokio::task::block_in_place(python);
        let mut child = Command::new(python)
            .arg(example_dir().join("fake_openai.py"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start fake_openai.py");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = serde_json::from_str::<serde_json::Value>(&line).unwrap()["port"]
            .as_u64()
            .expect("fake_openai prints its port");
        Self {
            child,
            base_url: format!("http://127.0.0.1:{port}/v1"),
        }
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy in front of `target` that can stop forwarding (both ways)
/// while keeping its connections open: a network partition that neither
/// end notices until it heals.
pub struct Proxy {
    pub addr: SocketAddr,
    open: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, gate) = watch::channel(true);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pump(ri, wo, gate.clone()));
                tokio::spawn(pump(ro, wi, gate.clone()));
            }
        });
        Self { addr, open, task }
    }

    /// Stops forwarding: bytes wait in the proxy until [`Self::heal`].
    pub fn partition(&self) {
        self.open.send_replace(false);
    }

    /// Forwards again, waiting bytes first.
    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
