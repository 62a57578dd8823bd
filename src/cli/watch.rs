//! `koo task watch` and `koo task submit --wait`: a task followed to its end
//! through WatchTask. On a terminal, an indicatif progress bar with the
//! task's message; otherwise a line per change (a JSON object per line with
//! `--json`), so logs and scripts see each state once. The exit code is the
//! task's outcome.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt as _;

use super::output::print_json;
use super::task::{one, state_name};
use super::{CliError, Conn, ExitStatus};
use crate::pb::tasks::v1 as pb;
use crate::pb::tasks::v1::task_service_client::TaskServiceClient;

/// How the changes are shown.
enum View {
    Bar(ProgressBar),
    Lines { last: Option<(i32, String)> },
    Json,
}

impl View {
    fn new(conn: &Conn) -> View {
        if conn.json {
            View::Json
        } else if std::io::stdout().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:>9} [{bar:30}] {pos:>3}% {wide_msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            View::Bar(bar)
        } else {
            View::Lines { last: None }
        }
    }

    fn show(&mut self, task: &pb::Task) {
        let progress = task.progress.clone().unwrap_or_default();
        match self {
            View::Bar(bar) => {
                bar.set_prefix(state_name(task.state));
                bar.set_position(progress.percent.clamp(0.0, 100.0) as u64);
                bar.set_message(progress.message);
            }
            View::Lines { last } => {
                let mut line = String::new();
                if progress.percent > 0.0 || !progress.message.is_empty() {
                    line = format!(" {:.0}% {}", progress.percent, progress.message);
                }
                if outcome(task.state).is_some() {
                    line.push_str(&ended(task));
                }
                let now = (task.state, line);
                if last.as_ref() != Some(&now) {
                    outln!("{} {}{}", task.id, state_name(task.state), now.1.trim_end());
                    *last = Some(now);
                }
            }
            View::Json => print_json("koo.tasks.v1.Task", task),
        }
    }

    fn end(self, task: &pb::Task) {
        if let View::Bar(bar) = self {
            bar.finish_and_clear();
            outln!("{} {}{}", task.id, state_name(task.state), ended(task));
        }
    }
}

/// How a task ended, for its last line: `: <error>` or `: <result>`.
fn ended(task: &pb::Task) -> String {
    match (&task.error, &task.result) {
        (Some(e), _) => format!(": {}", e.message),
        (None, Some(r)) => format!(": {}", super::output::to_json("google.protobuf.Value", r)),
        _ => String::new(),
    }
}

/// The exit status of a task's final state (`None`: not final yet).
fn outcome(state: i32) -> Option<ExitStatus> {
    match pb::TaskState::try_from(state).ok()? {
        pb::TaskState::Succeeded => Some(ExitStatus::Ok),
        pb::TaskState::Failed | pb::TaskState::Cancelled | pb::TaskState::TimedOut => {
            Some(ExitStatus::No)
        }
        _ => None,
    }
}

/// Follows `task_id` until it ends; its outcome is the exit status.
pub async fn follow(
    conn: &Conn,
    client: &mut TaskServiceClient<tonic::transport::Channel>,
    task_id: String,
) -> Result<ExitStatus, CliError> {
    let mut view = View::new(conn);
    let request = pb::WatchTaskRequest {
        task_id: task_id.clone(),
    };
    let mut stream = client
        .watch_task(conn.stream(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    while let Some(item) = stream.next().await {
        let task = item.map_err(|s| conn.failed(s))?.task.unwrap_or_default();
        view.show(&task);
        if let Some(status) = outcome(task.state) {
            view.end(&task);
            return Ok(status);
        }
    }
    // The stream ended without a final state (koo stopping, say): ask once.
    let reply = one(
        conn,
        client
            .get_task(conn.unary(pb::GetTaskRequest { task_id }))
            .await,
    )?;
    let task = reply.task.unwrap_or_default();
    match outcome(task.state) {
        Some(status) => {
            view.end(&task);
            Ok(status)
        }
        None => Err(conn.failed(tonic::Status::unavailable(format!(
            "the watch of {} ended while it was {}",
            task.id,
            state_name(task.state)
        )))),
    }
}
