//! Flow control's records on Redis (under [`crate::keys::flow_base`], or
//! [`crate::keys::flow_base_cluster`] on a Cluster): the
//! limits hash and its version, a key's back-off, and the live state that
//! GetRateLimit and GetConcurrencyLimit show. The lease script enforces
//! them (`lease.lua`).

use crate::domain::flow::{Limit, LimitState, Scope};
use crate::store::redis::RedisStore;
use crate::store::{Deadline, Result};

impl RedisStore {
    /// Sets `limit` and bumps the version, in one transaction.
    pub(super) async fn set_limit(
        &self,
        base: &str,
        limit: &Limit,
        deadline: Deadline,
    ) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(format!("{base}limits"))
            .arg(limit.field())
            .arg(limit.encode())
            .ignore()
            .cmd("INCR")
            .arg(format!("{base}limits:version"))
            .ignore();
        self.query_pipe::<()>(&pipe, deadline).await
    }

    /// Deletes the limit under `field` (bumping the version when there was
    /// one): whether there was.
    pub(super) async fn delete_limit(
        &self,
        base: &str,
        field: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(format!("{base}limits")).arg(field);
        let (removed,): (u32,) = self.query_pipe(&pipe, deadline).await?;
        if removed > 0 {
            let mut pipe = redis::pipe();
            pipe.cmd("INCR")
                .arg(format!("{base}limits:version"))
                .ignore();
            self.query_pipe::<()>(&pipe, deadline).await?;
        }
        Ok(removed > 0)
    }

    /// Every limit with its state, and the version they were read at;
    /// `offset_ms`: the store clock's, so that times compare with the
    /// scripts' now.
    pub(super) async fn limits(
        &self,
        base: &str,
        offset_ms: i64,
        deadline: Deadline,
    ) -> Result<(u64, Vec<(Limit, LimitState)>)> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(format!("{base}limits:version"))
            .cmd("HGETALL")
            .arg(format!("{base}limits"))
            .cmd("TIME");
        let (version, fields, now): Listing = self.query_pipe(&pipe, deadline).await?;
        let now_ms = now.0 * 1000 + now.1 / 1000 + offset_ms;
        let limits: Vec<Limit> = fields
            .iter()
            .filter_map(|(f, v)| Limit::decode(f, v))
            .collect();
        if limits.is_empty() {
            return Ok((version.unwrap_or(0), Vec::new()));
        }
        // each limit's live state, in one more round trip: two replies each
        let mut pipe = redis::pipe();
        for limit in &limits {
            let (first, second) = state_keys(base, limit);
            pipe.cmd(first.0).arg(first.1);
            pipe.cmd("GET").arg(second);
        }
        let replies: Vec<Option<i64>> = self.query_pipe(&pipe, deadline).await?;
        let out = limits
            .into_iter()
            .zip(replies.chunks(2))
            .map(|(limit, r)| {
                let state = state_of(&limit, r[0], r[1], now_ms);
                (limit, state)
            })
            .collect();
        Ok((version.unwrap_or(0), out))
    }

    /// The limits' version (0 before any was set).
    pub(super) async fn limits_version(&self, base: &str, deadline: Deadline) -> Result<u64> {
        let key = format!("{base}limits:version");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key);
        let (version,): (Option<u64>,) = self.query_pipe(&pipe, deadline).await?;
        Ok(version.unwrap_or(0))
    }
}

/// What the listing's transaction replies: the version, the limits hash,
/// and Redis's `TIME` (seconds, microseconds).
type Listing = (Option<u64>, Vec<(String, String)>, (i64, i64));

/// The two reads of a limit's state: a rate limit's bucket (`GET`, its
/// TAT in µs) and its key's back-off (its end in ms); a cap's running set
/// (`ZCARD`) and nothing (a key no limit uses).
fn state_keys(base: &str, limit: &Limit) -> ((&'static str, String), String) {
    match limit {
        Limit::Rate(r) => {
            let backoff = match &r.scope {
                Scope::Key(k) if k != "*" => format!("{base}backoff:{k}"),
                _ => format!("{base}backoff:"),
            };
            (("GET", format!("{base}rl:{}", r.scope.name())), backoff)
        }
        Limit::Concurrency(c) => (
            ("ZCARD", format!("{base}cc:{}", c.key)),
            format!("{base}backoff:"),
        ),
    }
}

/// A limit's state from its two reads at `now_ms`.
fn state_of(limit: &Limit, first: Option<i64>, second: Option<i64>, now_ms: i64) -> LimitState {
    match limit {
        Limit::Rate(r) => {
            // the next token frees at TAT - tolerance
            let tolerance = (r.interval_us() * u64::from(r.burst.saturating_sub(1))) as i64;
            LimitState {
                next_free_ms: first
                    .map(|tat| (tat - tolerance) / 1000)
                    .filter(|&ms| ms > now_ms),
                backoff_until_ms: second.filter(|&until| until > now_ms),
                running: 0,
            }
        }
        Limit::Concurrency(_) => LimitState {
            running: first.unwrap_or(0) as u32,
            ..LimitState::default()
        },
    }
}
