//! The heartbeat's call, flagged to run while Redis is full (Redis 7.0's
//! script flags) or, on a Redis that refuses the flags, unflagged; and the
//! take-over's, a heartbeat that moves the lease to another worker.

use std::time::Duration;

use super::{RedisTasks, millis};
use crate::domain::task::TaskId;
use crate::store::tasks::TakeOver;
use crate::store::{Deadline, Result, StoreError};

impl RedisTasks {
    /// `call` flagged to run while Redis is full (`plain` false) or, once a
    /// Redis before 7.0 has refused the flags, unflagged from then on.
    pub(super) async fn flagged<F, Fut>(&self, call: F) -> Result<redis::Value>
    where
        F: Fn(bool) -> Fut,
        Fut: std::future::Future<Output = Result<redis::Value>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let flagless = self.flagless.load(Relaxed);
        match call(flagless).await {
            Err(e) if !flagless && refuses_script_flags(&e) => {
                if !self.flagless.swap(true, Relaxed) {
                    tracing::warn!(
                        "this Redis does not know script flags (Redis 7.0 does): heartbeats and take-overs run unflagged, and fail while Redis is full"
                    );
                }
                call(true).await
            }
            reply => reply,
        }
    }

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
            .arg("lease_ms", millis(lease));
        self.store.invoke(call.done(), deadline).await
    }

    /// One take-over script call (see `TaskBackend::take_over`).
    pub(super) async fn take(
        &self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        deadline: Deadline,
    ) -> Result<TakeOver> {
        let reply = self
            .flagged(|plain| self.take_once(id, token, worker, lease, plain, deadline))
            .await?;
        Ok(take_over_reply(reply))
    }

    /// One take-over script call (`plain`: unflagged).
    async fn take_once(
        &self,
        id: &TaskId,
        token: u32,
        worker: &str,
        lease: Duration,
        plain: bool,
        deadline: Deadline,
    ) -> Result<redis::Value> {
        let script = match plain {
            true => &self.scripts().take_over_plain,
            false => &self.scripts().take_over,
        };
        let mut call = script.call(self.clock());
        call.queue_keys(&self.keys(&id.queue()), Some(id))
            .arg("id", id.as_str())
            .arg("token", token)
            .arg("worker", worker)
            .arg("lease_ms", millis(lease));
        // not repeated on a lost reply: a second call would be fenced by
        // the first one's token
        self.store.invoke_once(call.done(), deadline).await
    }
}

/// take_over.lua's reply: `{token, reason or ''}`, or 0 when fenced.
fn take_over_reply(reply: redis::Value) -> TakeOver {
    let redis::Value::Array(parts) = reply else {
        return TakeOver::Lost;
    };
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    };
    let token = parts.first().and_then(text).and_then(|t| t.parse().ok());
    let reason = parts.get(1).and_then(text).filter(|r| !r.is_empty());
    match token {
        Some(token) => TakeOver::Taken {
            token,
            cancel: reason,
        },
        None => TakeOver::Lost,
    }
}

/// Whether `e` is a Redis before 7.0 reading the `#!lua flags=...` line as
/// Lua (`Error compiling script ... unexpected symbol near '#'`).
fn refuses_script_flags(e: &StoreError) -> bool {
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
