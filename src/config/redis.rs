//! Redis settings shared by `koo serve`, `koo worker` and `koo scheduler`:
//! the URL (TLS and ACL users included), the pool, retries and the breaker.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};

use super::{ConfigError, RedisTlsArgs, parse_duration, parse_positive_duration};
use crate::store::RedisConfig;
use crate::store::redis::topology::Topology;
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
    /// The Redis settings for `url`, or `None` without one; `variable`:
    /// the setting it came from, named in every message about it.
    pub fn redis_config(
        &self,
        variable: &'static str,
        url: Option<String>,
    ) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let bad = |reason: String| ConfigError { variable, reason };
        redis_url::check_userinfo(&url).map_err(bad)?;
        let tls = self.tls.load()?;
        // The Cluster and Sentinel forms are checked whole here, so that a
        // mistake in them is named at start-up like any other.
        let topology = Topology::parse(&url).map_err(bad)?;
        let single = matches!(topology, Topology::Single(_));
        if topology.is_tls() {
            if url.ends_with("#insecure") {
                return Err(bad(format!(
                    "{}: koo always verifies Redis's certificate; drop #insecure and give a private CA in KOO_REDIS_TLS_CA",
                    redis_url::redact(&url)
                )));
            }
        } else if single
            && !(url.starts_with("redis://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://"))
        {
            return Err(bad(
                "must start with redis://, rediss:// (TLS), redis+unix:// (a socket), redis[s]+cluster:// or redis[s]+sentinel://".to_owned(),
            ));
        } else if tls.is_some() {
            return Err(bad(format!(
                "{} is plaintext but KOO_REDIS_TLS_* files are set; use rediss:// (or unset them)",
                redis_url::redact(&url)
            )));
        }
        if single {
            check_single(&url).map_err(bad)?;
        }
        Ok(Some(RedisConfig {
            url,
            setting: variable,
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

/// A single server's URL as the client reads it, checked here so that a
/// mistake is named at start-up with the URL quoted (the client's own
/// messages quote nothing: "Invalid database number").
fn check_single(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo as _;
    let shown = redis_url::redact(url);
    if let Some(rest) = url
        .strip_prefix("redis://")
        .or(url.strip_prefix("rediss://"))
    {
        let path = rest.split(['?', '#']).next().unwrap_or("");
        let db = path.split_once('/').map_or("", |(_, db)| db);
        if !db.is_empty() {
            crate::store::redis::topology::parse_db(db, &shown)?;
        }
    }
    url.into_connection_info()
        .map(drop)
        .map_err(|e| format!("{shown} does not parse: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn config(url: &str) -> Result<Option<RedisConfig>, ConfigError> {
        Cli::try_parse_from(["koo"])
            .unwrap()
            .redis
            .redis_config("REDIS_URL", Some(url.to_owned()))
    }

    /// A base64 password's raw `/` is named at start-up, and no part of
    /// the password is quoted (the rest of it once read as the database).
    #[test]
    fn a_raw_slash_in_a_password_is_named_without_the_password() {
        let e = config("redis://koo:hunter2/topsecret@127.0.0.1:1/0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("REDIS_URL") && e.contains("%2F"), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("topsecret"), "{e}");
        assert!(config("redis://koo:hunter2%2Ftopsecret@127.0.0.1:1/0").is_ok());
    }

    /// The Sentinel and Cluster forms are accepted (TLS ones too); their
    /// mistakes are named at start-up, under REDIS_URL, without a password.
    #[test]
    fn sentinel_and_cluster_urls() {
        for url in [
            "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/1",
            "rediss+sentinel://s1:26379/m?db=2&sentinel_password=x",
            "redis+cluster://a:7000,b:7001",
        ] {
            assert!(config(url).unwrap().is_some(), "{url}");
        }
        let e = config("redis+sentinel://:secret@s1:26379").unwrap_err();
        assert_eq!(e.variable, "REDIS_URL");
        assert!(e.to_string().contains("name the primary"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = config("rediss+sentinel://s1:26379/m#insecure").unwrap_err();
        assert!(e.to_string().contains("#insecure"), "{e}");
    }

    /// A single server's URL that the client cannot read is named at
    /// start-up with the URL quoted (its password hidden).
    #[test]
    fn single_urls_are_read_at_start_up() {
        for url in [
            "redis://h:6379",
            "redis://:pw@h:6379/15",
            "rediss://h:6380/0",
        ] {
            assert!(config(url).unwrap().is_some(), "{url}");
        }
        let e = config("redis://:secret@h:6379/abc").unwrap_err();
        assert!(e.to_string().contains("\"abc\" is not a number"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = config("redis://h:99999/0").unwrap_err();
        assert!(e.to_string().contains("redis://h:99999/0"), "{e}");
    }
}
