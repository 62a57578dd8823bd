//! The seed's maintenance schedule, as defaults the configuration can change
//! or switch off: cache cleanup every 10 minutes, cache warming every 30,
//! database maintenance every hour, health checks every 5.

use super::spec::CronSpec;
use crate::domain::schedule::{MissedPolicy, Schedule, Source, Template};
use crate::domain::task::{Category, names};
use crate::tasks::maintenance::{CACHE_CLEANUP, CACHE_WARM, DATABASE_MAINTENANCE};

/// One default schedule as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct Default {
    /// The schedule's name.
    pub name: String,
    /// The variable that configures it.
    pub variable: &'static str,
    /// Its expression; `None` when switched off (`off`).
    pub cron: Option<String>,
    /// Its zone.
    pub zone: String,
    /// Its task.
    pub task: Template,
}

/// The defaults: (name, variable, default expression, task name, category).
const TABLE: [(&str, &str, &str, &str, Category); 4] = [
    (
        "cache-cleanup",
        "KOO_SCHEDULE_CACHE_CLEANUP",
        "*/10 * * * *",
        CACHE_CLEANUP,
        Category::Cache,
    ),
    (
        "cache-warm",
        "KOO_SCHEDULE_CACHE_WARM",
        "*/30 * * * *",
        CACHE_WARM,
        Category::Cache,
    ),
    (
        "database-maintenance",
        "KOO_SCHEDULE_DATABASE_MAINTENANCE",
        "0 * * * *",
        DATABASE_MAINTENANCE,
        Category::Database,
    ),
    (
        "health-check",
        "KOO_SCHEDULE_HEALTH_CHECK",
        "*/5 * * * *",
        names::HEALTH_CHECK,
        Category::HealthCheck,
    ),
];

/// The default expression of each variable, for the command line's help.
pub fn default_cron(variable: &str) -> &'static str {
    TABLE
        .iter()
        .find(|t| t.1 == variable)
        .map_or("off", |t| t.2)
}

/// The variable configuring the default named `name`, if it is one.
pub fn variable_of(name: &str) -> Option<&'static str> {
    TABLE.iter().find(|t| t.0 == name).map(|t| t.1)
}

/// The defaults from configured expressions, in the order of `TABLE`
/// (`cache-cleanup`, `cache-warm`, `database-maintenance`, `health-check`);
/// `off` switches one off. An invalid expression or zone is an error naming
/// its variable.
pub fn from_config(crons: [&str; 4], zone: &str) -> Result<Vec<Default>, (&'static str, String)> {
    if let Err(e) = CronSpec::parse("* * * * *", zone) {
        return Err(("KOO_SCHEDULE_TIME_ZONE", e.to_string()));
    }
    let mut out = Vec::with_capacity(4);
    for ((name, variable, _, task, category), cron) in TABLE.into_iter().zip(crons) {
        let cron = cron.trim();
        let cron = if cron.eq_ignore_ascii_case("off") {
            None
        } else {
            CronSpec::parse(cron, zone).map_err(|e| (variable, e.to_string()))?;
            Some(cron.to_owned())
        };
        out.push(Default {
            name: name.to_owned(),
            variable,
            cron,
            zone: zone.to_owned(),
            task: Template::new(task, category),
        });
    }
    Ok(out)
}

impl Default {
    /// A hash of the configured definition: a stored default made from the
    /// same definition keeps its run-time edits.
    pub fn hash(&self) -> String {
        let text = format!(
            "{}\0{}\0{}",
            self.cron.as_deref().unwrap_or("off"),
            self.zone,
            serde_json::to_string(&self.task).unwrap_or_default()
        );
        format!("{:016x}", crate::store::fnv1a(text.as_bytes()))
    }

    /// The schedule to store, when switched on.
    pub fn schedule(&self, now_ms: i64) -> Option<Schedule> {
        Some(Schedule {
            name: self.name.clone(),
            cron: self.cron.clone()?,
            zone: self.zone.clone(),
            task: self.task.clone(),
            policy: MissedPolicy::Skip,
            paused: false,
            source: Source::Config,
            config_hash: Some(self.hash()),
            created_ms: now_ms,
            updated_ms: now_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's schedule by default; `off` switches one off; a bad
    /// expression names its variable.
    #[test]
    fn defaults_from_config() {
        let d = from_config(
            [
                default_cron("KOO_SCHEDULE_CACHE_CLEANUP"),
                "off",
                "0 * * * *",
                "*/5 * * * *",
            ],
            "UTC",
        )
        .unwrap();
        assert_eq!(d[0].cron.as_deref(), Some("*/10 * * * *"));
        assert_eq!(d[0].task.name, CACHE_CLEANUP);
        assert_eq!(d[1].cron, None);
        assert!(d[1].schedule(0).is_none());
        assert_eq!(d[3].task.category, "health_check");
        let err = from_config(["nope", "off", "off", "off"], "UTC").unwrap_err();
        assert_eq!(err.0, "KOO_SCHEDULE_CACHE_CLEANUP");
        assert!(err.1.contains("nope"), "{}", err.1);
        assert_eq!(
            from_config(["off"; 4], "Mars/Olympus").unwrap_err().0,
            "KOO_SCHEDULE_TIME_ZONE"
        );
        assert_ne!(d[0].hash(), d[2].hash());
    }
}
