//! The heartbeat's call, flagged to run while Redis is full (Redis 7.0's
//! script flags) or, on a Redis that refuses the flags, unflagged.

use std::time::Duration;

use super::RedisTasks;
use crate::domain::task::TaskId;
use crate::store::{Deadline, Result, StoreError};

impl RedisTasks {
    /// One heartbeat script call: 1, 0, or the cancel's reason (one reply,
    /// no second read).
    pub(super) async fn beat(
        &self,
        id: &TaskId,
        token: u32,
        lease: Duration,
        plain: bool,
        deadline: Deadline,
    ) -> Result<redis::Value> {
        let script = match plain {
            true => &self.scripts().heartbeat_plain,
            false => &self.scripts().heartbeat,
        };
        let mut call = script.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("token", token)
            .arg("lease_ms", super::millis(lease));
        self.store.invoke(call.done(), deadline).await
    }
}

/// Whether `e` is a Redis before 7.0 reading the `#!lua flags=...` line as
/// Lua (`Error compiling script ... unexpected symbol near '#'`).
pub(super) fn refuses_script_flags(e: &StoreError) -> bool {
    let said = e.to_string();
    said.contains("Error compiling script") && said.contains("near '#'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_6_compile_error_is_told_apart() {
        let redis6 = StoreError::Backend(
            "ERR Error compiling script (new function): user_script:1: unexpected symbol near '#'"
                .into(),
        );
        assert!(refuses_script_flags(&redis6));
        let other = StoreError::Backend("ERR Error compiling script: near 'end'".into());
        assert!(!refuses_script_flags(&other));
        assert!(!refuses_script_flags(&StoreError::DeadlineExceeded));
    }
}
