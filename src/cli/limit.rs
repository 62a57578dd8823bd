//! `koo limit ls|get|set-rate|set-concurrency|rm`: flow control's rate
//! limits and concurrency caps, one table for both.
//!
//! A name is a limit's scope: `queues/<queue>`, `tasks/<task name>`,
//! `keys/<key>` or `keys/*`. A key may have both a rate limit and a cap:
//! `get` and `rm` act on both unless `--rate` or `--concurrency` says which.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, print_json, short, table};
use super::task::{one, pb_duration};
use super::{CliError, Conn, ConnectArgs, ExitStatus};
use crate::pb::tasks::v1 as pb;
use crate::pb::tasks::v1::task_service_client::TaskServiceClient;

type Client = TaskServiceClient<tonic::transport::Channel>;

/// `koo limit ...`.
#[derive(Debug, Args)]
pub struct LimitCli {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(subcommand)]
    command: LimitCommand,
}

/// Which kind of limit a `get` or `rm` acts on (default: both).
#[derive(Debug, Args, Clone, Copy)]
struct Kind {
    /// Only the rate limit.
    #[arg(long, conflicts_with = "concurrency")]
    rate: bool,
    /// Only the concurrency cap.
    #[arg(long)]
    concurrency: bool,
}

impl Kind {
    fn rate(self) -> bool {
        !self.concurrency
    }

    /// Caps exist only for keys.
    fn concurrency(self, name: &str) -> bool {
        !self.rate && name.starts_with("keys/")
    }
}

#[derive(Debug, Subcommand)]
enum LimitCommand {
    /// Every rate limit and concurrency cap, with its state.
    Ls,
    /// One name's rate limit and cap (NOT_FOUND when it has neither).
    Get {
        name: String,
        #[command(flatten)]
        kind: Kind,
    },
    /// Create or replace a rate limit: at most LIMIT starts per PERIOD,
    /// cluster-wide.
    SetRate {
        /// `queues/<queue>`, `tasks/<task name>`, `keys/<key>` or `keys/*`.
        name: String,
        /// Starts per period.
        #[arg(long)]
        limit: u32,
        /// The period (`1s`, `1m`).
        #[arg(long, value_parser = super::connect::parse_duration)]
        per: Duration,
        /// Starts at once after a quiet spell (1: evenly spaced).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        burst: u32,
    },
    /// Create or replace a concurrency cap: at most MAX of the key's tasks
    /// run at once.
    SetConcurrency {
        /// `keys/<concurrency_key>` or `keys/*`.
        name: String,
        /// Most running at once.
        #[arg(long)]
        max: u32,
        /// What a task past the cap does.
        #[arg(long, value_enum, default_value_t = Policy::Wait)]
        policy: Policy,
    },
    /// Remove a name's rate limit and cap (NOT_FOUND when it has neither).
    Rm {
        name: String,
        #[command(flatten)]
        kind: Kind,
    },
}

/// A concurrency policy.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    /// It waits, QUEUED, until one of the key's tasks ends.
    Wait,
    /// It ends CANCELLED instead of starting.
    #[value(alias = "cancel_newest")]
    CancelNewest,
    /// The key's oldest running task is asked to cancel.
    #[value(alias = "cancel_oldest")]
    CancelOldest,
}

impl Policy {
    fn pb(self) -> i32 {
        (match self {
            Self::Wait => pb::ConcurrencyPolicy::Wait,
            Self::CancelNewest => pb::ConcurrencyPolicy::CancelNewest,
            Self::CancelOldest => pb::ConcurrencyPolicy::CancelOldest,
        }) as i32
    }
}

/// What a command found: rate limits and caps.
#[derive(Default)]
struct Found {
    rates: Vec<pb::RateLimit>,
    caps: Vec<pb::ConcurrencyLimit>,
}

/// Runs a `koo limit` command.
pub async fn run(cli: LimitCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let mut client = TaskServiceClient::new(conn.channel());
    let found = match cli.command {
        LimitCommand::Ls => list(&conn, &mut client).await?,
        LimitCommand::Get { name, kind } => get(&conn, &mut client, name, kind).await?,
        LimitCommand::Rm { name, kind } => return rm(&conn, &mut client, name, kind).await,
        LimitCommand::SetRate {
            name,
            limit,
            per,
            burst,
        } => {
            let rate_limit = pb::RateLimit {
                name,
                limit,
                period: pb_duration(Some(per)),
                burst,
                ..Default::default()
            };
            let request = pb::SetRateLimitRequest {
                rate_limit: Some(rate_limit),
            };
            let reply = one(&conn, client.set_rate_limit(conn.unary(request)).await)?;
            Found {
                rates: reply.rate_limit.into_iter().collect(),
                ..Found::default()
            }
        }
        LimitCommand::SetConcurrency { name, max, policy } => {
            let cap = pb::ConcurrencyLimit {
                name,
                max_running: max,
                policy: policy.pb(),
                ..Default::default()
            };
            let request = pb::SetConcurrencyLimitRequest {
                concurrency_limit: Some(cap),
            };
            let reply = one(
                &conn,
                client.set_concurrency_limit(conn.unary(request)).await,
            )?;
            Found {
                caps: reply.concurrency_limit.into_iter().collect(),
                ..Found::default()
            }
        }
    };
    print(&conn, &found);
    Ok(ExitStatus::Ok)
}

async fn list(conn: &Conn, client: &mut Client) -> Result<Found, CliError> {
    let request = pb::ListRateLimitsRequest {};
    let rates = one(conn, client.list_rate_limits(conn.unary(request)).await)?.rate_limits;
    let request = pb::ListConcurrencyLimitsRequest {};
    let reply = one(
        conn,
        client.list_concurrency_limits(conn.unary(request)).await,
    )?;
    Ok(Found {
        rates,
        caps: reply.concurrency_limits,
    })
}

/// Whether `reply` is NOT_FOUND (kept, to be reported if nothing is found).
fn found<T>(
    reply: Result<tonic::Response<T>, tonic::Status>,
    missing: &mut Option<tonic::Status>,
) -> Result<Option<T>, tonic::Status> {
    match reply {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if s.code() == tonic::Code::NotFound => {
            *missing = Some(s);
            Ok(None)
        }
        Err(s) => Err(s),
    }
}

async fn get(
    conn: &Conn,
    client: &mut Client,
    name: String,
    kind: Kind,
) -> Result<Found, CliError> {
    let mut out = Found::default();
    let mut missing = None;
    if kind.rate() {
        let request = pb::GetRateLimitRequest { name: name.clone() };
        let reply = client.get_rate_limit(conn.unary(request)).await;
        let reply = found(reply, &mut missing).map_err(|s| conn.failed(s))?;
        out.rates.extend(reply.and_then(|r| r.rate_limit));
    }
    if kind.concurrency(&name) {
        let request = pb::GetConcurrencyLimitRequest { name: name.clone() };
        let reply = client.get_concurrency_limit(conn.unary(request)).await;
        let reply = found(reply, &mut missing).map_err(|s| conn.failed(s))?;
        out.caps.extend(reply.and_then(|r| r.concurrency_limit));
    }
    match missing {
        Some(status) if out.rates.is_empty() && out.caps.is_empty() => {
            Err(conn.failed(none_named(&name, kind, status)))
        }
        _ => Ok(out),
    }
}

/// NOT_FOUND for a name that has nothing of the kinds asked for: with both
/// asked, it says so (the last kind's own refusal would name only it).
fn none_named(name: &str, kind: Kind, status: tonic::Status) -> tonic::Status {
    if kind.rate() && kind.concurrency(name) {
        return tonic::Status::not_found(format!(
            "no rate limit and no concurrency limit named {}",
            crate::quote::quote(name)
        ));
    }
    status
}

async fn rm(
    conn: &Conn,
    client: &mut Client,
    name: String,
    kind: Kind,
) -> Result<ExitStatus, CliError> {
    let mut missing = None;
    let mut removed = Vec::new();
    if kind.rate() {
        let request = pb::DeleteRateLimitRequest { name: name.clone() };
        let reply = client.delete_rate_limit(conn.unary(request)).await;
        if found(reply, &mut missing)
            .map_err(|s| conn.failed(s))?
            .is_some()
        {
            removed.push("rate limit");
        }
    }
    if kind.concurrency(&name) {
        let request = pb::DeleteConcurrencyLimitRequest { name: name.clone() };
        let reply = client.delete_concurrency_limit(conn.unary(request)).await;
        if found(reply, &mut missing)
            .map_err(|s| conn.failed(s))?
            .is_some()
        {
            removed.push("concurrency limit");
        }
    }
    if removed.is_empty()
        && let Some(status) = missing
    {
        return Err(conn.failed(none_named(&name, kind, status)));
    }
    if conn.json {
        outln!(
            "{}",
            serde_json::json!({ "name": name, "removed": removed })
        );
    } else {
        outln!("removed {} of {name}", removed.join(" and "));
    }
    Ok(ExitStatus::Ok)
}

fn print(conn: &Conn, found: &Found) {
    if conn.json {
        for r in &found.rates {
            print_json("koo.tasks.v1.RateLimit", r);
        }
        for c in &found.caps {
            print_json("koo.tasks.v1.ConcurrencyLimit", c);
        }
        return;
    }
    let rates = found.rates.iter().map(|r| {
        let burst = if r.burst > 1 {
            format!(" burst {}", r.burst)
        } else {
            String::new()
        };
        let backoff = r.backoff_until.as_ref().map_or_else(String::new, |t| {
            format!(", backed off until {}", output::time(Some(t)))
        });
        vec![
            r.name.clone(),
            "rate".to_owned(),
            format!("{}/{}{burst}", r.limit, output::duration(r.period.as_ref())),
            source(r.source),
            format!(
                "next free {}{backoff}",
                output::time(r.next_free_time.as_ref())
            ),
        ]
    });
    let caps = found.caps.iter().map(|c| {
        let policy = pb::ConcurrencyPolicy::try_from(c.policy).map_or_else(
            |_| c.policy.to_string(),
            |p| short(p.as_str_name(), "CONCURRENCY_POLICY_"),
        );
        vec![
            c.name.clone(),
            "concurrency".to_owned(),
            format!("{} running ({policy})", c.max_running),
            source(c.source),
            format!("{} running", c.running),
        ]
    });
    outln!("{}", table(&HEADER, rates.chain(caps)));
}

const HEADER: [&str; 5] = ["NAME", "KIND", "LIMIT", "SOURCE", "NOW"];

fn source(raw: i32) -> String {
    pb::LimitSource::try_from(raw).map_or_else(
        |_| raw.to_string(),
        |s| short(s.as_str_name(), "LIMIT_SOURCE_"),
    )
}
