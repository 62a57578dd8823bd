//! `koo cache get|set|del|keys|clear|invalidate-tags|stats|get-or-compute|watch`:
//! cache entries on a running koo.

mod compute;

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, print_json, table};
use super::{CliError, Conn, ConnectArgs, ExitStatus, values};
use crate::pb::cache::v1 as pb;
use crate::pb::cache::v1::cache_service_client::CacheServiceClient;
use crate::pb::cache::v1::cache_value::Kind;

/// `koo cache ...`.
#[derive(Debug, Args)]
pub struct CacheCli {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(subcommand)]
    command: CacheCommand,
}

/// A cache level, by its short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// `CACHE_LEVEL_APP`.
    App,
    /// `CACHE_LEVEL_DB`.
    Db,
    /// `CACHE_LEVEL_API`.
    Api,
    /// `CACHE_LEVEL_SESSION`.
    Session,
}

impl Level {
    pub(super) fn pb(self) -> i32 {
        (match self {
            Level::App => pb::CacheLevel::App,
            Level::Db => pb::CacheLevel::Db,
            Level::Api => pb::CacheLevel::Api,
            Level::Session => pb::CacheLevel::Session,
        }) as i32
    }
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Print a value (exit 1 when the key is not there); its tags and
    /// whether it is stale go to stderr, so that stdout is the value alone.
    Get {
        key: String,
        #[arg(long, value_enum, default_value = "app")]
        level: Level,
    },
    /// Store a value: JSON text (`'{"a":1}'`, `42`, `'"text"'`), or with --text the text as is.
    Set {
        key: String,
        value: String,
        #[arg(long, value_enum, default_value = "app")]
        level: Level,
        /// Time to live (`60s`, `1h`); default: the level's TTL.
        #[arg(long, value_parser = super::connect::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Store VALUE as text, not JSON.
        #[arg(long)]
        text: bool,
        /// A tag, for `invalidate-tags` (repeat for more: `--tag a --tag b`).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// Soft TTL (`30s`): after it, reads mark the value stale; shorter
        /// than the TTL.
        #[arg(long, value_parser = super::connect::parse_duration)]
        soft_ttl: Option<std::time::Duration>,
    },
    /// Make every entry carrying any of TAGS miss; prints how many
    /// (level, tag) pairs had entries.
    InvalidateTags {
        #[arg(required = true)]
        tags: Vec<String>,
        /// Only this level; default: every level.
        #[arg(long, value_enum)]
        level: Option<Level>,
    },
    /// Delete keys; prints how many were there.
    Del {
        #[arg(required = true)]
        keys: Vec<String>,
        #[arg(long, value_enum, default_value = "app")]
        level: Level,
    },
    /// List keys matching a glob pattern (default `*`).
    Keys {
        #[arg(default_value = "*")]
        pattern: String,
        #[arg(long, value_enum, default_value = "app")]
        level: Level,
        /// At most this many keys.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Delete every key of a level (the level must be named).
    Clear {
        #[arg(long, value_enum)]
        level: Level,
    },
    /// Hits, misses and keys per level.
    Stats,
    /// Print a value; on a miss, koo runs --task once (for every caller) and caches its result.
    GetOrCompute(compute::GetOrComputeArgs),
    /// Print changes (made on any koo instance) as they happen.
    Watch {
        /// Only these levels (repeat the flag); default: every level.
        #[arg(long = "level", value_enum)]
        levels: Vec<Level>,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// How often koo says the watch is live when nothing changes (100ms
        /// to 1h); three intervals without a word end it (exit 3): koo or
        /// the network stalled.
        #[arg(long, default_value = "5s", value_parser = super::connect::parse_timeout)]
        heartbeat: std::time::Duration,
    },
}

/// Runs a `koo cache` command.
pub async fn run(cli: CacheCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let mut client = CacheServiceClient::new(conn.channel());
    match cli.command {
        CacheCommand::Get { key, level } => get(&conn, &mut client, key, level).await,
        CacheCommand::Set {
            key,
            value,
            level,
            ttl,
            text,
            tags,
            soft_ttl,
        } => {
            let kind = if text {
                Kind::Text(value)
            } else {
                Kind::Json(values::json_value(&value).map_err(|e| {
                    CliError::Usage(format!("VALUE {value:?}: {e} (or use --text)"))
                })?)
            };
            let duration = |d: Option<std::time::Duration>| {
                d.and_then(|t| prost_types::Duration::try_from(t).ok())
            };
            let request = pb::SetRequest {
                level: level.pb(),
                key,
                value: Some(pb::CacheValue { kind: Some(kind) }),
                ttl: duration(ttl),
                tags,
                soft_ttl: duration(soft_ttl),
            };
            set(&conn, &mut client, request).await
        }
        CacheCommand::Del { keys, level } => {
            let request = pb::DeleteManyRequest {
                level: level.pb(),
                keys,
            };
            let reply = client
                .delete_many(conn.unary(request))
                .await
                .map_err(|s| conn.failed(s))?
                .into_inner();
            if conn.json {
                print_json("koo.cache.v1.DeleteManyResponse", &reply);
            } else {
                outln!("deleted {}", reply.deleted_count);
            }
            Ok(ExitStatus::Ok)
        }
        CacheCommand::Keys {
            pattern,
            level,
            limit,
        } => keys(&conn, &mut client, pattern, level, limit).await,
        CacheCommand::Clear { level } => clear(&conn, &mut client, level).await,
        CacheCommand::InvalidateTags { tags, level } => {
            invalidate_tags(&conn, &mut client, tags, level).await
        }
        CacheCommand::Stats => stats(&conn, &mut client).await,
        CacheCommand::GetOrCompute(a) => compute::run(&conn, &mut client, a).await,
        CacheCommand::Watch {
            levels,
            prefix,
            heartbeat,
        } => super::cache_watch::watch(&conn, &mut client, levels, prefix, heartbeat).await,
    }
}

type Client = CacheServiceClient<tonic::transport::Channel>;

async fn set(
    conn: &Conn,
    client: &mut Client,
    request: pb::SetRequest,
) -> Result<ExitStatus, CliError> {
    let reply = client
        .set(conn.unary(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.SetResponse", &reply);
    } else {
        outln!(
            "stored ({} bytes, ttl {})",
            reply.size_bytes,
            output::duration(reply.ttl.as_ref())
        );
    }
    Ok(ExitStatus::Ok)
}

async fn clear(conn: &Conn, client: &mut Client, level: Level) -> Result<ExitStatus, CliError> {
    let request = pb::ClearLevelRequest { level: level.pb() };
    let reply = client
        .clear_level(conn.unary(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.ClearLevelResponse", &reply);
    } else {
        outln!("deleted {}", reply.deleted_count);
    }
    Ok(ExitStatus::Ok)
}

async fn invalidate_tags(
    conn: &Conn,
    client: &mut Client,
    tags: Vec<String>,
    level: Option<Level>,
) -> Result<ExitStatus, CliError> {
    let request = pb::InvalidateTagsRequest {
        level: level.map_or(0, Level::pb),
        tags,
    };
    let reply = client
        .invalidate_tags(conn.unary(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.InvalidateTagsResponse", &reply);
    } else {
        outln!("invalidated {}", reply.known_count);
    }
    Ok(ExitStatus::Ok)
}

async fn get(
    conn: &Conn,
    client: &mut Client,
    key: String,
    level: Level,
) -> Result<ExitStatus, CliError> {
    let request = pb::GetRequest {
        level: level.pb(),
        key: key.clone(),
    };
    let reply = client
        .get(conn.unary(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.GetResponse", &reply);
    } else if reply.found {
        let mut notes = Vec::new();
        if !reply.tags.is_empty() {
            notes.push(format!("tags: [{}]", reply.tags.join(", ")));
        }
        match &reply.soft_ttl {
            Some(left) => notes.push(format!("fresh for {}", output::duration(Some(left)))),
            None if reply.stale => notes.push("stale".to_owned()),
            None => {}
        }
        if !notes.is_empty() {
            eprintln!("{}", notes.join(", "));
        }
        match reply.value.and_then(|v| v.kind) {
            Some(Kind::Text(text)) => outln!("{text}"),
            Some(Kind::Json(value)) => {
                outln!("{}", output::to_json("google.protobuf.Value", &value));
            }
            Some(Kind::Raw(bytes)) => output::raw(&bytes),
            None => outln!(),
        }
    }
    if reply.found {
        Ok(ExitStatus::Ok)
    } else {
        Err(CliError::No(format!(
            "{key:?}: not found at level {}",
            format!("{level:?}").to_lowercase()
        )))
    }
}

async fn keys(
    conn: &Conn,
    client: &mut Client,
    pattern: String,
    level: Level,
    limit: usize,
) -> Result<ExitStatus, CliError> {
    let mut found = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListKeysRequest {
            level: level.pb(),
            pattern: pattern.clone(),
            page_size: (limit - found.len()).min(1000) as i32,
            page_token,
        };
        let reply = client
            .list_keys(conn.unary(request))
            .await
            .map_err(|s| conn.failed(s))?
            .into_inner();
        found.extend(reply.keys);
        page_token = reply.next_page_token;
        if page_token.is_empty() || found.len() >= limit {
            break;
        }
    }
    found.truncate(limit);
    if conn.json {
        let reply = pb::ListKeysResponse {
            keys: found,
            next_page_token: page_token,
        };
        print_json("koo.cache.v1.ListKeysResponse", &reply);
    } else {
        let shown = found.len();
        for key in found {
            outln!("{key}");
        }
        if !page_token.is_empty() {
            output::more(shown);
        }
    }
    Ok(ExitStatus::Ok)
}

async fn stats(conn: &Conn, client: &mut Client) -> Result<ExitStatus, CliError> {
    let reply = client
        .get_metrics(conn.unary(pb::GetMetricsRequest {}))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.GetMetricsResponse", &reply);
        return Ok(ExitStatus::Ok);
    }
    let metrics = reply.metrics.unwrap_or_default();
    let row = |name: String, c: &pb::CacheCounters| {
        vec![
            name,
            c.keys.to_string(),
            c.hits.to_string(),
            c.misses.to_string(),
            format!("{:.1}%", c.hit_ratio * 100.0),
            c.sets.to_string(),
            c.deletes.to_string(),
            c.errors.to_string(),
        ]
    };
    let mut rows: Vec<Vec<String>> = metrics
        .levels
        .iter()
        .map(|l| {
            let name = pb::CacheLevel::try_from(l.level).map_or_else(
                |_| l.level.to_string(),
                |v| output::short(v.as_str_name(), "CACHE_LEVEL_"),
            );
            row(name, &l.counters.unwrap_or_default())
        })
        .collect();
    rows.push(row("total".to_owned(), &metrics.total.unwrap_or_default()));
    outln!(
        "{}",
        table(
            &[
                "LEVEL",
                "KEYS",
                "HITS",
                "MISSES",
                "HIT RATIO",
                "SETS",
                "DELETES",
                "ERRORS"
            ],
            rows
        )
    );
    if metrics.partial {
        outln!("(partial: {})", metrics.partial_reason);
    }
    Ok(ExitStatus::Ok)
}
