//! A schedule as stored: its cron expression and zone, the task template
//! each tick submits, its missed-tick policy, and where it came from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::spec::CronSpec;
use crate::domain::task::{Category, Priority, QueueName};
use crate::tasks::engine::{NewTask, TaskError};

/// What happens to ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedPolicy {
    /// Missed ticks are dropped.
    #[default]
    Skip,
    /// The latest missed tick runs once.
    RunOnce,
}

/// Where a schedule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Created through the API.
    #[default]
    Api,
    /// A default of the configuration.
    Config,
}

/// The task a schedule submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// Handler name.
    pub name: String,
    /// Category (`ai_service`, ...).
    pub category: String,
    /// Positional arguments (a JSON array).
    #[serde(default)]
    pub args: serde_json::Value,
    /// Keyword arguments (a JSON object).
    #[serde(default)]
    pub kwargs: serde_json::Value,
    /// Priority (`low`, `normal`, `high`, `critical`).
    #[serde(default)]
    pub priority: String,
    /// Retries; `None` means the default.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Queue; `None` means the category's.
    #[serde(default)]
    pub queue: Option<String>,
    /// Soft time limit (ms); `None` means the default.
    #[serde(default)]
    pub soft_ms: Option<u64>,
    /// Hard time limit (ms); `None` means the default.
    #[serde(default)]
    pub hard_ms: Option<u64>,
}

impl Template {
    /// A template for `name` in `category` with no arguments.
    pub fn new(name: &str, category: Category) -> Self {
        Self {
            name: name.to_owned(),
            category: category.as_str().to_owned(),
            args: serde_json::json!([]),
            kwargs: serde_json::json!({}),
            priority: "normal".to_owned(),
            max_retries: None,
            queue: None,
            soft_ms: None,
            hard_ms: None,
        }
    }

    /// The task to submit for one firing (`schedule` is recorded on it).
    pub fn to_new_task(&self, schedule: &str) -> Result<NewTask, TaskError> {
        let category = Category::parse(&self.category)
            .ok_or_else(|| TaskError::invalid("task.category", "is required"))?;
        let mut new = NewTask::new(&self.name, category);
        new.priority = if self.priority.is_empty() {
            Priority::Normal
        } else {
            Priority::parse(&self.priority)
                .ok_or_else(|| TaskError::invalid("task.priority", "is unknown"))?
        };
        new.args = if self.args.is_null() {
            "[]".to_owned()
        } else {
            self.args.to_string()
        };
        new.kwargs = if self.kwargs.is_null() {
            "{}".to_owned()
        } else {
            self.kwargs.to_string()
        };
        new.max_retries = self.max_retries;
        new.queue = match &self.queue {
            Some(q) if !q.is_empty() => Some(
                QueueName::parse(q).map_err(|e| TaskError::invalid("task.queue", e.to_string()))?,
            ),
            _ => None,
        };
        new.soft_time_limit = self.soft_ms.map(Duration::from_millis);
        new.time_limit = self.hard_ms.map(Duration::from_millis);
        new.schedule = Some(schedule.to_owned());
        Ok(new)
    }
}

/// A schedule as stored (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Unique name.
    pub name: String,
    /// Cron expression (five or six fields, or an `@` alias).
    pub cron: String,
    /// IANA zone; empty means UTC.
    #[serde(default)]
    pub zone: String,
    /// The task each tick submits.
    pub task: Template,
    /// Missed-tick policy.
    #[serde(default)]
    pub policy: MissedPolicy,
    /// Paused schedules do not fire.
    #[serde(default)]
    pub paused: bool,
    /// Where it came from.
    #[serde(default)]
    pub source: Source,
    /// For configuration defaults: a hash of the configured definition, so
    /// that run-time edits survive restarts until the configuration changes.
    #[serde(default)]
    pub config_hash: Option<String>,
    /// When it was created (ms since the epoch).
    pub created_ms: i64,
    /// When it was last changed (ms): ticks before it are never caught up.
    pub updated_ms: i64,
}

impl Schedule {
    /// Checks everything a client chose; the parsed expression.
    pub fn validate(&self) -> Result<CronSpec, TaskError> {
        check_name(&self.name)?;
        let spec = CronSpec::parse(&self.cron, &self.zone).map_err(|e| match e {
            super::spec::SpecError::UnknownZone(_) => {
                TaskError::invalid("time_zone", e.to_string())
            }
            super::spec::SpecError::InvalidCron { .. } => TaskError::invalid("cron", e.to_string()),
        })?;
        crate::domain::task::check_task_name(&self.task.name)
            .map_err(|e| TaskError::invalid("task.name", e))?;
        if !self.task.args.is_null() && !self.task.args.is_array() {
            return Err(TaskError::invalid("task.args", "must be a list"));
        }
        if !self.task.kwargs.is_null() && !self.task.kwargs.is_object() {
            return Err(TaskError::invalid("task.kwargs", "must be an object"));
        }
        self.task.to_new_task(&self.name)?;
        Ok(spec)
    }
}

/// One firing, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The tick (ms since the epoch); `None` for a trigger.
    pub tick_ms: Option<i64>,
    /// The task submitted.
    pub task_id: String,
    /// Whether TriggerSchedule made it.
    #[serde(default)]
    pub triggered: bool,
    /// When it was submitted (ms).
    pub fired_ms: i64,
}

/// Validates a schedule name: 1 to 128 letters, digits, `_`, `-`, `.`.
pub fn check_name(name: &str) -> Result<(), TaskError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(TaskError::invalid(
            "name",
            format!(
                "must be 1 to 128 letters, digits, '_', '-' or '.', got {}",
                crate::quote::quote(name)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(cron: &str, zone: &str) -> Schedule {
        Schedule {
            name: "nightly".into(),
            cron: cron.into(),
            zone: zone.into(),
            task: Template::new("koo.diagnostics.noop", Category::Research),
            policy: MissedPolicy::Skip,
            paused: false,
            source: Source::Api,
            config_hash: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    /// Refusals name the field and quote the parser.
    #[test]
    fn validation_names_the_field() {
        assert!(schedule("*/5 * * * *", "").validate().is_ok());
        let field = |s: Schedule| match s.validate() {
            Err(TaskError::InvalidArgument { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        };
        let (f, r) = field(schedule("61 * * * *", ""));
        assert_eq!(f, "cron");
        assert!(r.contains("61 * * * *"), "{r}");
        assert_eq!(field(schedule("* * * * *", "Mars/Olympus")).0, "time_zone");
        let mut bad = schedule("* * * * *", "");
        bad.name = "no spaces".into();
        assert_eq!(field(bad).0, "name");
        let mut bad = schedule("* * * * *", "");
        bad.task.priority = "urgent".into();
        assert_eq!(field(bad).0, "task.priority");
    }

    /// A template becomes the task a tick submits, with the schedule on it.
    #[test]
    fn template_to_task() {
        let mut t = Template::new("koo.tasks.cache.cleanup", Category::Cache);
        t.kwargs = serde_json::json!({"level": "api"});
        let new = t.to_new_task("cache-cleanup").unwrap();
        assert_eq!(new.schedule.as_deref(), Some("cache-cleanup"));
        assert_eq!(new.kwargs, r#"{"level":"api"}"#);
        assert_eq!(new.category, Category::Cache);
    }
}
