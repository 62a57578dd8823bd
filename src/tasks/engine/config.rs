//! The engine's settings: the seed's Celery settings and koo's intervals.

use std::time::Duration;

use crate::domain::task::{Category, QueueName};
use crate::store::tasks::TaskLimits;
use crate::tasks::remote::secret::LeasePolicy;
use crate::tasks::retry::Backoff;

/// Engine settings (the seed's Celery settings and koo's intervals).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskConfig {
    /// Key prefix.
    pub prefix: String,
    /// Lease length; a worker heartbeats at a third of it.
    pub lease: Duration,
    /// How often lapsed leases are looked for.
    pub sweep_interval: Duration,
    /// Late acknowledgement: a lost worker's task runs again (Celery's
    /// `acks_late`); off, it ends FAILED ('worker lost').
    pub acks_late: bool,
    /// Retries when a submit names none.
    pub default_max_retries: u32,
    /// Soft time limit when a submit names none.
    pub soft_time_limit: Duration,
    /// Hard time limit when a submit names none.
    pub time_limit: Duration,
    /// How long results stay readable after the end.
    pub result_ttl: Duration,
    /// Retry spacing.
    pub backoff: Backoff,
    /// Caps on events, history and lease scans.
    pub limits: TaskLimits,
    /// How long an idle worker waits before looking again (a submit in the
    /// same process wakes it at once).
    pub poll_interval: Duration,
    /// How long ended tasks stay in history (database maintenance trims).
    pub history_max_age: Duration,
    /// How long a stopping worker lets a running task finish before it
    /// hands the task back to its queue.
    pub shutdown_grace: Duration,
    /// How long a cancelled handler may take to stop before it is
    /// abandoned.
    pub cancel_grace: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How old a claim of an idempotency key whose task was never stored
    /// must be before another submit takes it over (the claimant's own
    /// store call gets at most half of it).
    pub idempotency_takeover: Duration,
    /// Whether reports without a lease secret are accepted on tasks no
    /// Work stream holds (`KOO_LEASE_SECRETS`, resolved).
    pub lease_secrets: LeasePolicy,
    /// Queues beyond the six category queues (KOO_TASK_QUEUES). Only known
    /// queues accept tasks, so that every queue is swept for lapsed leases.
    pub extra_queues: Vec<QueueName>,
}

impl TaskConfig {
    /// Every queue koo serves: the category queues, then the extra ones.
    pub fn queues(&self) -> Vec<QueueName> {
        let mut queues = Category::queues();
        for q in &self.extra_queues {
            if !queues.contains(q) {
                queues.push(q.clone());
            }
        }
        queues
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            prefix: "koo".to_owned(),
            lease: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(1),
            acks_late: true,
            default_max_retries: 3,
            soft_time_limit: Duration::from_secs(1500),
            time_limit: Duration::from_secs(1800),
            result_ttl: Duration::from_secs(3600),
            backoff: Backoff::default(),
            limits: TaskLimits::default(),
            poll_interval: Duration::from_millis(100),
            history_max_age: Duration::from_secs(7 * 24 * 3600),
            shutdown_grace: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(10),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_takeover: Duration::from_secs(15),
            extra_queues: Vec::new(),
            lease_secrets: LeasePolicy::default(),
        }
    }
}
