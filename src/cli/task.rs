//! `koo task submit|get|watch|ls|history|cancel|retry|dead|requeue`.

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, print_json, short, table};
use super::{CliError, Conn, ConnectArgs, ExitStatus, values, watch};
use crate::pb::tasks::v1 as pb;
use crate::pb::tasks::v1::task_service_client::TaskServiceClient;

/// `koo task ...`.
#[derive(Debug, Args)]
pub struct TaskCli {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(subcommand)]
    command: TaskCommand,
}

/// A task category, by koo's name for it (also its default queue's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Category {
    AiService,
    PdfProcessing,
    Database,
    HealthCheck,
    Research,
    Cache,
}

impl Category {
    pub(crate) fn pb(self) -> i32 {
        (match self {
            Category::AiService => pb::TaskCategory::AiService,
            Category::PdfProcessing => pb::TaskCategory::PdfProcessing,
            Category::Database => pb::TaskCategory::Database,
            Category::HealthCheck => pb::TaskCategory::HealthCheck,
            Category::Research => pb::TaskCategory::Research,
            Category::Cache => pb::TaskCategory::Cache,
        }) as i32
    }
}

/// A task priority, by its short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Priority {
    Low,
    Normal,
    High,
    Critical,
}

impl Priority {
    pub(crate) fn pb(self) -> i32 {
        (match self {
            Priority::Low => pb::TaskPriority::Low,
            Priority::Normal => pb::TaskPriority::Normal,
            Priority::High => pb::TaskPriority::High,
            Priority::Critical => pb::TaskPriority::Critical,
        }) as i32
    }
}

/// A task state, by its short name (for `history --state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum State {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl State {
    fn pb(self) -> pb::TaskState {
        match self {
            State::Succeeded => pb::TaskState::Succeeded,
            State::Failed => pb::TaskState::Failed,
            State::Cancelled => pb::TaskState::Cancelled,
            State::TimedOut => pb::TaskState::TimedOut,
        }
    }
}

/// What a task runs, shared by `task submit` and `cron create`.
#[derive(Debug, Clone, Args)]
pub struct TaskSpec {
    /// The task's category (koo requires one).
    #[arg(long, value_enum)]
    pub category: Category,
    /// Positional arguments: a JSON array.
    #[arg(long, value_name = "JSON", value_parser = values::json_array)]
    pub args: Option<Vec<prost_types::Value>>,
    /// Keyword arguments: a JSON object (`'{"query":"x"}'`).
    #[arg(long, value_name = "JSON", value_parser = values::json_object)]
    pub kwargs: Option<prost_types::Struct>,
    #[arg(long, value_enum)]
    pub priority: Option<Priority>,
    /// Queue (default: the one koo routes the task to).
    #[arg(long, default_value = "")]
    pub queue: String,
    #[arg(long)]
    pub max_retries: Option<i32>,
    /// Soft time limit (`30s`): the handler is asked to stop.
    #[arg(long, value_parser = super::connect::parse_duration)]
    pub soft_time_limit: Option<Duration>,
    /// Hard time limit (`1m`).
    #[arg(long, value_parser = super::connect::parse_duration)]
    pub time_limit: Option<Duration>,
}

/// `--expires`: when a task not started by then is cancelled instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    /// This long after the submit (`expire_after`).
    After(Duration),
    /// At this time (`expire_time`).
    At(std::time::SystemTime),
}

/// A duration (`10m`, `30`) or an RFC 3339 time with its offset.
pub fn parse_expiry(s: &str) -> Result<Expires, String> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(Expires::At(at.into()));
    }
    super::connect::parse_duration(s)
        .map(Expires::After)
        .map_err(|e| format!("{e}, or an RFC 3339 time (2026-12-05T18:00:00Z)"))
}

pub(crate) fn pb_duration(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.and_then(|d| prost_types::Duration::try_from(d).ok())
}

/// `koo task submit`.
#[derive(Debug, Args)]
struct SubmitArgs {
    /// The handler's name (e.g. `koo.diagnostics.sleep`).
    name: String,
    #[command(flatten)]
    spec: TaskSpec,
    /// Run it after this delay (`10s`).
    #[arg(long, value_parser = super::connect::parse_duration)]
    countdown: Option<Duration>,
    /// Cancel it ("expired") if it has not started by then: a duration
    /// from now (`10m`) or an RFC 3339 time (`2026-12-05T18:00:00Z`).
    #[arg(long, value_name = "DURATION|RFC3339", value_parser = parse_expiry)]
    expires: Option<Expires>,
    /// Submitting the same key again returns the first task.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// Tasks that must succeed first.
    #[arg(long = "depends-on", value_name = "TASK_ID")]
    depends_on: Vec<String>,
    /// Debounce key: while the task submitted with it (to this queue) has
    /// not started, this submit replaces it and prints its id.
    #[arg(long, default_value = "", requires = "debounce_window")]
    debounce_key: String,
    /// How long a debounced task waits for a newer submit (`5s`).
    #[arg(long, value_parser = super::connect::parse_duration, requires = "debounce_key")]
    debounce_window: Option<Duration>,
    /// Rate-limit key (a provider, a tenant): it starts only when the key's
    /// rate limit has a token and no worker's back-off holds the key.
    #[arg(long, default_value = "")]
    rate_limit_key: String,
    /// Concurrency key: at most the key's cap of its tasks run at once
    /// (`koo limit set-concurrency`); keys are served round robin.
    #[arg(long, default_value = "")]
    concurrency_key: String,
    /// Follow the task to its end, as `koo task watch`.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Submit a task; prints its id (with --wait, follows it to its end).
    Submit(Box<SubmitArgs>),
    /// One task, in full.
    Get { task_id: String },
    /// Follow a task to its end (a progress bar on a terminal); exit 0 when it succeeded, 1 otherwise.
    Watch { task_id: String },
    /// Tasks not yet ended (pending, scheduled, queued, running).
    Ls {
        #[arg(long, default_value = "")]
        queue: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, value_enum)]
        category: Option<Category>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Ended tasks, newest first.
    History {
        #[arg(long, value_enum)]
        state: Option<State>,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, value_enum)]
        category: Option<Category>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Cancel a task.
    Cancel {
        task_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Run an ended task again.
    Retry { task_id: String },
    /// Dead letters: tasks that ended FAILED or TIMED_OUT.
    Dead {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Run dead letters again: the ones named, or --all.
    Requeue {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        task_ids: Vec<String>,
        #[arg(long)]
        all: bool,
    },
}

type Client = TaskServiceClient<tonic::transport::Channel>;

/// Runs a `koo task` command.
pub async fn run(cli: TaskCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let mut client = TaskServiceClient::new(conn.channel());
    match cli.command {
        TaskCommand::Submit(args) => submit(&conn, &mut client, *args).await,
        TaskCommand::Get { task_id } => {
            let task = one(
                &conn,
                client
                    .get_task(conn.unary(pb::GetTaskRequest { task_id }))
                    .await,
            )?
            .task
            .unwrap_or_default();
            if conn.json {
                print_json("koo.tasks.v1.Task", &task);
            } else {
                print_task(&task);
            }
            Ok(ExitStatus::Ok)
        }
        TaskCommand::Watch { task_id } => watch::follow(&conn, &mut client, task_id).await,
        TaskCommand::Ls {
            queue,
            name,
            category,
            limit,
        } => {
            let filter = pb::ListActiveTasksRequest {
                queue,
                name,
                category: category.map_or(0, Category::pb),
                ..Default::default()
            };
            ls(&conn, &mut client, filter, limit).await
        }
        TaskCommand::History {
            state,
            name,
            category,
            limit,
        } => {
            let filter = pb::ListTaskHistoryRequest {
                state: state.map_or(0, |s| s.pb() as i32),
                name,
                category: category.map_or(0, Category::pb),
                ..Default::default()
            };
            let tasks = history(&conn, &mut client, filter, limit).await?;
            print_history(&conn, tasks);
            Ok(ExitStatus::Ok)
        }
        TaskCommand::Cancel { task_id, reason } => {
            let request = pb::CancelTaskRequest { task_id, reason };
            let task = one(&conn, client.cancel_task(conn.unary(request)).await)?.task;
            print_changed(&conn, task.unwrap_or_default());
            Ok(ExitStatus::Ok)
        }
        TaskCommand::Retry { task_id } => {
            let request = pb::RetryTaskRequest { task_id };
            let task = one(&conn, client.retry_task(conn.unary(request)).await)?.task;
            print_changed(&conn, task.unwrap_or_default());
            Ok(ExitStatus::Ok)
        }
        TaskCommand::Dead { limit } => dead(&conn, &mut client, limit).await,
        TaskCommand::Requeue { task_ids, all } => {
            let request = pb::RequeueDeadLettersRequest { task_ids, all };
            let reply = one(
                &conn,
                client.requeue_dead_letters(conn.unary(request)).await,
            )?;
            print_requeued(&conn, &reply);
            Ok(ExitStatus::Ok)
        }
    }
}

async fn submit(
    conn: &Conn,
    client: &mut Client,
    args: SubmitArgs,
) -> Result<ExitStatus, CliError> {
    let SubmitArgs {
        name,
        spec,
        countdown,
        expires,
        idempotency_key,
        depends_on,
        debounce_key,
        debounce_window,
        rate_limit_key,
        concurrency_key,
        wait,
    } = args;
    let request = pb::SubmitTaskRequest {
        name,
        category: spec.category.pb(),
        args: spec.args.unwrap_or_default(),
        kwargs: spec.kwargs,
        priority: spec.priority.map_or(0, Priority::pb),
        max_retries: spec.max_retries,
        queue: spec.queue,
        countdown: pb_duration(countdown),
        soft_time_limit: pb_duration(spec.soft_time_limit),
        time_limit: pb_duration(spec.time_limit),
        idempotency_key,
        depends_on,
        debounce_key,
        debounce_window: pb_duration(debounce_window),
        expire_after: match expires {
            Some(Expires::After(d)) => pb_duration(Some(d)),
            _ => None,
        },
        expire_time: match expires {
            Some(Expires::At(at)) => Some(prost_types::Timestamp::from(at)),
            _ => None,
        },
        rate_limit_key,
        concurrency_key,
        ..Default::default()
    };
    let reply = one(conn, client.submit_task(conn.unary(request)).await)?;
    let id = reply
        .task
        .as_ref()
        .map(|t| t.id.clone())
        .unwrap_or_default();
    match (conn.json, wait) {
        // With --wait every line is a Task, as `task watch --json` prints:
        // one shape a script can read line by line.
        (true, true) => {
            print_json("koo.tasks.v1.Task", &reply.task.clone().unwrap_or_default());
            if reply.deduplicated {
                eprintln!("deduplicated: {id} was stored by an earlier submit");
            }
        }
        (true, false) => print_json("koo.tasks.v1.SubmitTaskResponse", &reply),
        (false, _) => outln!("{id}"),
    }
    if wait {
        return watch::follow(conn, client, id).await;
    }
    Ok(ExitStatus::Ok)
}

/// The requeued ids, one a line (the count on stderr), or the reply as JSON.
fn print_requeued(conn: &Conn, reply: &pb::RequeueDeadLettersResponse) {
    if conn.json {
        print_json("koo.tasks.v1.RequeueDeadLettersResponse", reply);
    } else {
        for id in &reply.task_ids {
            outln!("{id}");
        }
        eprintln!("requeued {}", reply.task_ids.len());
    }
}

/// Dead letters (FAILED and TIMED_OUT), newest first.
async fn dead(conn: &Conn, client: &mut Client, limit: usize) -> Result<ExitStatus, CliError> {
    let mut tasks = Vec::new();
    for state in [pb::TaskState::Failed, pb::TaskState::TimedOut] {
        let filter = pb::ListTaskHistoryRequest {
            state: state as i32,
            ..Default::default()
        };
        tasks.extend(history(conn, client, filter, limit).await?);
    }
    tasks.sort_by_key(|t| std::cmp::Reverse(t.end_time.map(|e| (e.seconds, e.nanos))));
    tasks.truncate(limit);
    print_history(conn, tasks);
    Ok(ExitStatus::Ok)
}

/// A unary reply, or the call's failure as the command's error.
pub(crate) fn one<T>(
    conn: &Conn,
    reply: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, CliError> {
    reply
        .map(tonic::Response::into_inner)
        .map_err(|s| conn.failed(s))
}

pub(crate) fn state_name(state: i32) -> String {
    pb::TaskState::try_from(state).map_or_else(
        |_| state.to_string(),
        |s| short(s.as_str_name(), "TASK_STATE_"),
    )
}

fn category_name(category: i32) -> String {
    pb::TaskCategory::try_from(category).map_or_else(
        |_| category.to_string(),
        |c| short(c.as_str_name(), "TASK_CATEGORY_"),
    )
}

/// `ID STATE` after a change (cancel, retry), or the task as JSON.
fn print_changed(conn: &Conn, task: pb::Task) {
    if conn.json {
        print_json("koo.tasks.v1.Task", &task);
    } else {
        outln!("{} {}", task.id, state_name(task.state));
    }
}

/// `42% message`, or nothing before any progress was reported.
fn progress_text(p: &pb::TaskProgress) -> String {
    if p.percent > 0.0 || !p.message.is_empty() {
        format!("{:.0}% {}", p.percent, p.message)
            .trim_end()
            .to_owned()
    } else {
        String::new()
    }
}

/// A task as `field: value` lines.
pub(crate) fn print_task(t: &pb::Task) {
    let json = output::to_json("koo.tasks.v1.Task", t);
    let progress = t.progress.clone().unwrap_or_default();
    let mut lines = vec![
        ("id", t.id.clone()),
        ("name", t.name.clone()),
        ("state", state_name(t.state)),
        ("category", category_name(t.category)),
        ("queue", t.queue.clone()),
        (
            "attempts",
            format!("{} (max retries {})", t.attempts, t.max_retries),
        ),
        ("progress", progress_text(&progress)),
        ("worker", t.worker.clone()),
        ("created", output::time(t.create_time.as_ref())),
        ("started", output::time(t.start_time.as_ref())),
        ("ended", output::time(t.end_time.as_ref())),
    ];
    if !t.schedule.is_empty() {
        lines.push(("schedule", t.schedule.clone()));
    }
    if t.expire_time.is_some() {
        lines.push(("expires", output::time(t.expire_time.as_ref())));
    }
    for field in ["args", "kwargs", "result"] {
        if let Some(v) = json.get(field) {
            lines.push((field, v.to_string()));
        }
    }
    if let Some(e) = &t.error {
        lines.push(("error", e.message.clone()));
    }
    for (name, value) in lines {
        outln!(
            "{:<9} {}",
            format!("{name}:"),
            if value.is_empty() { "-".into() } else { value }
        );
    }
}

async fn ls(
    conn: &Conn,
    client: &mut Client,
    mut filter: pb::ListActiveTasksRequest,
    limit: usize,
) -> Result<ExitStatus, CliError> {
    let mut tasks = Vec::new();
    loop {
        filter.page_size = (limit - tasks.len()).min(1000) as i32;
        let reply = one(
            conn,
            client.list_active_tasks(conn.unary(filter.clone())).await,
        )?;
        tasks.extend(reply.tasks);
        filter.page_token = reply.next_page_token;
        if filter.page_token.is_empty() || tasks.len() >= limit {
            break;
        }
    }
    tasks.truncate(limit);
    if !filter.page_token.is_empty() && !conn.json {
        output::more(tasks.len());
    }
    if conn.json {
        for t in &tasks {
            print_json("koo.tasks.v1.Task", t);
        }
        return Ok(ExitStatus::Ok);
    }
    let rows = tasks.iter().map(|t| {
        let p = t.progress.clone().unwrap_or_default();
        vec![
            t.id.clone(),
            t.name.clone(),
            t.queue.clone(),
            state_name(t.state),
            format!("{:.0}%", p.percent),
            p.message,
            output::time(t.create_time.as_ref()),
        ]
    });
    outln!(
        "{}",
        table(
            &[
                "ID", "NAME", "QUEUE", "STATE", "PROGRESS", "MESSAGE", "CREATED"
            ],
            rows
        )
    );
    Ok(ExitStatus::Ok)
}

async fn history(
    conn: &Conn,
    client: &mut Client,
    mut filter: pb::ListTaskHistoryRequest,
    limit: usize,
) -> Result<Vec<pb::TaskSummary>, CliError> {
    let mut tasks = Vec::new();
    loop {
        filter.page_size = (limit - tasks.len()).min(1000) as i32;
        let reply = one(
            conn,
            client.list_task_history(conn.unary(filter.clone())).await,
        )?;
        tasks.extend(reply.tasks);
        filter.page_token = reply.next_page_token;
        if filter.page_token.is_empty() || tasks.len() >= limit {
            break;
        }
    }
    tasks.truncate(limit);
    if !filter.page_token.is_empty() && !conn.json {
        output::more(tasks.len());
    }
    Ok(tasks)
}

/// Task summaries as a table, or one JSON object per line.
fn print_history(conn: &Conn, tasks: Vec<pb::TaskSummary>) {
    if conn.json {
        for t in &tasks {
            print_json("koo.tasks.v1.TaskSummary", t);
        }
        return;
    }
    let rows = tasks.iter().map(|t| {
        vec![
            t.id.clone(),
            t.name.clone(),
            state_name(t.state),
            t.attempts.to_string(),
            output::duration(t.run_duration.as_ref()),
            output::time(t.end_time.as_ref()),
        ]
    });
    outln!(
        "{}",
        table(&["ID", "NAME", "STATE", "ATTEMPTS", "RAN", "ENDED"], rows)
    );
}
