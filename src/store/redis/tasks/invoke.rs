//! Running a task script: again after a lost reply when it is safe to
//! repeat, once when it moves a task.

use crate::store::redis::RedisStore;
use crate::store::{Deadline, Result};

impl RedisStore {
    /// Runs a script that is safe to repeat (it checks before it writes),
    /// with the retries of [`RedisStore::run`].
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        deadline: Deadline,
    ) -> Result<T> {
        self.run(
            deadline,
            |mut c| async move { inv.invoke_async(&mut c).await },
        )
        .await
    }

    /// Runs a script that moves a task, once: after a lost reply, sending it
    /// again could apply it twice.
    pub(super) async fn invoke_once<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        deadline: Deadline,
    ) -> Result<T> {
        self.run_once_command(
            deadline,
            |mut c| async move { inv.invoke_async(&mut c).await },
        )
        .await
    }
}
