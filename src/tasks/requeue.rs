//! Queueing named ended tasks again, in order (`RequeueDeadLetters` with
//! ids): each as [`TaskEngine::retry`] does, stopping at the first that
//! cannot be, so that the caller learns which were requeued before it and
//! can retry the rest.

use super::engine::{TaskEngine, TaskError};
use crate::store::Deadline;

/// Why requeueing stopped: the id at `index` could not be requeued.
#[derive(Debug, Clone, thiserror::Error)]
#[error("id {index}: {error} (requeued before it: {})", requeued.len())]
pub struct RequeueError {
    /// The id's place in the request.
    pub index: usize,
    /// The ids requeued before it, in order.
    pub requeued: Vec<String>,
    /// Why it could not be.
    pub error: TaskError,
}

impl TaskEngine {
    /// Requeues `ids` in order; the ids requeued (all of them).
    pub async fn retry_each(
        &self,
        ids: &[String],
        deadline: Deadline,
    ) -> Result<Vec<String>, RequeueError> {
        let mut requeued = Vec::with_capacity(ids.len());
        for (index, id) in ids.iter().enumerate() {
            match self.retry(id, deadline).await {
                Ok(task) => requeued.push(task.id.to_string()),
                Err(error) => {
                    return Err(RequeueError {
                        index,
                        requeued,
                        error,
                    });
                }
            }
        }
        Ok(requeued)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::task::Category;
    use crate::store::tasks::TaskStore;
    use crate::tasks::engine::{NewTask, TaskConfig};

    /// Requeueing stops at the first id that cannot be, saying where and
    /// what came before it.
    #[tokio::test]
    async fn stops_at_the_first_id_that_cannot_be_requeued() {
        let engine = TaskEngine::new(TaskStore::memory(), TaskConfig::default());
        let deadline = Deadline::after(Duration::from_secs(5));
        let task = engine
            .submit(NewTask::new("t", Category::Research), deadline)
            .await
            .unwrap();
        let ids = vec![task.id.to_string(), "not an id".to_owned()];
        let e = engine.retry_each(&ids, deadline).await.unwrap_err();
        assert_eq!(e.index, 0, "a queued task is not ended: {e}");
        assert!(e.requeued.is_empty());
        assert!(matches!(e.error, TaskError::FailedPrecondition(_)));
        let e = engine.retry_each(&ids[1..], deadline).await.unwrap_err();
        assert!(matches!(e.error, TaskError::InvalidArgument { .. }));
        assert_eq!(
            engine.retry_each(&[], deadline).await.unwrap(),
            Vec::<String>::new()
        );
    }
}
