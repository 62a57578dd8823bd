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
//! - Between saves, every acknowledged change is appended to a journal
//!   (`journal.rs`) and replayed on the last save at start-up, so that a
//!   crash loses no submit a caller was told succeeded.
//! - Without a data directory, shutdown logs what the embedded store drops.

mod dir;
pub mod journal;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use crate::domain::task::TaskId;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::schedule::Source;
use crate::store::memory::tasks::{MemoryTasks, TasksImage};
use crate::store::memory::{CacheImage, MemoryConfig, MemorySchedules, MemoryStore};
use crate::store::schedules::{ScheduleStore, SchedulesImage};

use self::dir::DataDir;
use self::journal::FileJournal;
pub use self::journal::Fsync;
use crate::store::tasks::TaskLimits;

/// The data file's name in the data directory.
pub const FILE_NAME: &str = "embedded-store.json";
/// The lock file's name in the data directory.
pub const LOCK_NAME: &str = "koo.lock";
/// What the header's `format` says.
pub(super) const FORMAT: &str = "koo-embedded-store";
/// The format version this koo writes and reads.
pub const VERSION: u64 = 1;

/// Where and how often the embedded store is saved.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSettings {
    /// The data directory; `None` keeps nothing.
    pub dir: Option<PathBuf>,
    /// Saves while serving this often (zero: only at shutdown, and when the
    /// journal grows past its bound).
    pub snapshot_interval: Duration,
    /// When the journal's writes reach the disk (`KOO_DATA_FSYNC`).
    pub fsync: Fsync,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dir: None,
            snapshot_interval: Duration::from_secs(60),
            fsync: Fsync::default(),
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

/// The body: the parts koo kept embedded when it saved.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Body {
    #[serde(default)]
    cache: Option<CacheImage>,
    #[serde(default)]
    tasks: Option<TasksImage>,
    #[serde(default)]
    schedules: Option<SchedulesImage>,
    /// The first journal generation whose changes this save may not hold
    /// (absent from saves before the journal: replay them all).
    #[serde(default)]
    journal: u64,
}

/// The data directory's figures, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataFigures {
    /// Saves written since koo started (at start-up, periodic, early).
    pub saves: u64,
    /// Saves that failed since koo started.
    pub failed_saves: u64,
    /// When the last save was written (ms since the epoch; 0: none yet).
    pub last_save_ms: i64,
    /// Bytes in the current journal file.
    pub journal_bytes: u64,
    /// Journal batches that could not be written since koo started.
    pub journal_failures: u64,
}

/// Saves made and failed (atomics: read by scrapes, written by saves).
#[derive(Debug, Default)]
struct SaveCounts {
    saves: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    last_ms: std::sync::atomic::AtomicI64,
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
    /// The same, for the journal.
    memory_schedules: Option<Arc<MemorySchedules>>,
    /// With a data directory: acknowledged changes between saves.
    journal: Option<FileJournal>,
    saves: Arc<SaveCounts>,
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
        let memory_schedules = tasks_embedded.then(|| Arc::new(MemorySchedules::default()));
        let mut embedded = Embedded {
            cache: parts.cache.map(MemoryStore::new),
            tasks: tasks_embedded.then(MemoryTasks::default),
            schedules: memory_schedules.clone().map(ScheduleStore::from_memory),
            memory_schedules,
            journal: None,
            saves: Arc::default(),
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
        let mut journal_from = 0;
        if let Some(body) = dir.read()? {
            journal_from = body.journal;
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
        let (replayed, next, unsaved) = embedded.replay(&dir.dir, journal_from)?;
        let journal =
            FileJournal::start(&dir.dir, next, data.fsync).map_err(|source| PersistError::Dir {
                dir: dir.dir.clone(),
                source,
            })?;
        if let Some(tasks) = &embedded.tasks {
            tasks.set_journal(Arc::new(journal.clone()));
        }
        if let Some(schedules) = &embedded.memory_schedules {
            schedules.set_journal(Arc::new(journal.clone()));
        }
        embedded.journal = Some(journal);
        embedded.dir = Some(Arc::new(dir));
        if unsaved {
            // a save holding them, so that the next start replays nothing
            // (and no file left behind ends torn but is no longer the newest)
            embedded.save()?;
            tracing::info!(
                replayed,
                took = ?started.elapsed(),
                "embedded store: replayed {replayed} acknowledged changes from the journal (made after the last save): {}",
                embedded.summary()
            );
        }
        Ok(embedded)
    }

    /// Replays the journal files from generation `from` on the loaded
    /// stores (older ones are deleted: the save holds them); how many
    /// records, the generation to write next, and whether any file held
    /// anything (then a save must follow).
    fn replay(&self, dir: &Path, from: u64) -> Result<(u64, u64, bool), PersistError> {
        let found = journal::files(dir).map_err(|source| PersistError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        journal::remove_before(dir, from);
        // a save killed before its rename
        let _ = std::fs::remove_file(dir.join(FILE_NAME).with_extension("json.tmp"));
        let found: Vec<_> = found.into_iter().filter(|(g, _)| *g >= from).collect();
        let next = found.last().map_or(from.max(1), |(g, _)| g + 1);
        let mut replayed = 0;
        let unsaved = found
            .iter()
            .any(|(_, f)| std::fs::metadata(f).is_ok_and(|m| m.len() > 0));
        for (i, (_, file)) in found.iter().enumerate() {
            let records = journal::read(file, i + 1 == found.len())?;
            replayed += records.len() as u64;
            let corrupt = |reason: String| PersistError::Corrupt {
                file: file.clone(),
                reason,
            };
            // the schedules' few records copied; the tasks' moved
            if let Some(schedules) = &self.memory_schedules {
                schedules.replay(&records);
            }
            match &self.tasks {
                Some(tasks) => {
                    tasks.replay(records, self.limits).map_err(corrupt)?;
                }
                // as for a save: refused rather than dropped
                None if !records.is_empty() => {
                    return Err(PersistError::Moved {
                        file: file.clone(),
                        what: format!("{} journaled changes of tasks or schedules", records.len()),
                    });
                }
                None => {}
            }
        }
        if !unsaved {
            // empty files of starts that changed nothing
            for (_, file) in &found {
                let _ = std::fs::remove_file(file);
            }
        }
        Ok((replayed, next, unsaved))
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
            let store = Arc::new(MemorySchedules::from_image(image));
            self.schedules = Some(ScheduleStore::from_memory(store.clone()));
            self.memory_schedules = Some(store);
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

    /// The data directory's figures; `None` without one.
    pub fn figures(&self) -> Option<DataFigures> {
        use std::sync::atomic::Ordering::Relaxed;
        let journal = self.journal.as_ref()?;
        let (journal_bytes, journal_failures) = journal.figures();
        Some(DataFigures {
            saves: self.saves.saves.load(Relaxed),
            failed_saves: self.saves.failed.load(Relaxed),
            last_save_ms: self.saves.last_ms.load(Relaxed),
            journal_bytes,
            journal_failures,
        })
    }

    /// Saves now (the tasks as they are: running ones stay running, for
    /// the recovery sweep after a crash), counting it. Blocking file I/O.
    pub fn save(&self) -> Result<(), PersistError> {
        use std::sync::atomic::Ordering::Relaxed;
        let saved = self.save_once();
        match &saved {
            Ok(()) if self.dir.is_some() => {
                self.saves.saves.fetch_add(1, Relaxed);
                let now = crate::store::unix_millis(std::time::SystemTime::now());
                self.saves.last_ms.store(now, Relaxed);
            }
            Ok(()) => {}
            Err(_) => {
                self.saves.failed.fetch_add(1, Relaxed);
            }
        }
        saved
    }

    fn save_once(&self) -> Result<(), PersistError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        // one save at a time, from the rotation to the removal of the files
        // it holds (an older save finishing last would name a generation
        // whose file a newer one removed)
        let _one = dir.saving.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        // before the export: every change in an older file is in it
        let generation = self.journal.as_ref().map_or(0, FileJournal::rotate);
        let body = Body {
            cache: self.cache.as_ref().map(|c| {
                let mut image = c.export(&self.cache_prefix);
                image.entries.extend(c.export(&self.tag_prefix).entries);
                image
            }),
            tasks: self.tasks.as_ref().map(MemoryTasks::export),
            schedules: self.schedules.as_ref().and_then(|s| s.export_memory()),
            journal: generation,
        };
        let bytes = dir.write(&body)?;
        if generation > 0 {
            journal::remove_before(&dir.dir, generation);
        }
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
        if let Some(journal) = &self.journal {
            journal.close();
        }
        tracing::info!(
            file = %dir.file.display(),
            handed_back,
            took = ?started.elapsed(),
            "embedded store saved: {}",
            self.summary()
        );
        Ok(())
    }

    /// Saves every `every` (zero: never on a timer), and whenever the
    /// journal has grown past its bound, until `stop`; without a data
    /// directory, never.
    pub async fn run_snapshots(self, every: Duration, stop: CancellationToken) {
        let Some(journal) = self.journal.clone() else {
            return;
        };
        let period = if every.is_zero() {
            Duration::from_secs(365 * 24 * 3600)
        } else {
            every
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = journal.grown() => {
                    tracing::info!(
                        bound = journal::COMPACT_BYTES,
                        "the KOO_DATA_DIR journal passed its bound: saving now"
                    );
                }
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

#[cfg(test)]
mod tests;
