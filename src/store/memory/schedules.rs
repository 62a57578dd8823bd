//! Schedules in this process: one snapshot behind a mutex.
//!
//! A `std::sync::Mutex`, not tokio's: it is never held across an `.await`
//! and every critical section is a map operation or a clone of the (small)
//! schedule set.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::journal::{Journal, JournalSlot, Record};

use crate::domain::schedule::{Run, Schedule};
use crate::store::schedules::{Put, ScheduleBackend, SchedulesImage, Snapshot};
use crate::store::{Deadline, Result};

/// The embedded schedule store.
#[derive(Debug, Default)]
pub struct MemorySchedules {
    state: Mutex<Snapshot>,
    /// With `KOO_DATA_DIR`: where changes are appended.
    journal: JournalSlot,
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
            journal: JournalSlot::default(),
        }
    }

    /// Sets where changes are appended (`crate::persist`).
    pub fn set_journal(&self, journal: Arc<dyn Journal>) {
        self.journal.set(journal);
    }

    /// Applies journaled records in order (before the store serves): puts,
    /// deletes and runs, copied; records of other stores are skipped. How
    /// many applied.
    pub fn replay<'a>(&self, records: impl IntoIterator<Item = &'a Record>) -> u64 {
        let mut s = self.lock();
        let mut applied = 0;
        for record in records {
            match record {
                Record::PutSchedule { schedule } => {
                    s.schedules
                        .insert(schedule.name.clone(), (**schedule).clone());
                    s.version += 1;
                }
                Record::DeleteSchedule { name } => {
                    s.runs.remove(name);
                    if s.schedules.remove(name).is_some() {
                        s.version += 1;
                    }
                }
                Record::ScheduleRun { name, run } => {
                    let newer = s.runs.get(name).is_some_and(|r| r.fired_ms > run.fired_ms);
                    if s.schedules.contains_key(name) && !newer {
                        s.runs.insert(name.clone(), run.clone());
                    }
                }
                _ => continue,
            }
            applied += 1;
        }
        applied
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
        let seq = {
            let mut s = self.lock();
            let exists = s.schedules.contains_key(&schedule.name);
            if (put == Put::New && exists) || (put == Put::Existing && !exists) {
                return Ok(false);
            }
            s.schedules.insert(schedule.name.clone(), schedule.clone());
            s.version += 1;
            self.journal.append(|| {
                Some(Record::PutSchedule {
                    schedule: Box::new(schedule.clone()),
                })
            })
        };
        self.journal.kept(seq).await?;
        Ok(true)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn delete(&self, name: &str, _deadline: Deadline) -> Result<bool> {
        let (existed, seq) = {
            let mut s = self.lock();
            s.runs.remove(name);
            let existed = s.schedules.remove(name).is_some();
            if existed {
                s.version += 1;
            }
            let seq = self.journal.append(|| {
                existed.then(|| Record::DeleteSchedule {
                    name: name.to_owned(),
                })
            });
            (existed, seq)
        };
        self.journal.kept(seq).await?;
        Ok(existed)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(%name))]
    async fn record_run(&self, name: &str, run: &Run, _deadline: Deadline) -> Result<()> {
        let seq = {
            let mut s = self.lock();
            if !s.schedules.contains_key(name) {
                return Ok(());
            }
            let newer = s.runs.get(name).is_some_and(|r| r.fired_ms > run.fired_ms);
            if newer {
                return Ok(());
            }
            s.runs.insert(name.to_owned(), run.clone());
            self.journal.append(|| {
                Some(Record::ScheduleRun {
                    name: name.to_owned(),
                    run: run.clone(),
                })
            })
        };
        self.journal.kept(seq).await
    }

    fn export(&self) -> Option<SchedulesImage> {
        let s = self.lock();
        Some(SchedulesImage {
            schedules: s.schedules.clone(),
            runs: s.runs.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }
}
