//! `koo ps`: the workers koo knows (built-in slots and external workers).

use clap::Args;

use super::output::{self, print_json, short, table};
use super::task::one;
use super::{CliError, Conn, ConnectArgs, ExitStatus};
use crate::pb::worker::v1 as pb;
use crate::pb::worker::v1::worker_service_client::WorkerServiceClient;

/// `koo ps`.
#[derive(Debug, Args)]
pub struct PsCli {
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Every live worker, all pages.
pub(crate) async fn workers(conn: &Conn) -> Result<Vec<pb::Worker>, CliError> {
    let mut client = WorkerServiceClient::new(conn.channel());
    let mut workers = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListWorkersRequest {
            page_size: 500,
            page_token,
        };
        let reply = one(conn, client.list_workers(conn.unary(request)).await)?;
        workers.extend(reply.workers);
        page_token = reply.next_page_token;
        if page_token.is_empty() {
            return Ok(workers);
        }
    }
}

/// A worker's kind, short (`builtin`, `stream`, `unary`).
pub(crate) fn kind(w: &pb::Worker) -> String {
    pb::WorkerKind::try_from(w.kind).map_or_else(
        |_| w.kind.to_string(),
        |k| short(k.as_str_name(), "WORKER_KIND_"),
    )
}

/// The rows of a workers table (shared with `koo top`).
pub(crate) fn rows(workers: &[pb::Worker]) -> Vec<Vec<String>> {
    workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                kind(w),
                w.name.clone(),
                if w.queues.is_empty() {
                    "*".to_owned()
                } else {
                    w.queues.join(",")
                },
                format!("{}/{}", w.running, w.concurrency),
                if w.peer.is_empty() {
                    "-".to_owned()
                } else {
                    w.peer.clone()
                },
                output::time(w.last_seen_time.as_ref()),
            ]
        })
        .collect()
}

/// The workers table's header.
pub(crate) const HEADER: [&str; 7] = ["ID", "KIND", "NAME", "QUEUES", "BUSY", "PEER", "LAST SEEN"];

/// Runs `koo ps`.
pub async fn run(cli: PsCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let workers = workers(&conn).await?;
    if conn.json {
        for w in &workers {
            print_json("koo.worker.v1.Worker", w);
        }
    } else {
        outln!("{}", table(&HEADER, rows(&workers)));
    }
    Ok(ExitStatus::Ok)
}
