//! The data directory's journal: acknowledged changes of the embedded store
//! appended to `journal-<generation>.jsonl` between saves, so that a crash
//! (`kill -9`, a power loss under `KOO_DATA_FSYNC=always`) loses no
//! submit, cancel, schedule or claim a caller was told succeeded.
//!
//! Why this shape:
//! - One writer thread: the stores append records under their own locks
//!   (cheap: a push onto a queue) and never touch the file; the thread
//!   takes everything queued, writes it in one `write`, and, under
//!   `always`, one `fdatasync` for the lot (group commit). Callers wait for
//!   their record's sequence number on a `watch` channel. File I/O stays
//!   off the async runtime.
//! - `KOO_DATA_FSYNC` as Redis's `appendfsync`: `always` (answered once on
//!   disk), `everysec` (the default: answered once written, so a `kill -9`
//!   of koo loses nothing, and synced every second, so a power loss loses
//!   at most about a second), `no` (the OS syncs when it likes).
//! - Generations: each save first rotates to a new file, then exports the
//!   stores, then writes the save naming that generation, then deletes the
//!   older files. A record is in an older file only if its change was made
//!   before the export, so the save holds it; records in the named file and
//!   later ones are replayed, and replay skips what the save already holds.
//! - A journal past [`COMPACT_BYTES`] asks for a save early, so that replay
//!   and the disk stay bounded whatever the snapshot interval.
//! - JSON lines: the same serde as the save, readable with `jq`. A last line
//!   cut short by a crash is dropped with a warning (its caller was never
//!   answered); a bad line followed by good ones is corruption and stops
//!   start-up, as a bad save does.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::PersistError;
use crate::repeats::Repeats;
use crate::store::memory::journal::{Journal, Record};
use crate::store::{Result, StoreError};

/// A journal this large asks for a save, which starts a new one.
pub const COMPACT_BYTES: u64 = 64 << 20;

/// How long `everysec` leaves written records unsynced at most.
const EVERY: Duration = Duration::from_secs(1);

/// Failed batches remembered for their waiters.
const FAILURES_KEPT: usize = 256;

/// When the journal's writes reach the disk (`KOO_DATA_FSYNC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// A call is answered once its change is on disk.
    Always,
    /// A call is answered once its change is written; the file is synced
    /// every second.
    #[default]
    EverySec,
    /// A call is answered once its change is written; the OS syncs.
    No,
}

impl FromStr for Fsync {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "always" => Ok(Self::Always),
            "everysec" => Ok(Self::EverySec),
            "no" => Ok(Self::No),
            _ => Err(format!(
                "expected always, everysec or no, got {}",
                crate::quote::quote(s)
            )),
        }
    }
}

impl std::fmt::Display for Fsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
            Self::No => "no",
        })
    }
}

/// A journal file's name.
pub fn file_name(generation: u64) -> String {
    format!("journal-{generation:010}.jsonl")
}

/// The journal files in `dir`, oldest first.
pub fn files(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((generation, entry.path()));
    }
    found.sort();
    Ok(found)
}

/// The records of one journal file. A final line without its line end
/// was cut short by a crash before its call was answered (the writer
/// answers once the whole line is written, and cuts a failed write back):
/// dropped, with a warning. So is a final line that does not parse in the
/// newest file (`last`: a torn page). Any other line that does not parse
/// is corruption.
pub fn read(path: &Path, last: bool) -> std::result::Result<Vec<Record>, PersistError> {
    let corrupt = |reason: String| PersistError::Corrupt {
        file: path.to_owned(),
        reason,
    };
    let data = std::fs::read(path).map_err(|source| PersistError::Dir {
        dir: path.to_owned(),
        source,
    })?;
    let mut records = Vec::new();
    let mut lines = data.split_inclusive(|b| *b == b'\n').enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let whole = line.ends_with(b"\n");
        let final_line = lines.peek().is_none();
        match serde_json::from_slice::<Record>(line) {
            Ok(record) if whole => records.push(record),
            parsed => {
                // JSON that is not a record (a newer koo's, say) is not torn
                let torn = !whole || serde_json::from_slice::<serde_json::Value>(line).is_err();
                if final_line && torn && (!whole || last) {
                    tracing::warn!(
                        file = %path.display(),
                        line = i + 1,
                        "the journal's last line is incomplete (cut short by a crash before its call was answered); dropped"
                    );
                    break;
                }
                let why = parsed
                    .err()
                    .map_or_else(|| "no line end".to_owned(), |e| e.to_string());
                return Err(corrupt(format!(
                    "journal line {} does not parse: {why}",
                    i + 1
                )));
            }
        }
    }
    Ok(records)
}

/// Deletes the journal files of generations before `generation` (a save
/// now holds their changes).
pub fn remove_before(dir: &Path, generation: u64) {
    let Ok(found) = files(dir) else { return };
    for (_, path) in found.into_iter().filter(|(g, _)| *g < generation) {
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove an old journal file");
        }
    }
}

enum Item {
    Record(u64, Record),
    Rotate(u64),
}

#[derive(Default)]
struct Queue {
    items: Vec<Item>,
    /// The last record's sequence number.
    last: u64,
    generation: u64,
    closed: bool,
    /// The last record appended before `close`.
    closed_after: u64,
    /// The last record appended before the newest rotation.
    rotated_after: u64,
}

struct Inner {
    dir: PathBuf,
    fsync: Fsync,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The last sequence number handled (written, or failed).
    done: watch::Sender<u64>,
    /// Batches that could not be written, newest first: (first, last, why).
    failures: Mutex<VecDeque<(u64, u64, Arc<str>)>>,
    /// Told when the current file passes [`COMPACT_BYTES`].
    big: Notify,
    /// Bytes in the current file, for `/metrics`.
    bytes: AtomicU64,
    /// Batches that could not be written, for `/metrics`.
    failed_batches: AtomicU64,
}

/// The journal of a data directory: a cheap-to-clone handle on its writer.
#[derive(Clone)]
pub struct FileJournal(Arc<Inner>);

impl FileJournal {
    /// Starts writing generation `generation` in `dir` (appending, should
    /// the file exist).
    pub fn start(dir: &Path, generation: u64, fsync: Fsync) -> std::io::Result<Self> {
        let file = open(dir, generation, fsync)?;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            fsync,
            queue: Mutex::new(Queue {
                generation,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            done: watch::Sender::new(0),
            failures: Mutex::new(VecDeque::new()),
            big: Notify::new(),
            bytes: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
        });
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("koo-journal".into())
            .spawn(move || Writer::new(writer, file).run())?;
        Ok(Self(inner))
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a new file; its generation. Everything appended before is in
    /// older files. When nothing was appended since the last rotation, the
    /// current file (empty) stays, and its generation is the answer: a
    /// save that fails again and again does not leave a file each time.
    pub fn rotate(&self) -> u64 {
        let mut q = self.queue();
        if q.last == q.rotated_after {
            return q.generation;
        }
        q.rotated_after = q.last;
        q.generation += 1;
        let generation = q.generation;
        q.items.push(Item::Rotate(generation));
        self.0.wake.notify_one();
        generation
    }

    /// Resolves when the current file has grown past [`COMPACT_BYTES`].
    pub async fn grown(&self) {
        self.0.big.notified().await;
    }

    /// Writes what is queued, syncs, and stops the writer (at shutdown,
    /// after the final save).
    pub fn close(&self) {
        let mut q = self.queue();
        q.closed = true;
        q.closed_after = q.last;
        drop(q);
        self.0.wake.notify_one();
    }

    /// Bytes in the current file, and batches that could not be written
    /// since koo started.
    pub fn figures(&self) -> (u64, u64) {
        (
            self.0.bytes.load(Ordering::Relaxed),
            self.0.failed_batches.load(Ordering::Relaxed),
        )
    }

    /// Why a record in `first..=last` was not written, if one was not.
    fn failure(&self, first: u64, last: u64) -> Option<Arc<str>> {
        let failures = self
            .0
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        failures
            .iter()
            .find(|(lo, hi, _)| *lo <= last && first <= *hi)
            .map(|(_, _, why)| why.clone())
    }
}

#[async_trait::async_trait]
impl Journal for FileJournal {
    fn append(&self, record: Record) -> u64 {
        let mut q = self.queue();
        q.last += 1;
        let seq = q.last;
        if q.closed {
            // never written: its wait fails (see `Writer::run`)
            return seq;
        }
        let idle = q.items.is_empty();
        q.items.push(Item::Record(seq, record));
        drop(q);
        if idle {
            self.0.wake.notify_one();
        }
        seq
    }

    async fn kept(&self, first: u64, last: u64) -> Result<()> {
        if last == 0 {
            return Ok(());
        }
        let mut done = self.0.done.subscribe();
        done.wait_for(|d| *d >= last)
            .await
            .map_err(|_| StoreError::Unavailable("the journal's writer stopped".into()))?;
        match self.failure(first, last) {
            None => Ok(()),
            Some(why) => Err(StoreError::Unavailable(format!(
                "the change was made but not written to the KOO_DATA_DIR journal ({why}), so it would not survive a crash"
            ))),
        }
    }
}

fn open(dir: &Path, generation: u64, fsync: Fsync) -> std::io::Result<File> {
    let path = dir.join(file_name(generation));
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(&path)?;
    // the new name itself is durable once the directory is synced
    #[cfg(unix)]
    if fsync != Fsync::No {
        File::open(dir)?.sync_all()?;
    }
    Ok(file)
}

/// The writer thread's state.
struct Writer {
    inner: Arc<Inner>,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Why the current file cannot be used (a rotation that failed).
    broken: Option<Arc<str>>,
    /// Written since the last sync.
    dirty: bool,
    last_sync: Instant,
    told_big: bool,
    buf: Vec<u8>,
}

impl Drop for Writer {
    /// A writer that panicked fails every wait, present and future, rather
    /// than leave callers waiting for ever or answered OK unkept.
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(dir = %self.inner.dir.display(), "the KOO_DATA_DIR journal's writer stopped");
            self.inner
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_front((0, u64::MAX, "the journal's writer stopped".into()));
            self.inner.done.send_replace(u64::MAX);
        }
    }
}

impl Writer {
    fn new(inner: Arc<Inner>, file: File) -> Self {
        let size = file.metadata().map_or(0, |m| m.len());
        Self {
            inner,
            file,
            size,
            broken: None,
            dirty: false,
            last_sync: Instant::now(),
            told_big: false,
            buf: Vec::with_capacity(64 << 10),
        }
    }

    fn run(mut self) {
        loop {
            let (items, closed) = self.take();
            let mut range: Option<(u64, u64)> = None;
            let mut result = Ok(());
            for item in items {
                match item {
                    Item::Record(seq, record) => {
                        let start = self.buf.len();
                        match serde_json::to_writer(&mut self.buf, &record) {
                            Ok(()) => self.buf.push(b'\n'),
                            Err(e) => {
                                self.buf.truncate(start);
                                result = Err(std::io::Error::other(e));
                            }
                        }
                        range = Some((range.map_or(seq, |(lo, _)| lo), seq));
                    }
                    Item::Rotate(generation) => {
                        result = result.and_then(|()| self.flush());
                        result = result.and(self.rotate(generation));
                    }
                }
            }
            result = result.and_then(|()| self.flush());
            if self.inner.fsync == Fsync::Always && range.is_some() && result.is_ok() {
                result = self.sync();
            }
            if self.inner.fsync == Fsync::EverySec
                && self.dirty
                && self.last_sync.elapsed() >= EVERY
                && let Err(e) = self.sync()
            {
                tracing::error!(error = %e, "cannot sync the KOO_DATA_DIR journal");
            }
            if let Some((lo, hi)) = range {
                self.report(lo, hi, result);
            }
            self.inner.bytes.store(self.size, Ordering::Relaxed);
            if self.size >= COMPACT_BYTES && !self.told_big {
                self.told_big = true;
                self.inner.big.notify_one();
            }
            if closed {
                if self.dirty {
                    let _ = self.sync();
                }
                self.refuse_from_now();
                return;
            }
        }
    }

    /// Waits for records (or, under `everysec`, for the next sync); takes
    /// everything queued.
    fn take(&mut self) -> (Vec<Item>, bool) {
        let mut q = self
            .inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while q.items.is_empty() && !q.closed {
            let wait = if self.dirty && self.inner.fsync == Fsync::EverySec {
                EVERY.saturating_sub(self.last_sync.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            if wait.is_zero() {
                break;
            }
            q = self
                .inner
                .wake
                .wait_timeout(q, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        (std::mem::take(&mut q.items), q.closed)
    }

    /// After `close`: what is appended from now on is never written, so
    /// its wait fails.
    fn refuse_from_now(&self) {
        let last = self
            .inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .closed_after;
        self.inner
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_front((last + 1, u64::MAX, "koo is stopping".into()));
        self.inner.done.send_replace(u64::MAX);
    }

    /// Writes the buffer. A write that fails part way is cut back, so
    /// that no partial line is followed by whole ones (which the next
    /// start would read as corruption); a file that cannot be cut back is
    /// not written again until the next rotation.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let out = match &self.broken {
            Some(why) => Err(std::io::Error::other(why.to_string())),
            None => self.file.write_all(&self.buf),
        };
        match &out {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                self.dirty = true;
            }
            Err(_) if self.broken.is_none() => {
                if let Err(e) = self.file.set_len(self.size) {
                    self.broken = Some(format!("a failed write could not be cut back: {e}").into());
                }
            }
            Err(_) => {}
        }
        self.buf.clear();
        out
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.dirty = false;
        self.last_sync = Instant::now();
        self.file.sync_data()
    }

    /// Starts file `generation`; an error when the old file's last
    /// records could not be synced (their callers are told).
    fn rotate(&mut self, generation: u64) -> std::io::Result<()> {
        let synced = if self.dirty && self.inner.fsync != Fsync::No {
            self.sync()
        } else {
            Ok(())
        };
        match open(&self.inner.dir, generation, self.inner.fsync) {
            Ok(file) => {
                self.file = file;
                self.size = 0;
                self.broken = None;
                self.told_big = false;
            }
            Err(e) => {
                let path = self.inner.dir.join(file_name(generation));
                tracing::error!(file = %path.display(), error = %e, "cannot start a new KOO_DATA_DIR journal file");
                self.broken = Some(format!("cannot open {}: {e}", path.display()).into());
            }
        }
        synced
    }

    fn report(&self, lo: u64, hi: u64, result: std::io::Result<()>) {
        static FAILING: Repeats = Repeats::new();
        if let Err(e) = result {
            self.inner.failed_batches.fetch_add(1, Ordering::Relaxed);
            let dir = self.inner.dir.display();
            if FAILING.failed("") {
                tracing::error!(error = %e, %dir, "cannot write the KOO_DATA_DIR journal: the changes are made but would not survive a crash, and their callers are told UNAVAILABLE");
            } else {
                tracing::debug!(error = %e, %dir, "cannot write the KOO_DATA_DIR journal");
            }
            let mut failures = self
                .inner
                .failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // full: the two oldest become one range (its waiters may be
            // told of a failure that was not theirs, never the reverse)
            if failures.len() >= FAILURES_KEPT
                && let (Some(older), Some(old)) = (failures.pop_back(), failures.pop_back())
            {
                failures.push_back((older.0.min(old.0), older.1.max(old.1), old.2));
            }
            failures.push_front((lo, hi, e.to_string().into()));
        } else if FAILING.succeeded("") > 0 {
            tracing::info!(dir = %self.inner.dir.display(), "the KOO_DATA_DIR journal is written again");
        }
        self.inner.done.send_replace(hi);
    }
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
