//! Live streams that cost the engine nothing: the watch cache.
//!
//! Dashboards hold thousands of streams open. Following the Kubernetes API
//! server's watch cache, koo reads each queue's events **once per process**
//! ([`feed`]), decodes them once and fans them out in memory to every
//! watcher through an index (by task id, by task name, or all), so a watcher
//! that matches nothing costs nothing per event. Each watcher has a bounded
//! buffer ([`sink`]): a slow one has its progress events merged, and one
//! that stays behind is ended with its resume token rather than allowed to
//! grow koo's memory. Periodic metrics streams are computed once per interval
//! and shared ([`ticker`]).
//!
//! This module also keeps the per-process count of watchers
//! ([`Watchers`]): the `KOO_MAX_WATCHERS` limit and the stream figures that
//! `GetTaskMetrics` reports.

pub mod compute;
pub mod feed;
pub mod queues;
mod rate;
pub mod resume;
pub mod sink;
pub mod task;
pub mod ticker;
pub mod upkeep;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use feed::{Event, Filter, Hub, Subscription};
pub use queues::{Delivered, QueuesFilter, QueuesWatch};
pub use sink::{Next, Overflow};
pub use task::TaskWatch;
pub use ticker::Ticker;

use crate::store::StoreError;
use crate::tasks::engine::TaskError;

/// The kinds of watch stream, counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `TaskService.WatchTask`: one task.
    Task = 0,
    /// `TaskService.WatchTasks`: a queue's events.
    Tasks = 1,
    /// `TaskService.WatchTaskMetrics`.
    TaskMetrics = 2,
    /// `CacheService.WatchMetrics`.
    CacheMetrics = 3,
    /// `CacheService.WatchInvalidations`.
    CacheInvalidations = 4,
}

/// Why a watcher was refused or ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WatchError {
    /// `KOO_MAX_WATCHERS` streams are open already.
    #[error(
        "koo already serves its limit of {max} watch streams (KOO_MAX_WATCHERS); close some streams or raise the limit"
    )]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// The watcher left `KOO_WATCH_BUFFER` events unread.
    #[error(
        "this watcher fell behind: it left {buffer} events unread (KOO_WATCH_BUFFER); watch again with the resume token in the error details to continue after the last event it received"
    )]
    FellBehind {
        /// The buffer's bound.
        buffer: usize,
        /// Where to resume (a WatchTasks resume token).
        resume_token: String,
    },
    /// Events were lost before they could be read (the queue's stream was
    /// trimmed past this process's reader while it could not read).
    #[error(
        "events of queue {queue} were trimmed before koo could read them; watch again without a resume token"
    )]
    Gap {
        /// The queue.
        queue: String,
    },
    /// A resume token koo did not issue, or one whose positions the store
    /// does not know.
    #[error("resume_token: {reason}")]
    ResumeToken {
        /// Why.
        reason: String,
    },
    /// The queue's feed stopped while koo keeps running (its reader
    /// failed): the client should watch again.
    #[error("task events stopped; watch again")]
    Stopped,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading the watched task failed.
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// The per-process watcher count and stream figures: a cheap-to-clone
/// handle shared by every watch RPC.
#[derive(Clone)]
pub struct Watchers {
    inner: Arc<Counts>,
}

struct Counts {
    max: usize,
    open: AtomicUsize,
    by_kind: [AtomicUsize; 5],
    fanned_out: AtomicU64,
    fell_behind: AtomicU64,
    readers: AtomicUsize,
}

/// A point-in-time copy of the stream figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// `KOO_MAX_WATCHERS`.
    pub max: usize,
    /// Open streams by [`Kind`].
    pub by_kind: [usize; 5],
    /// Events handed to watchers' buffers since start (one per watcher).
    pub fanned_out: u64,
    /// Watchers ended because they fell behind, since start.
    pub fell_behind: u64,
    /// Queue readers running (one per watched queue).
    pub readers: usize,
}

impl Watchers {
    /// A registry admitting at most `max` watchers at once.
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Counts {
                max,
                open: AtomicUsize::new(0),
                by_kind: Default::default(),
                fanned_out: AtomicU64::new(0),
                fell_behind: AtomicU64::new(0),
                readers: AtomicUsize::new(0),
            }),
        }
    }

    /// Admits one watcher of `kind`, or refuses it over the limit. The
    /// watcher counts until the returned permit is dropped (its stream ends).
    pub fn admit(&self, kind: Kind) -> Result<Permit, WatchError> {
        let c = &self.inner;
        if c.open.fetch_add(1, Ordering::AcqRel) >= c.max {
            c.open.fetch_sub(1, Ordering::AcqRel);
            return Err(WatchError::TooMany { max: c.max });
        }
        c.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        Ok(Permit {
            counts: self.inner.clone(),
            kind,
        })
    }

    /// The figures now.
    pub fn figures(&self) -> Figures {
        let c = &self.inner;
        Figures {
            max: c.max,
            by_kind: std::array::from_fn(|k| c.by_kind[k].load(Ordering::Relaxed)),
            fanned_out: c.fanned_out.load(Ordering::Relaxed),
            fell_behind: c.fell_behind.load(Ordering::Relaxed),
            readers: c.readers.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_fanned_out(&self, n: u64) {
        if n > 0 {
            self.inner.fanned_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `n` watchers ended for falling behind.
    pub(crate) fn add_fell_behind(&self, n: usize) {
        if n > 0 {
            self.inner
                .fell_behind
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn reader_started(&self) {
        self.inner.readers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reader_stopped(&self) {
        self.inner.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted watcher; dropping it (when the stream ends, however it
/// ends) gives its place back.
pub struct Permit {
    counts: Arc<Counts>,
    kind: Kind,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.counts.by_kind[self.kind as usize].fetch_sub(1, Ordering::Relaxed);
        self.counts.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_admits_exactly_max_and_a_dropped_permit_frees_its_place() {
        let w = Watchers::new(2);
        let a = w.admit(Kind::Task).unwrap();
        let _b = w.admit(Kind::Tasks).unwrap();
        assert!(matches!(
            w.admit(Kind::Task),
            Err(WatchError::TooMany { max: 2 })
        ));
        assert_eq!(w.figures().by_kind, [1, 1, 0, 0, 0]);
        drop(a);
        let _c = w.admit(Kind::CacheMetrics).unwrap();
        assert_eq!(w.figures().by_kind, [0, 1, 0, 1, 0]);
    }
}
