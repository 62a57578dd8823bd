//! `koo cron ls|get|create|pause|resume|trigger|rm`: periodic schedules.

use clap::{Args, Subcommand, ValueEnum};

use super::output::{self, print_json, short, table};
use super::task::{Priority, TaskSpec, one, pb_duration, state_name};
use super::{CliError, Conn, ConnectArgs, ExitStatus};
use crate::pb::schedule::v1 as pb;
use crate::pb::schedule::v1::schedule_service_client::ScheduleServiceClient;

/// `koo cron ...`.
#[derive(Debug, Args)]
pub struct CronCli {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(subcommand)]
    command: CronCommand,
}

/// What a schedule does with ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Missed {
    /// Forget them.
    Skip,
    /// Run once for all of them.
    RunOnce,
}

/// `koo cron create`.
#[derive(Debug, Args)]
struct CreateArgs {
    name: String,
    /// Cron expression (`*/5 * * * *`; six fields for seconds).
    #[arg(long)]
    cron: String,
    /// The task's handler name.
    #[arg(long)]
    task: String,
    #[command(flatten)]
    spec: TaskSpec,
    /// IANA time zone of the expression (default UTC).
    #[arg(long, default_value = "")]
    time_zone: String,
    #[arg(long, value_enum)]
    missed: Option<Missed>,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
    /// Each fired task is cancelled ("expired") if it has not started this
    /// long after its tick's submit (`5m`).
    #[arg(long, value_parser = super::connect::parse_duration)]
    expires: Option<std::time::Duration>,
}

#[derive(Debug, Subcommand)]
enum CronCommand {
    /// Every schedule.
    Ls,
    /// One schedule, in full.
    Get { name: String },
    /// Create a schedule that submits TASK at each CRON tick.
    Create(Box<CreateArgs>),
    /// Stop firing (kept, can be resumed).
    Pause { name: String },
    /// Fire again.
    Resume { name: String },
    /// Submit the schedule's task now; prints its id.
    Trigger { name: String },
    /// Delete a schedule.
    Rm { name: String },
}

type Client = ScheduleServiceClient<tonic::transport::Channel>;

/// Runs a `koo cron` command.
pub async fn run(cli: CronCli) -> Result<ExitStatus, CliError> {
    let conn = Conn::open(&cli.conn).await?;
    let mut client = ScheduleServiceClient::new(conn.channel());
    let schedule = match cli.command {
        CronCommand::Ls => return ls(&conn, &mut client).await,
        CronCommand::Get { name } => {
            one(
                &conn,
                client
                    .get_schedule(conn.unary(pb::GetScheduleRequest { name }))
                    .await,
            )?
            .schedule
        }
        CronCommand::Create(args) => create(&conn, &mut client, *args).await?,
        CronCommand::Pause { name } => {
            let request = pb::PauseScheduleRequest { name };
            one(&conn, client.pause_schedule(conn.unary(request)).await)?.schedule
        }
        CronCommand::Resume { name } => {
            let request = pb::ResumeScheduleRequest { name };
            one(&conn, client.resume_schedule(conn.unary(request)).await)?.schedule
        }
        CronCommand::Trigger { name } => {
            let request = pb::TriggerScheduleRequest { name };
            let task = one(&conn, client.trigger_schedule(conn.unary(request)).await)?
                .task
                .unwrap_or_default();
            if conn.json {
                print_json("koo.tasks.v1.Task", &task);
            } else {
                outln!("{}", task.id);
            }
            return Ok(ExitStatus::Ok);
        }
        CronCommand::Rm { name } => {
            let request = pb::DeleteScheduleRequest { name: name.clone() };
            one(&conn, client.delete_schedule(conn.unary(request)).await)?;
            if !conn.json {
                outln!("deleted {name}");
            } else {
                outln!("{{}}");
            }
            return Ok(ExitStatus::Ok);
        }
    };
    let schedule = schedule.unwrap_or_default();
    if conn.json {
        print_json("koo.schedule.v1.Schedule", &schedule);
    } else {
        print_schedule(&schedule);
    }
    Ok(ExitStatus::Ok)
}

/// `koo cron create`: the schedule koo stored.
async fn create(
    conn: &Conn,
    client: &mut Client,
    args: CreateArgs,
) -> Result<Option<pb::Schedule>, CliError> {
    let CreateArgs {
        name,
        cron,
        task,
        spec,
        time_zone,
        missed,
        paused,
        expires,
    } = args;
    let schedule = pb::Schedule {
        name,
        cron,
        time_zone,
        task: Some(pb::TaskTemplate {
            expire_after: pb_duration(expires),
            ..template(task, spec)
        }),
        missed_tick_policy: match missed {
            None => 0,
            Some(Missed::Skip) => pb::MissedTickPolicy::Skip as i32,
            Some(Missed::RunOnce) => pb::MissedTickPolicy::RunOnce as i32,
        },
        ..Default::default()
    };
    let request = pb::CreateScheduleRequest {
        schedule: Some(schedule),
        paused,
    };
    Ok(one(conn, client.create_schedule(conn.unary(request)).await)?.schedule)
}

fn template(name: String, spec: TaskSpec) -> pb::TaskTemplate {
    pb::TaskTemplate {
        name,
        category: spec.category.pb(),
        args: spec.args.unwrap_or_default(),
        kwargs: spec.kwargs,
        priority: spec.priority.map_or(0, Priority::pb),
        max_retries: spec.max_retries,
        queue: spec.queue,
        soft_time_limit: pb_duration(spec.soft_time_limit),
        time_limit: pb_duration(spec.time_limit),
        expire_after: None,
        rate_limit_key: String::new(),
        concurrency_key: String::new(),
    }
}

fn last_run(s: &pb::Schedule) -> String {
    s.last_run.as_ref().map_or_else(
        || "-".to_owned(),
        |r| {
            // a trigger has no tick: its end (or the task) says when
            let when = match (&r.tick_time, &r.end_time) {
                (Some(t), _) => output::time(Some(t)),
                (None, Some(end)) => format!("ended {}", output::time(Some(end))),
                (None, None) => "-".to_owned(),
            };
            let how = if r.triggered { " (triggered)" } else { "" };
            format!("{when} {}{how} {}", state_name(r.state), r.task_id)
                .trim_end()
                .to_owned()
        },
    )
}

fn print_schedule(s: &pb::Schedule) {
    let task = s.task.clone().unwrap_or_default();
    let json = output::to_json("koo.schedule.v1.TaskTemplate", &task);
    let source = pb::ScheduleSource::try_from(s.source).map_or_else(
        |_| s.source.to_string(),
        |v| short(v.as_str_name(), "SCHEDULE_SOURCE_"),
    );
    let next = s
        .next_fire_times
        .iter()
        .map(|t| output::time(Some(t)))
        .collect::<Vec<_>>();
    let lines = [
        ("name", s.name.clone()),
        ("cron", s.cron.clone()),
        (
            "time zone",
            if s.time_zone.is_empty() {
                "UTC".into()
            } else {
                s.time_zone.clone()
            },
        ),
        ("paused", s.paused.to_string()),
        ("source", source),
        ("task", json.to_string()),
        ("next", next.join(", ")),
        ("last run", last_run(s)),
    ];
    for (name, value) in lines {
        outln!(
            "{:<10} {}",
            format!("{name}:"),
            if value.is_empty() { "-".into() } else { value }
        );
    }
}

async fn ls(conn: &Conn, client: &mut Client) -> Result<ExitStatus, CliError> {
    let mut schedules = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListSchedulesRequest {
            page_size: 100,
            page_token,
        };
        let reply = one(conn, client.list_schedules(conn.unary(request)).await)?;
        schedules.extend(reply.schedules);
        page_token = reply.next_page_token;
        if page_token.is_empty() {
            break;
        }
    }
    if conn.json {
        for s in &schedules {
            print_json("koo.schedule.v1.Schedule", s);
        }
        return Ok(ExitStatus::Ok);
    }
    let rows = schedules.iter().map(|s| {
        vec![
            s.name.clone(),
            s.cron.clone(),
            s.task.as_ref().map(|t| t.name.clone()).unwrap_or_default(),
            if s.paused { "paused" } else { "active" }.to_owned(),
            output::time(s.next_fire_times.first()),
            last_run(s),
        ]
    });
    outln!(
        "{}",
        table(
            &["NAME", "CRON", "TASK", "STATUS", "NEXT", "LAST RUN"],
            rows
        )
    );
    Ok(ExitStatus::Ok)
}
