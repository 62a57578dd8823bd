//! Redis settings shared by `koo serve`, `koo worker` and `koo scheduler`:
//! the URL (TLS and ACL users included), the pool, retries and the breaker.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};

use super::{ConfigError, RedisTlsArgs, parse_duration, parse_positive_duration};
use crate::store::RedisConfig;
use crate::store::redis::url as redis_url;

/// Redis settings shared by `koo serve`, `koo worker` and `koo scheduler`.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis URL (`redis[s]://[user:password@]host:port/db`; `rediss://` is
    /// TLS). Without it koo keeps the cache in process (the embedded store:
    /// not shared, not durable).
    #[arg(long, env = "REDIS_URL", value_name = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Multiplexed connections to Redis.
    #[arg(long, env = "REDIS_MAX_CONNECTIONS", value_name = "REDIS_MAX_CONNECTIONS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub redis_max_connections: u32,
    /// Whether a Redis call that timed out is retried (within its deadline).
    #[arg(long, env = "REDIS_RETRY_ON_TIMEOUT", value_name = "REDIS_RETRY_ON_TIMEOUT", default_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub redis_retry_on_timeout: bool,
    /// Whether TCP keepalive is enabled on Redis connections.
    #[arg(long, env = "REDIS_SOCKET_KEEPALIVE", value_name = "REDIS_SOCKET_KEEPALIVE", default_value = "true",
          action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub redis_socket_keepalive: bool,
    /// How often the backend is probed; the gRPC health status follows it.
    #[arg(long, env = "REDIS_HEALTH_CHECK_INTERVAL", value_name = "REDIS_HEALTH_CHECK_INTERVAL", default_value = "30",
          value_parser = parse_positive_duration)]
    pub redis_health_check_interval: Duration,
    /// Bound on opening one Redis connection.
    #[arg(long, env = "KOO_REDIS_CONNECT_TIMEOUT", value_name = "KOO_REDIS_CONNECT_TIMEOUT", default_value = "1s",
          value_parser = parse_positive_duration)]
    pub redis_connect_timeout: Duration,
    /// Extra attempts after a transient Redis failure (within the deadline).
    #[arg(long, env = "KOO_REDIS_RETRIES", value_name = "KOO_REDIS_RETRIES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(0..=20))]
    pub redis_retries: u32,
    /// Consecutive Redis failures that open the circuit breaker.
    #[arg(long, env = "KOO_BREAKER_FAILURES", value_name = "KOO_BREAKER_FAILURES", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long the open breaker refuses calls before a trial.
    #[arg(long, env = "KOO_BREAKER_COOLDOWN", value_name = "KOO_BREAKER_COOLDOWN", default_value = "5s",
          value_parser = parse_duration)]
    pub breaker_cooldown: Duration,
    /// TLS for `rediss://` URLs (CA, client certificate).
    #[command(flatten)]
    pub tls: RedisTlsArgs,
}

impl RedisArgs {
    /// The Redis settings for `url`, or `None` without one.
    pub fn redis_config(&self, url: Option<String>) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let bad = |reason: String| ConfigError {
            variable: "REDIS_URL",
            reason,
        };
        let tls = self.tls.load()?;
        // (a Redis Cluster's URL names its seed nodes: `store::redis::topology`)
        let cluster = url.starts_with("redis+cluster://");
        if redis_url::is_tls(&url) || url.starts_with("rediss+cluster://") {
            if url.ends_with("#insecure") {
                return Err(bad(format!(
                    "{}: koo always verifies Redis's certificate; drop #insecure and give a private CA in KOO_REDIS_TLS_CA",
                    redis_url::redact(&url)
                )));
            }
        } else if !(url.starts_with("redis://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://")
            || cluster)
        {
            return Err(bad(
                "must start with redis://, rediss:// (TLS), redis+unix:// (a socket) \
                 or redis+cluster:// / rediss+cluster:// (a Redis Cluster)"
                    .to_owned(),
            ));
        } else if tls.is_some() {
            return Err(bad(format!(
                "{} is plaintext but KOO_REDIS_TLS_* files are set; use rediss:// (or unset them)",
                redis_url::redact(&url)
            )));
        }
        Ok(Some(RedisConfig {
            url,
            tls,
            max_connections: self.redis_max_connections as usize,
            retry_on_timeout: self.redis_retry_on_timeout,
            keepalive: self.redis_socket_keepalive,
            connect_timeout: self.redis_connect_timeout,
            retries: self.redis_retries,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
        }))
    }
}
