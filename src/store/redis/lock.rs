//! Compute locks on Redis (see [`crate::store::lock`]): one short script
//! per transition, so that "take unless held" and "release only if mine"
//! are atomic.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{FromRedisValue, Script};

use super::RedisStore;
use super::kv::ttl_millis;
use crate::store::{Deadline, LockState, Result, StoreError};

static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lock/acquire.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lock/release.lua")));
static UPDATE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/lock/update.lua")));

impl RedisStore {
    /// Takes `lock` under `token` for `ttl` unless someone holds it.
    pub(super) async fn lock_take(
        &self,
        lock: &str,
        token: &str,
        ttl: Duration,
        deadline: Deadline,
    ) -> Result<LockState> {
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation.key(lock).arg(token).arg(ttl_millis(ttl));
        let invocation = &invocation;
        let reply: Vec<redis::Value> = self
            .run(deadline, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        let state = parse_take(reply)?;
        // A retried call may meet the lock its first attempt took.
        Ok(match state {
            LockState::Held { value, .. } if value == token => LockState::Acquired,
            other => other,
        })
    }

    /// The lock's value and time left, if it is held.
    pub(super) async fn lock_peek(
        &self,
        lock: &str,
        deadline: Deadline,
    ) -> Result<Option<(String, Duration)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(lock).cmd("PTTL").arg(lock);
        let (value, left): (Option<String>, i64) = self.query_pipe(&pipe, deadline).await?;
        Ok(value.map(|v| (v, Duration::from_millis(left.max(0) as u64))))
    }

    /// Replaces the value of `lock` if `token` holds it; whether it did.
    pub(super) async fn lock_replace(
        &self,
        lock: &str,
        token: &str,
        value: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut invocation = UPDATE.prepare_invoke();
        invocation.key(lock).arg(token).arg(value);
        let invocation = &invocation;
        let n: i64 = self
            .run(deadline, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(n == 1)
    }

    /// Deletes `lock` if `token` holds it; whether it did.
    pub(super) async fn lock_drop(
        &self,
        lock: &str,
        token: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut invocation = RELEASE.prepare_invoke();
        invocation.key(lock).arg(token);
        let invocation = &invocation;
        let n: i64 = self
            .run(deadline, |mut c| async move {
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Ok(n == 1)
    }
}

/// `{1}` or `{0, value, pttl}`.
fn parse_take(reply: Vec<redis::Value>) -> Result<LockState> {
    let bad = || StoreError::Backend("unexpected reply from the lock script".into());
    let mut it = reply.into_iter();
    let taken = i64::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
    if taken == 1 {
        return Ok(LockState::Acquired);
    }
    let value = String::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
    let left = i64::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
    Ok(LockState::Held {
        value,
        left: Duration::from_millis(left.max(0) as u64),
    })
}
