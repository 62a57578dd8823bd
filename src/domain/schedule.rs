//! A schedule as stored: its cron expression and zone, the task template
//! each tick submits, its missed-tick policy, where it came from, and its
//! runs. Plain data (serialised as JSON by the stores); checking a schedule
//! and turning its template into a task are the schedule service's
//! (`crate::schedule`), which knows the cron parser and the task engine.

use serde::{Deserialize, Serialize};

use crate::domain::task::Category;

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
    /// Each fired task expires this long (ms) after its submit if not
    /// started by then; `None`: it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after_ms: Option<u64>,
    /// Each fired task's rate-limit key; `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_key: Option<String>,
    /// Each fired task's concurrency key; `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
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
            expire_after_ms: None,
            rate_limit_key: None,
            concurrency_key: None,
        }
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
