//! The cache's upkeep, run by the upkeep tasks
//! ([`crate::tasks::maintenance`]): a cleanup of what the backend does not
//! expire, a maintenance report with the largest keys, and a warm-up from a
//! request's entries and the warm file.

use std::time::{Duration, SystemTime};

use super::{
    Cache, CacheError, CleanupReport, LargeKey, Level, MaintenanceReport, NewEntry, Result,
    WarmCompute, WarmFailure, WarmReport, warm,
};
use crate::store::Deadline;

/// Entries written per store call by a warm-up.
const WARM_CHUNK: usize = 500;
/// Keys sampled by maintenance to find the largest.
const MAINTENANCE_SAMPLE: usize = 1000;
/// Largest keys reported by maintenance.
const MAINTENANCE_TOP: usize = 10;

impl Cache {
    /// Removes what the backend does not expire by itself.
    pub async fn cleanup(&self, deadline: Deadline) -> Result<CleanupReport> {
        let keys = &self.inner.keys;
        let counts = self
            .inner
            .store
            .cleanup(&keys.cache_pattern(), deadline)
            .await?;
        let since = SystemTime::now() - self.inner.config.record_ttl();
        let stale = self
            .inner
            .store
            .remove_stale_records(
                &keys.cache_metrics_index(),
                since,
                &|m| keys.cache_metrics_record(m),
                deadline,
            )
            .await?;
        Ok(CleanupReport {
            scanned: counts.scanned,
            removed_without_ttl: counts.removed_without_ttl,
            removed_expired: counts.removed_expired,
            removed_stale_instances: stale,
        })
    }

    /// A cleanup, then a memory report with the largest keys of a sample.
    pub async fn maintenance(&self, deadline: Deadline) -> Result<MaintenanceReport> {
        let cleanup = self.cleanup(deadline).await?;
        let memory = self.inner.store.memory(deadline).await?;
        let (sampled_keys, sizes) = self
            .inner
            .store
            .largest_keys(
                &self.inner.keys.cache_pattern(),
                MAINTENANCE_SAMPLE,
                MAINTENANCE_TOP,
                deadline,
            )
            .await?;
        let largest = sizes
            .into_iter()
            .filter_map(|ks| {
                Level::ALL.into_iter().find_map(|level| {
                    self.inner.keys.user_key(level, &ks.key).map(|k| LargeKey {
                        level,
                        key: k.to_owned(),
                        bytes: ks.bytes,
                    })
                })
            })
            .collect();
        Ok(MaintenanceReport {
            cleanup,
            memory,
            sampled_keys,
            largest,
        })
    }

    /// Preloads `entries` (a request's, by index, as parsed from their
    /// warm lines) and, unless `skip_file`, the configured warm file. Bad
    /// entries are reported, not fatal; a warm file that cannot be read fails
    /// the whole warm-up, since it is a configuration error.
    pub async fn warm(
        &self,
        entries: Vec<(u64, std::result::Result<NewEntry, String>)>,
        skip_file: bool,
        deadline: Deadline,
    ) -> Result<WarmReport> {
        let mut report = WarmReport::default();
        let mut valid = Vec::new();
        // `Warm` refuses bad entries before it submits; these checks are for
        // a warm task submitted as any task is (SubmitTask, a schedule),
        // whose arguments nothing checked
        for (i, e) in entries {
            let checked = e.and_then(|e| {
                let ttl = self
                    .check_entry(|| format!("entries[{i}]."), &e)
                    .map_err(|err| err.to_string())?;
                Ok((e, ttl))
            });
            match checked {
                Ok(ok) => valid.push(ok),
                Err(reason) => report.failures.push(WarmFailure {
                    source: "request".to_owned(),
                    line: i,
                    reason,
                }),
            }
        }
        if let (false, Some(path)) = (skip_file, &self.inner.config.warm_file) {
            self.read_warm_file(path, &mut report, &mut valid).await?;
            report.file = Some(path.clone());
        }
        let (entries, ttls): (Vec<NewEntry>, Vec<Duration>) = valid.into_iter().unzip();
        for (entries, ttls) in entries.chunks(WARM_CHUNK).zip(ttls.chunks(WARM_CHUNK)) {
            self.write_all(entries, ttls, deadline).await?;
            self.announce(true, deadline, || Self::set_changes(entries))
                .await;
            report.loaded += entries.len() as u64;
        }
        Ok(report)
    }

    /// Reads the warm file at `path`: its entries, checked, into `valid`;
    /// its task lines into `report.computed`; what is wrong into
    /// `report.failures`. A file that cannot be read is an error.
    async fn read_warm_file(
        &self,
        path: &std::path::Path,
        report: &mut WarmReport,
        valid: &mut Vec<(NewEntry, Duration)>,
    ) -> Result<()> {
        let lines = warm::read(path).await.map_err(|e| CacheError::WarmFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        for (line, parsed) in lines {
            let parsed = match parsed {
                Ok(warm::WarmLine::Task {
                    level,
                    key,
                    ttl,
                    task,
                }) => {
                    match self.check_key(|| "key".to_owned(), &key) {
                        Ok(()) => report.computed.push(WarmCompute {
                            source: path.display().to_string(),
                            line,
                            level,
                            key,
                            ttl_ms: ttl.map(|t| t.as_millis() as u64),
                            task,
                            task_id: None,
                        }),
                        Err(e) => report.failures.push(WarmFailure {
                            source: path.display().to_string(),
                            line,
                            reason: e.to_string(),
                        }),
                    }
                    continue;
                }
                Ok(warm::WarmLine::Entry(e)) => Ok(e),
                Err(e) => Err(e),
            };
            let checked = parsed.and_then(|e| {
                let ttl = self
                    .check_entry(String::new, &e)
                    .map_err(|err| err.to_string())?;
                Ok((e, ttl))
            });
            match checked {
                Ok(ok) => valid.push(ok),
                Err(reason) => report.failures.push(WarmFailure {
                    source: path.display().to_string(),
                    line,
                    reason,
                }),
            }
        }
        Ok(())
    }
}
