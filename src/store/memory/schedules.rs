//! Schedules in this process: one snapshot behind a mutex.
//!
//! A `std::sync::Mutex`, not tokio's: it is never held across an `.await`
//! and every critical section is a map operation or a clone of the (small)
//! schedule set.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::domain::schedule::{Run, Schedule};
use crate::store::schedules::{Put, ScheduleBackend, SchedulesImage, Snapshot};
use crate::store::{Deadline, Result};

/// The embedded schedule store.
#[derive(Debug, Default)]
pub struct MemorySchedules {
    state: Mutex<Snapshot>,
}

impl MemorySchedules {
    /// A store holding `image` (version 1, as if just loaded).
    pub fn from_image(image: SchedulesImage) -> Self {
        Self {
            state: Mutex::new(Snapshot {
                version: 1,
                schedules: image.schedules,
                runs: image.runs.into_iter().collect(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[tonic::async_trait]
impl ScheduleBackend for MemorySchedules {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn version(&self, _deadline: Deadline) -> Result<i64> {
        Ok(self.lock().version)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn snapshot(&self, _deadline: Deadline) -> Result<Snapshot> {
        Ok(self.lock().clone())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn get(
        &self,
        name: &str,
        _deadline: Deadline,
    ) -> Result<Option<(Schedule, Option<Run>)>> {
        let s = self.lock();
        Ok(s.schedules
            .get(name)
            .map(|d| (d.clone(), s.runs.get(name).cloned())))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(name = %schedule.name, ?put))]
    async fn put(&self, schedule: &Schedule, put: Put, _deadline: Deadline) -> Result<bool> {
        let mut s = self.lock();
        let exists = s.schedules.contains_key(&schedule.name);
        if (put == Put::New && exists) || (put == Put::Existing && !exists) {
            return Ok(false);
        }
        s.schedules.insert(schedule.name.clone(), schedule.clone());
        s.version += 1;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn delete(&self, name: &str, _deadline: Deadline) -> Result<bool> {
        let mut s = self.lock();
        s.runs.remove(name);
        let existed = s.schedules.remove(name).is_some();
        if existed {
            s.version += 1;
        }
        Ok(existed)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn record_run(&self, name: &str, run: &Run, _deadline: Deadline) -> Result<()> {
        let mut s = self.lock();
        if !s.schedules.contains_key(name) {
            return Ok(());
        }
        let newer = s.runs.get(name).is_some_and(|r| r.fired_ms > run.fired_ms);
        if !newer {
            s.runs.insert(name.to_owned(), run.clone());
        }
        Ok(())
    }

    fn export(&self) -> Option<SchedulesImage> {
        let s = self.lock();
        Some(SchedulesImage {
            schedules: s.schedules.clone(),
            runs: s.runs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }
}
