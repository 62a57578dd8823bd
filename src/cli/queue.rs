//! `koo queue ls|pause|resume`: the task queues, their state and depths.

use clap::{Args, Subcommand};

use super::output::{self, print_json, short, table};
use super::task::one;
use super::{CliError, Conn, ConnectArgs, ExitStatus};
use crate::pb::tasks::v1 as pb;
use crate::pb::tasks::v1::task_service_client::TaskServiceClient;

/// `koo queue ...`.
#[derive(Debug, Args)]
pub struct QueueCli {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Every queue: state, depths, who paused it and why.
    Ls,
    /// Hand out nothing from QUEUE until resumed (submits are still
    /// accepted; running tasks finish).
    Pause {
        queue: String,
        /// Why, for the other operators.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Hand out QUEUE's tasks again.
    Resume { queue: String },
}

/// Runs a `koo queue` command.
pub async fn run(cli: QueueCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let mut client = TaskServiceClient::new(conn.channel());
    let queues = match cli.command {
        QueueCommand::Ls => {
            let request = pb::ListQueuesRequest {};
            one(&conn, client.list_queues(conn.unary(request)).await)?.queues
        }
        QueueCommand::Pause { queue, reason } => {
            let request = pb::PauseQueueRequest { queue, reason };
            let reply = one(&conn, client.pause_queue(conn.unary(request)).await)?;
            reply.queue.into_iter().collect()
        }
        QueueCommand::Resume { queue } => {
            let request = pb::ResumeQueueRequest { queue };
            let reply = one(&conn, client.resume_queue(conn.unary(request)).await)?;
            reply.queue.into_iter().collect()
        }
    };
    if conn.json {
        for q in &queues {
            print_json("koo.tasks.v1.Queue", q);
        }
    } else {
        outln!("{}", table(&HEADER, rows(&queues)));
    }
    Ok(ExitStatus::Ok)
}

const HEADER: [&str; 9] = [
    "QUEUE",
    "STATE",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "PENDING",
    "DEAD",
    "PAUSED BY",
    "REASON",
];

fn rows(queues: &[pb::Queue]) -> Vec<Vec<String>> {
    queues
        .iter()
        .map(|q| {
            let m = q.metrics.clone().unwrap_or_default();
            let state = pb::QueueState::try_from(q.state).map_or_else(
                |_| q.state.to_string(),
                |s| short(s.as_str_name(), "QUEUE_STATE_"),
            );
            let (by, reason) = q.pause.as_ref().map_or_else(
                || ("-".to_owned(), "-".to_owned()),
                |p| {
                    (
                        format!("{} {}", p.principal, output::time(p.pause_time.as_ref())),
                        if p.reason.is_empty() {
                            "-".to_owned()
                        } else {
                            p.reason.clone()
                        },
                    )
                },
            );
            vec![
                q.name.clone(),
                state,
                m.queued.to_string(),
                m.running.to_string(),
                m.scheduled.to_string(),
                m.pending.to_string(),
                m.dead_letters.to_string(),
                by,
                reason,
            ]
        })
        .collect()
}
