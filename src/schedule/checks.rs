//! What a schedule must satisfy, and the task its template submits: the
//! checks that need the cron parser and the task model, kept out of the
//! plain schedule data (`crate::domain::schedule`).

use std::time::Duration;

use super::error::ScheduleError;
use super::spec::{CronSpec, SpecError};
use crate::domain::schedule::{Schedule, Template};
use crate::domain::task::{Category, Priority, QueueName};
use crate::tasks::engine::{Expiry, NewTask};

/// Checks everything a client chose of `schedule`; the parsed expression.
pub fn validate(schedule: &Schedule) -> Result<CronSpec, ScheduleError> {
    check_name(&schedule.name)?;
    let spec = CronSpec::parse(&schedule.cron, &schedule.zone).map_err(|e| match e {
        SpecError::UnknownZone(_) => ScheduleError::invalid("time_zone", e.to_string()),
        SpecError::InvalidCron { .. } => ScheduleError::invalid("cron", e.to_string()),
    })?;
    crate::domain::task::check_task_name(&schedule.task.name)
        .map_err(|e| ScheduleError::invalid("task.name", e))?;
    if !schedule.task.args.is_null() && !schedule.task.args.is_array() {
        return Err(ScheduleError::invalid("task.args", "must be a list"));
    }
    if !schedule.task.kwargs.is_null() && !schedule.task.kwargs.is_object() {
        return Err(ScheduleError::invalid("task.kwargs", "must be an object"));
    }
    new_task(&schedule.task, &schedule.name)?;
    Ok(spec)
}

/// The task a template submits for one firing of `schedule` (recorded on it).
pub fn new_task(template: &Template, schedule: &str) -> Result<NewTask, ScheduleError> {
    let category = Category::parse(&template.category)
        .ok_or_else(|| ScheduleError::invalid("task.category", "is required"))?;
    let mut new = NewTask::new(&template.name, category);
    new.priority = if template.priority.is_empty() {
        Priority::Normal
    } else {
        Priority::parse(&template.priority)
            .ok_or_else(|| ScheduleError::invalid("task.priority", "is unknown"))?
    };
    new.args = if template.args.is_null() {
        "[]".to_owned()
    } else {
        template.args.to_string()
    };
    new.kwargs = if template.kwargs.is_null() {
        "{}".to_owned()
    } else {
        template.kwargs.to_string()
    };
    new.max_retries = template.max_retries;
    new.queue = match &template.queue {
        Some(q) if !q.is_empty() => Some(
            QueueName::parse(q).map_err(|e| ScheduleError::invalid("task.queue", e.to_string()))?,
        ),
        _ => None,
    };
    new.soft_time_limit = template.soft_ms.map(Duration::from_millis);
    new.time_limit = template.hard_ms.map(Duration::from_millis);
    new.expires = template
        .expire_after_ms
        .map(|ms| Expiry::After(Duration::from_millis(ms)));
    new.rate_limit_key = template.rate_limit_key.clone();
    new.concurrency_key = template.concurrency_key.clone();
    new.schedule = Some(schedule.to_owned());
    Ok(new)
}

/// Validates a schedule name: 1 to 128 letters, digits, `_`, `-`, `.`.
pub fn check_name(name: &str) -> Result<(), ScheduleError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ScheduleError::invalid(
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
    use crate::domain::schedule::{MissedPolicy, Source};

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
        assert!(validate(&schedule("*/5 * * * *", "")).is_ok());
        let field = |s: Schedule| match validate(&s) {
            Err(ScheduleError::InvalidArgument { field, reason }) => (field, reason),
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
        let new = new_task(&t, "cache-cleanup").unwrap();
        assert_eq!(new.schedule.as_deref(), Some("cache-cleanup"));
        assert_eq!(new.kwargs, r#"{"level":"api"}"#);
        assert_eq!(new.category, Category::Cache);
        assert_eq!((new.rate_limit_key, new.concurrency_key), (None, None));
        t.rate_limit_key = Some("openai".into());
        t.concurrency_key = Some("tenant-1".into());
        let new = new_task(&t, "cache-cleanup").unwrap();
        assert_eq!(new.rate_limit_key.as_deref(), Some("openai"));
        assert_eq!(new.concurrency_key.as_deref(), Some("tenant-1"));
    }

    /// A template stored before flow control reads without keys, and one
    /// without keys is stored without them (additive).
    #[test]
    fn keys_are_additive_in_the_stored_template() {
        let t = Template::new("koo.tasks.cache.cleanup", Category::Cache);
        let json = serde_json::to_string(&t).unwrap();
        assert!(!json.contains("rate_limit_key"), "{json}");
        let back: Template = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }
}
