//! The data directory (`KOO_DATA_DIR`): keeps the embedded store (cache
//! entries, tasks, schedules) across restarts of a single `koo serve`
//! without Redis.
//!
//! Why this shape:
//! - One file, `embedded-store.json`, written whole at shutdown (after the
//!   workers handed their tasks back and the gRPC server drained) and every
//!   `KOO_DATA_SNAPSHOT_INTERVAL` while serving, so that a crash loses at
//!   most that interval. Each save writes a temporary file in the same
//!   directory, fsyncs it, renames it over the old one and fsyncs the
//!   directory: a reader (the next start) sees the old file or the new one,
//!   never half of one.
//! - Format: a JSON header line (`format`, `version`, size and FNV-1a hash
//!   of the body) then the body, one JSON document. JSON because serde_json
//!   is already here, the file can be inspected with `jq`, and it is fast
//!   enough (see the README for figures); the version lets a later koo
//!   refuse, or convert, a file it does not know instead of misreading it.
//! - A file that cannot be read stops start-up naming it: starting empty
//!   would overwrite it at the next save and lose what it held.
//! - An exclusive lock on `koo.lock` keeps a second koo off the directory;
//!   the operating system releases it when the process ends, even by
//!   `kill -9`.
//! - Without a data directory, shutdown logs what the embedded store drops.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::domain::task::TaskId;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::schedule::Source;
use crate::store::memory::tasks::{MemoryTasks, TasksImage};
use crate::store::memory::{CacheImage, MemoryConfig, MemoryStore};
use crate::store::schedules::{ScheduleStore, SchedulesImage};
use crate::store::tasks::TaskLimits;
use crate::store::{fnv1a, unix_millis};

/// The data file's name in the data directory.
pub const FILE_NAME: &str = "embedded-store.json";
/// The lock file's name in the data directory.
pub const LOCK_NAME: &str = "koo.lock";
/// What the header's `format` says.
const FORMAT: &str = "koo-embedded-store";
/// The format version this koo writes and reads.
pub const VERSION: u64 = 1;

/// Where and how often the embedded store is saved.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSettings {
    /// The data directory; `None` keeps nothing.
    pub dir: Option<PathBuf>,
    /// Saves while serving this often (zero: only at shutdown).
    pub snapshot_interval: Duration,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dir: None,
            snapshot_interval: Duration::from_secs(60),
        }
    }
}

/// Which parts of a `koo serve` live in its process (the others are on
/// Redis): what [`Embedded::open`] builds and the data directory keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedParts {
    /// The embedded cache store's settings; `None` when the cache is on Redis.
    pub cache: Option<MemoryConfig>,
    /// The cache's key prefix (`CACHE_PREFIX`): its `{prefix}:cache:` keys
    /// are the ones saved.
    pub cache_prefix: String,
    /// The task store's limits when the tasks (and with them the schedules)
    /// are embedded; `None` when they are on Redis.
    pub tasks: Option<TaskLimits>,
}

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The directory or its lock file cannot be created or opened.
    #[error("KOO_DATA_DIR: cannot use {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// Another process holds the directory's lock.
    #[error(
        "KOO_DATA_DIR: another koo is using {} ({}{holder}); stop it, or give this one another directory",
        dir.display(), lock.display()
    )]
    Locked {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    /// The data file cannot be read or does not parse.
    #[error(
        "cannot load the embedded store from {}: {reason}; koo does not start rather than overwrite it: repair the file or move it away",
        file.display()
    )]
    Corrupt { file: PathBuf, reason: String },
    /// The data file was written in a format version this koo does not read.
    #[error(
        "cannot load the embedded store from {}: it has format version {found}, this koo reads version {VERSION}; use the koo that wrote it, or move the file away",
        file.display()
    )]
    Version { file: PathBuf, found: u64 },
    /// The data file holds data of a part that now lives in Redis.
    #[error(
        "{} holds {what}, but they now live in Redis; koo does not start rather than drop them: unset REDIS_URL/TASK_BROKER_URL to use them, or move the file away",
        file.display()
    )]
    Moved { file: PathBuf, what: String },
    /// Writing the data file failed.
    #[error("cannot save the embedded store to {}: {source}", file.display())]
    Save {
        file: PathBuf,
        source: std::io::Error,
    },
}

/// The header line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    version: u64,
    #[serde(default)]
    saved_ms: i64,
    #[serde(default)]
    koo_version: String,
    #[serde(default)]
    body_bytes: u64,
    #[serde(default)]
    body_fnv1a: String,
}

/// The body: the parts koo kept embedded when it saved.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Body {
    #[serde(default)]
    cache: Option<CacheImage>,
    #[serde(default)]
    tasks: Option<TasksImage>,
    #[serde(default)]
    schedules: Option<SchedulesImage>,
}

/// The locked data directory.
struct DataDir {
    dir: PathBuf,
    file: PathBuf,
    /// Held open for the lock's sake.
    _lock: File,
    /// One save at a time (the periodic one and the final one).
    saving: Mutex<()>,
}

/// The embedded parts of this `koo serve` and, with `KOO_DATA_DIR`, where
/// they are kept: a cheap-to-clone handle.
#[derive(Clone)]
pub struct Embedded {
    /// The embedded cache store, unless the cache is on Redis.
    pub cache: Option<MemoryStore>,
    /// The embedded task store, unless tasks are on Redis.
    pub tasks: Option<MemoryTasks>,
    /// The in-process schedules (with the embedded tasks).
    pub schedules: Option<ScheduleStore>,
    cache_prefix: String,
    /// `{prefix}:v1:ctag:`: the cache's tag versions, saved with the
    /// entries so that tagged entries still hit after a restart.
    tag_prefix: String,
    limits: TaskLimits,
    dir: Option<Arc<DataDir>>,
}

impl Embedded {
    /// The embedded `parts`, loaded from `data`'s directory when there is
    /// one (which stays locked while koo runs).
    pub fn open(parts: EmbeddedParts, data: &DataSettings) -> Result<Self, PersistError> {
        let tasks_embedded = parts.tasks.is_some();
        let cache_embedded = parts.cache.is_some();
        let mut embedded = Embedded {
            cache: parts.cache.map(MemoryStore::new),
            tasks: tasks_embedded.then(MemoryTasks::default),
            schedules: tasks_embedded.then(ScheduleStore::memory),
            cache_prefix: format!("{}:cache:", parts.cache_prefix),
            tag_prefix: crate::keys::KeySpace::new(&parts.cache_prefix).tag_prefix(),
            limits: parts.tasks.unwrap_or_default(),
            dir: None,
        };
        let Some(path) = &data.dir else {
            return Ok(embedded);
        };
        if !cache_embedded && !tasks_embedded {
            tracing::warn!(dir = %path.display(), "KOO_DATA_DIR is ignored: the cache and the tasks live in Redis");
            return Ok(embedded);
        }
        let dir = DataDir::lock(path)?;
        let started = Instant::now();
        if let Some(body) = dir.read()? {
            embedded.load(&dir.file, body)?;
            tracing::info!(
                file = %dir.file.display(),
                took = ?started.elapsed(),
                "embedded store loaded: {}",
                embedded.summary()
            );
        } else {
            tracing::info!(dir = %dir.dir.display(), "no saved embedded store yet; starting empty");
        }
        embedded.dir = Some(Arc::new(dir));
        Ok(embedded)
    }

    fn load(&mut self, file: &Path, body: Body) -> Result<(), PersistError> {
        let corrupt = |reason: String| PersistError::Corrupt {
            file: file.to_owned(),
            reason,
        };
        let moved = |what: String| PersistError::Moved {
            file: file.to_owned(),
            what,
        };
        if let Some(image) = body.cache {
            match &self.cache {
                Some(cache) => {
                    let load = cache.import(image).map_err(corrupt)?;
                    if load.evicted > 0 {
                        tracing::warn!(
                            evicted = load.evicted,
                            "saved cache entries did not fit in KOO_MEMORY_MAX_BYTES"
                        );
                    }
                }
                None if !image.entries.is_empty() => {
                    return Err(moved(format!("{} cache entries", image.entries.len())));
                }
                None => {}
            }
        }
        if let Some(image) = body.tasks {
            match &mut self.tasks {
                Some(tasks) => *tasks = MemoryTasks::import(image).map_err(corrupt)?,
                None if !image.tasks.is_empty() => {
                    return Err(moved(format!("{} tasks", image.tasks.len())));
                }
                None => {}
            }
        }
        if let Some(image) = body.schedules
            && self.schedules.is_some()
        {
            self.schedules = Some(ScheduleStore::memory_from(image));
        }
        Ok(())
    }

    /// What the embedded parts hold: "N tasks (queued A, ...), M cache
    /// entries, S schedules", for the parts that are embedded.
    pub fn summary(&self) -> String {
        self.census().0
    }

    /// [`Self::summary`], and whether any of it is the user's: tasks, cache
    /// entries, or schedules made through the API (the configuration's
    /// defaults come back by themselves).
    fn census(&self) -> (String, bool) {
        let mut parts = Vec::new();
        let mut users = false;
        if let Some(tasks) = &self.tasks {
            let census = tasks.census();
            let total: u64 = census.iter().map(|(_, n)| n).sum();
            users |= total > 0;
            let states: Vec<String> = census
                .iter()
                .map(|(s, n)| format!("{} {n}", s.as_str()))
                .collect();
            parts.push(if states.is_empty() {
                format!("{total} tasks")
            } else {
                format!("{total} tasks ({})", states.join(", "))
            });
        }
        if let Some(cache) = &self.cache {
            let entries = cache.count_live(&self.cache_prefix);
            users |= entries > 0;
            parts.push(format!("{entries} cache entries"));
        }
        if let Some(image) = self.schedules.as_ref().and_then(|s| s.export_memory()) {
            users |= image.schedules.values().any(|s| s.source == Source::Api);
            parts.push(format!("{} schedules", image.schedules.len()));
        }
        (parts.join(", "), users)
    }

    /// Whether a data directory keeps the embedded parts.
    pub fn is_kept(&self) -> bool {
        self.dir.is_some()
    }

    /// Saves now (the tasks as they are: running ones stay running, for
    /// the recovery sweep after a crash). Blocking file I/O.
    pub fn save(&self) -> Result<(), PersistError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let started = Instant::now();
        let body = Body {
            cache: self.cache.as_ref().map(|c| {
                let mut image = c.export(&self.cache_prefix);
                image.entries.extend(c.export(&self.tag_prefix).entries);
                image
            }),
            tasks: self.tasks.as_ref().map(MemoryTasks::export),
            schedules: self.schedules.as_ref().and_then(|s| s.export_memory()),
        };
        let bytes = dir.write(&body)?;
        tracing::debug!(bytes, took = ?started.elapsed(), "embedded store saved");
        Ok(())
    }

    /// At shutdown, once workers have stopped and the server has drained:
    /// with a data directory, hands running tasks back (except `kept`, the
    /// tasks of workers that re-attach them to the next koo) and saves;
    /// without, logs what is dropped. Blocking file I/O.
    pub fn shutdown(self, kept: &HashSet<TaskId>) -> Result<(), PersistError> {
        let Some(dir) = &self.dir else {
            let (summary, users) = self.census();
            if users {
                tracing::warn!("embedded store: dropping {summary}; set KOO_DATA_DIR to keep them");
            } else if self.cache.is_some() || self.tasks.is_some() {
                tracing::info!("embedded store: dropping {summary}; set KOO_DATA_DIR to keep them");
            }
            return Ok(());
        };
        let handed_back = self
            .tasks
            .as_ref()
            .map_or(0, |t| t.hand_back_running(self.limits, kept));
        let started = Instant::now();
        self.save()?;
        tracing::info!(
            file = %dir.file.display(),
            handed_back,
            took = ?started.elapsed(),
            "embedded store saved: {}",
            self.summary()
        );
        Ok(())
    }

    /// Saves every `every` until `stop` (zero or no data directory: never).
    pub async fn run_snapshots(self, every: Duration, stop: CancellationToken) {
        if self.dir.is_none() || every.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = self.clone();
            match tokio::task::spawn_blocking(move || this.save()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "periodic save failed; trying again at the next interval")
                }
                Err(e) => tracing::warn!(error = %e, "periodic save failed"),
            }
        }
    }
}

impl DataDir {
    /// Creates the directory if needed and takes its lock.
    fn lock(dir: &Path) -> Result<Self, PersistError> {
        let io = |source| PersistError::Dir {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock_path = dir.join(LOCK_NAME);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = lock.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(PersistError::Locked {
                    dir: dir.to_owned(),
                    lock: lock_path,
                    holder: if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" is held by {holder}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // who holds it, for the next one's message
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = write!(lock, "pid {}", std::process::id());
        Ok(DataDir {
            dir: dir.to_owned(),
            file: dir.join(FILE_NAME),
            _lock: lock,
            saving: Mutex::new(()),
        })
    }

    /// The saved body; `None` when there is no file yet.
    fn read(&self) -> Result<Option<Body>, PersistError> {
        let corrupt = |reason: String| PersistError::Corrupt {
            file: self.file.clone(),
            reason,
        };
        let data = match std::fs::read(&self.file) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(corrupt(e.to_string())),
        };
        let split = data
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| corrupt("no header line".to_owned()))?;
        let (head, body) = (&data[..split], &data[split + 1..]);
        let header: Header = serde_json::from_slice(head)
            .map_err(|e| corrupt(format!("the header line does not parse: {e}")))?;
        if header.format != FORMAT {
            return Err(corrupt(format!(
                "the header names format {:?}, not {FORMAT:?}",
                header.format
            )));
        }
        if header.version != VERSION {
            return Err(PersistError::Version {
                file: self.file.clone(),
                found: header.version,
            });
        }
        if header.body_bytes != body.len() as u64 {
            return Err(corrupt(format!(
                "the body has {} bytes, the header says {} (truncated?)",
                body.len(),
                header.body_bytes
            )));
        }
        let hash = format!("{:016x}", fnv1a(body));
        if header.body_fnv1a != hash {
            return Err(corrupt(format!(
                "the body's FNV-1a hash is {hash}, the header says {:?}",
                header.body_fnv1a
            )));
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| corrupt(format!("the body does not parse: {e}")))
    }

    /// Writes `body` atomically; its size in bytes.
    fn write(&self, body: &Body) -> Result<u64, PersistError> {
        let _one = self.saving.lock().unwrap_or_else(PoisonError::into_inner);
        let err = |source| PersistError::Save {
            file: self.file.clone(),
            source,
        };
        let body = serde_json::to_vec(body).map_err(|e| err(std::io::Error::other(e)))?;
        let header = Header {
            format: FORMAT.to_owned(),
            version: VERSION,
            saved_ms: unix_millis(SystemTime::now()),
            koo_version: env!("CARGO_PKG_VERSION").to_owned(),
            body_bytes: body.len() as u64,
            body_fnv1a: format!("{:016x}", fnv1a(&body)),
        };
        let head = serde_json::to_vec(&header).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = self.file.with_extension("json.tmp");
        let mut out = private_file(&tmp).map_err(err)?;
        out.write_all(&head).map_err(err)?;
        out.write_all(b"\n").map_err(err)?;
        out.write_all(&body).map_err(err)?;
        out.sync_all().map_err(err)?;
        drop(out);
        std::fs::rename(&tmp, &self.file).map_err(err)?;
        // the rename itself is durable once the directory is synced
        #[cfg(unix)]
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok((head.len() + 1 + body.len()) as u64)
    }
}

/// A new file (truncated if it exists) readable by its owner only: the
/// save holds cache values, task arguments and results, and the key of
/// lease secrets.
fn private_file(path: &Path) -> std::io::Result<File> {
    let mut open = OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    open.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything embedded, kept in `dir`.
    fn open(dir: &Path) -> Result<Embedded, PersistError> {
        let parts = EmbeddedParts {
            cache: Some(MemoryConfig::default()),
            cache_prefix: "koo".to_owned(),
            tasks: Some(TaskLimits::default()),
        };
        let data = DataSettings {
            dir: Some(dir.to_owned()),
            ..DataSettings::default()
        };
        Embedded::open(parts, &data)
    }

    /// The cache's tag versions are saved with its entries (so that tagged
    /// entries still hit after a restart), and other keys are not.
    #[tokio::test]
    async fn tag_versions_are_kept_with_the_entries() {
        use crate::store::{CacheBackend, Deadline};
        let d = Deadline::after(std::time::Duration::from_secs(5));
        let minute = std::time::Duration::from_secs(60);
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path()).unwrap();
        let cache = a.cache.clone().unwrap();
        let tag = crate::keys::KeySpace::new("koo").tag_key(crate::domain::Level::Db, "t");
        let version = cache
            .tag_versions_for_write(&[(tag.clone(), minute)], d)
            .await
            .unwrap();
        cache
            .set("koo:cache:db:k", bytes::Bytes::from_static(b"v"), minute, d)
            .await
            .unwrap();
        cache
            .set("other:x", bytes::Bytes::from_static(b"v"), minute, d)
            .await
            .unwrap();
        a.save().unwrap();
        drop((a, cache));
        let b = open(dir.path()).unwrap();
        let cache = b.cache.clone().unwrap();
        assert_eq!(
            cache.tag_versions(&[tag], d).await.unwrap(),
            [Some(version[0])]
        );
        assert!(cache.get("koo:cache:db:k", d).await.unwrap().is_some());
        assert!(cache.get("other:x", d).await.unwrap().is_none());
    }

    /// A saved file loads back; a flipped byte in the body is caught by the
    /// hash and named as corruption rather than loaded.
    #[test]
    fn save_load_and_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(dir.path()).unwrap();
        a.save().unwrap();
        let file = dir.path().join(FILE_NAME);
        drop(a);
        let b = open(dir.path()).unwrap();
        assert_eq!(b.summary(), "0 tasks, 0 cache entries, 0 schedules");
        drop(b);
        let mut data = std::fs::read(&file).unwrap();
        let last = data.len() - 2;
        data[last] ^= 0x01;
        std::fs::write(&file, &data).unwrap();
        let err = open(dir.path()).err().unwrap();
        assert!(matches!(err, PersistError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }

    /// The lock is exclusive while held and free once its holder is gone.
    #[test]
    fn the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDir::lock(dir.path()).unwrap();
        let err = DataDir::lock(dir.path()).err().unwrap();
        assert!(matches!(err, PersistError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("pid "), "{err}");
        drop(held);
        DataDir::lock(dir.path()).unwrap();
    }
}
