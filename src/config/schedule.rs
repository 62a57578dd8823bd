//! The periodic schedules' flags: the seed's defaults and the scheduler's
//! pace (read by `koo serve` and `koo scheduler`).

use std::time::Duration;

use clap::Args;

use super::{ConfigError, parse_positive_duration};
use crate::app::settings::ScheduleSettings;

/// Periodic schedules: the seed's defaults and the scheduler's pace.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// Cache cleanup schedule (cron, five or six fields; `off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_CACHE_CLEANUP",
        value_name = "KOO_SCHEDULE_CACHE_CLEANUP",
        default_value = "*/10 * * * *"
    )]
    pub schedule_cache_cleanup: String,
    /// Cache warming schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_CACHE_WARM",
        value_name = "KOO_SCHEDULE_CACHE_WARM",
        default_value = "*/30 * * * *"
    )]
    pub schedule_cache_warm: String,
    /// Database maintenance schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        value_name = "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        default_value = "0 * * * *"
    )]
    pub schedule_database_maintenance: String,
    /// Health check schedule (`off` to switch it off).
    #[arg(
        long,
        env = "KOO_SCHEDULE_HEALTH_CHECK",
        value_name = "KOO_SCHEDULE_HEALTH_CHECK",
        default_value = "*/5 * * * *"
    )]
    pub schedule_health_check: String,
    /// IANA time zone of the default schedules.
    #[arg(
        long,
        env = "KOO_SCHEDULE_TIME_ZONE",
        value_name = "KOO_SCHEDULE_TIME_ZONE",
        default_value = "UTC"
    )]
    pub schedule_time_zone: String,
    /// How often the scheduler looks for changes made through other koo instances.
    #[arg(long, env = "KOO_SCHEDULE_RELOAD_INTERVAL", value_name = "KOO_SCHEDULE_RELOAD_INTERVAL",
          default_value = "1s", value_parser = parse_positive_duration)]
    pub schedule_reload_interval: Duration,
}

impl ScheduleArgs {
    /// The scheduler's settings (`enabled` says whether this process runs it).
    pub fn settings(&self, enabled: bool) -> Result<ScheduleSettings, ConfigError> {
        let defaults = crate::schedule::defaults::from_config(
            [
                &self.schedule_cache_cleanup,
                &self.schedule_cache_warm,
                &self.schedule_database_maintenance,
                &self.schedule_health_check,
            ],
            &self.schedule_time_zone,
        )
        .map_err(|(variable, reason)| ConfigError { variable, reason })?;
        Ok(ScheduleSettings {
            enabled,
            defaults,
            reload_interval: self.schedule_reload_interval,
        })
    }
}
