//! The data directory itself: its lock, and the save file written
//! atomically and read back with its header checked.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{Body, FILE_NAME, FORMAT, LOCK_NAME, PersistError, VERSION};
use crate::store::{fnv1a, unix_millis};

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

/// The locked data directory.
pub(super) struct DataDir {
    pub(super) dir: PathBuf,
    pub(super) file: PathBuf,
    /// Held open for the lock's sake.
    _lock: File,
    /// One save at a time (the periodic one and the final one).
    pub(super) saving: Mutex<()>,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock.
    pub(super) fn lock(dir: &Path) -> Result<Self, PersistError> {
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
    pub(super) fn read(&self) -> Result<Option<Body>, PersistError> {
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
    /// (The caller holds `saving`.)
    pub(super) fn write(&self, body: &Body) -> Result<u64, PersistError> {
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
