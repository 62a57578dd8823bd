//! `koo cache get-or-compute KEY --task NAME [--arg JSON]...`: read a key,
//! and on a miss have koo run a task once (for every caller) and cache its
//! result (`GetOrCompute`).

use std::time::Duration;

use clap::Args;

use super::{Client, Level};
use crate::cli::output::{self, print_json};
use crate::cli::{CliError, Conn, ExitStatus, values};
use crate::pb::cache::v1 as pb;
use crate::pb::cache::v1::cache_value::Kind;

/// `koo cache get-or-compute`'s arguments.
#[derive(Debug, Args)]
pub struct GetOrComputeArgs {
    key: String,
    /// The task that computes the value on a miss (its result, as JSON, is cached).
    #[arg(long)]
    task: String,
    /// A positional argument of the task, as JSON (repeat for several).
    #[arg(long = "arg")]
    args: Vec<String>,
    /// The task's keyword arguments, a JSON object.
    #[arg(long)]
    kwargs: Option<String>,
    /// The task's queue; default: the `cache` queue.
    #[arg(long, default_value = "")]
    queue: String,
    #[arg(long, value_enum, default_value = "app")]
    level: Level,
    /// Time to live of the computed entry (`60s`, `1h`); default: the level's TTL.
    #[arg(long, value_parser = crate::cli::connect::parse_duration)]
    ttl: Option<Duration>,
    /// How long the task may take before another caller submits it again (default 5 min).
    #[arg(long, value_parser = crate::cli::connect::parse_duration)]
    lock_ttl: Option<Duration>,
}

fn json(flag: &str, text: &str) -> Result<prost_types::Value, CliError> {
    values::json_value(text).map_err(|e| CliError::Usage(format!("{flag} {text:?}: {e}")))
}

/// Runs `koo cache get-or-compute`: prints the value.
pub(super) async fn run(
    conn: &Conn,
    client: &mut Client,
    a: GetOrComputeArgs,
) -> Result<ExitStatus, CliError> {
    let args = a
        .args
        .iter()
        .map(|t| json("--arg", t))
        .collect::<Result<Vec<_>, _>>()?;
    let kwargs = match &a.kwargs {
        None => None,
        Some(t) => match json("--kwargs", t)?.kind {
            Some(prost_types::value::Kind::StructValue(s)) => Some(s),
            _ => {
                return Err(CliError::Usage(format!(
                    "--kwargs {t:?}: not a JSON object"
                )));
            }
        },
    };
    let duration = |d: Option<Duration>| d.and_then(|d| prost_types::Duration::try_from(d).ok());
    let request = pb::GetOrComputeRequest {
        level: a.level.pb(),
        key: a.key,
        task: Some(pb::ComputeTask {
            name: a.task,
            args,
            kwargs,
            queue: a.queue,
        }),
        ttl: duration(a.ttl),
        lock_ttl: duration(a.lock_ttl),
        ..Default::default()
    };
    let reply = client
        .get_or_compute(conn.unary(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    if conn.json {
        print_json("koo.cache.v1.GetOrComputeResponse", &reply);
        return Ok(ExitStatus::Ok);
    }
    match reply.entry.and_then(|e| e.value).and_then(|v| v.kind) {
        Some(Kind::Text(text)) => outln!("{text}"),
        Some(Kind::Json(value)) => outln!("{}", output::to_json("google.protobuf.Value", &value)),
        Some(Kind::Raw(bytes)) => output::raw(&bytes),
        None => outln!(),
    }
    Ok(ExitStatus::Ok)
}
