//! Flow control's records on Redis (see [`crate::keys::flow_base`]): the
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
        prefix: &str,
        limit: &Limit,
        deadline: Deadline,
    ) -> Result<()> {
        let base = crate::keys::flow_base(prefix);
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
        prefix: &str,
        field: &str,
        deadline: Deadline,
    ) -> Result<bool> {
        let base = crate::keys::flow_base(prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(format!("{base}limits"))
            .arg(field)
            .cmd("INCR")
            .arg(format!("{base}limits:version"))
            .ignore();
        let (removed,): (u32,) = self.query_pipe(&pipe, deadline).await?;
        Ok(removed > 0)
    }

    /// Every limit with its state, and the version they were read at.
    pub(super) async fn limits(
        &self,
        prefix: &str,
        offset_ms: i64,
        deadline: Deadline,
    ) -> Result<(u64, Vec<(Limit, LimitState)>)> {
        let base = crate::keys::flow_base(prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(format!("{base}limits:version"))
            .cmd("HGETALL")
            .arg(format!("{base}limits"))
            .cmd("TIME");
        let (version, fields, (secs, micros)): (Option<u64>, Vec<(String, String)>, (i64, i64)) =
            self.query_pipe(&pipe, deadline).await?;
        // on the store's clock, as the scripts see it
        let now_ms = secs * 1000 + micros / 1000 + offset_ms;
        let limits: Vec<Limit> = fields
            .iter()
            .filter_map(|(f, v)| Limit::decode(f, v))
            .collect();
        // each limit's live state, in one more round trip
        let mut pipe = redis::pipe();
        for limit in &limits {
            match limit {
                Limit::Rate(r) => {
                    pipe.cmd("GET").arg(format!("{base}rl:{}", r.scope.name()));
                    match &r.scope {
                        Scope::Key(k) if k != "*" => {
                            pipe.cmd("GET").arg(format!("{base}backoff:{k}"));
                        }
                        _ => {
                            pipe.cmd("ECHO").arg(-2);
                        }
                    }
                }
                Limit::Concurrency(c) => {
                    pipe.cmd("ZCARD").arg(format!("{base}cc:{}", c.key));
                    pipe.cmd("ECHO").arg(-2);
                }
            }
        }
        let states: Vec<redis::Value> = if limits.is_empty() {
            Vec::new()
        } else {
            self.query_pipe(&pipe, deadline).await?
        };
        let int = |v: &redis::Value| -> Option<i64> {
            match v {
                redis::Value::Int(n) => Some(*n),
                redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            }
        };
        let out = limits
            .into_iter()
            .enumerate()
            .map(|(i, limit)| {
                let first = states.get(2 * i).and_then(int);
                let second = states.get(2 * i + 1).and_then(int);
                let state = match &limit {
                    Limit::Rate(r) => {
                        // the bucket's TAT, in µs: its next token frees at
                        // TAT - tolerance
                        let tolerance = r.interval_us() * u64::from(r.burst.saturating_sub(1));
                        let free_ms = first.map(|tat| (tat - tolerance as i64) / 1000);
                        LimitState {
                            next_free_ms: free_ms.filter(|&ms| ms > now_ms),
                            backoff_until_ms: second.filter(|&until| until > now_ms),
                            running: 0,
                        }
                    }
                    Limit::Concurrency(_) => LimitState {
                        running: first.unwrap_or(0) as u32,
                        ..LimitState::default()
                    },
                };
                (limit, state)
            })
            .collect();
        Ok((version.unwrap_or(0), out))
    }

    /// The limits' version (0 before any was set).
    pub(super) async fn limits_version(&self, prefix: &str, deadline: Deadline) -> Result<u64> {
        let key = format!("{}limits:version", crate::keys::flow_base(prefix));
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(key);
        let (version,): (Option<u64>,) = self.query_pipe(&pipe, deadline).await?;
        Ok(version.unwrap_or(0))
    }
}
