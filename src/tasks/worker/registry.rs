//! What a built-in worker runs: handlers by task name, and what a handler
//! gets (the task, a cancellation token, progress reports).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::tasks::engine::{TaskEngine, TaskError};

/// A handler's failure; `retryable` asks for another attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// What went wrong.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What a handler gets: the task, a token that fires at the soft time limit
/// (or on cancellation), and a way to report progress.
pub struct TaskContext {
    /// The task as leased (attempts counts this attempt).
    pub task: Task,
    /// Fires when the handler should stop.
    pub cancel: CancellationToken,
    pub(super) engine: TaskEngine,
}

impl TaskContext {
    /// Reports progress; an error means the lease is gone and the handler
    /// should stop.
    pub async fn progress(
        &self,
        percent: f64,
        message: &str,
        metadata: serde_json::Value,
    ) -> Result<(), TaskError> {
        let progress =
            serde_json::json!({ "percent": percent, "message": message, "metadata": metadata });
        self.engine
            .progress(
                &self.task.id,
                self.task.token,
                &progress.to_string(),
                Deadline::after(Duration::from_secs(5)),
            )
            .await
    }

    /// The results of the tasks this one depended on (each SUCCEEDED before
    /// it was queued), in `depends_on` order: `(id, result JSON)`, the
    /// result `None` once it has expired (`RESULT_EXPIRES` after its end).
    pub async fn dependency_results(&self) -> Vec<(String, Option<serde_json::Value>)> {
        let mut out = Vec::with_capacity(self.task.depends_on.len());
        for id in &self.task.depends_on {
            let result = self
                .engine
                .get(id, Deadline::after(Duration::from_secs(5)))
                .await
                .ok()
                .and_then(|t| t.result)
                .and_then(|r| serde_json::from_str(&r).ok());
            out.push((id.clone(), result));
        }
        out
    }
}

/// A handler's future.
pub type HandlerFuture =
    Pin<Box<dyn Future<Output = Result<serde_json::Value, HandlerError>> + Send>>;

/// A task handler: an async function of the task's context.
pub type Handler = Arc<dyn Fn(TaskContext) -> HandlerFuture + Send + Sync>;

/// Handlers by task name.
#[derive(Clone, Default)]
pub struct Registry {
    pub(super) handlers: HashMap<String, Handler>,
    /// Where results of tasks that ask for it are cached.
    pub(super) cache: Option<Cache>,
}

impl Registry {
    /// Results of tasks submitted with a cache target go to `cache`.
    pub fn set_cache(&mut self, cache: Cache) {
        self.cache = Some(cache);
    }

    /// Registers `handler` for `name`.
    pub fn register<F, Fut>(&mut self, name: &str, handler: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'static,
    {
        self.handlers
            .insert(name.to_owned(), Arc::new(move |ctx| Box::pin(handler(ctx))));
    }

    /// The names served, for leasing.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.handlers.keys().cloned().collect();
        names.sort();
        names
    }
}
