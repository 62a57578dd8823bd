//! `koo top`: a live terminal view of the queues (depth, running, scheduled,
//! dead letters, throughput) and the workers, fed by WatchTaskMetrics (koo
//! pushes a snapshot each interval) and ListWorkers at each snapshot.
//! ratatui draws it (with crossterm); `q`, Esc or Ctrl-C quits.

use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Row, Table};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

use super::output;
use super::ps;
use super::{CliError, Conn, ConnectArgs, ExitStatus};
use crate::pb::tasks::v1 as pb;
use crate::pb::tasks::v1::task_service_client::TaskServiceClient;
use crate::pb::worker::v1::Worker;

/// `koo top`.
#[derive(Debug, Args)]
pub struct TopCli {
    #[command(flatten)]
    conn: ConnectArgs,
    /// How often koo sends a snapshot (`1s`, `500ms`).
    #[arg(long, default_value = "1s", value_parser = super::connect::parse_duration)]
    interval: Duration,
}

/// What is on screen.
#[derive(Default)]
struct View {
    target: String,
    metrics: pb::WatchTaskMetricsResponse,
    workers: Vec<Worker>,
    /// Per queue: tasks ended so far and when (seconds), for throughput.
    ended: HashMap<String, (i64, f64)>,
    /// Per queue: tasks ended per second over the last interval.
    rates: HashMap<String, f64>,
}

impl View {
    fn update(&mut self, metrics: pb::WatchTaskMetricsResponse, workers: Vec<Worker>) {
        let now = metrics
            .time
            .map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) / 1e9);
        for q in &metrics.queues {
            let done = q.succeeded + q.failed + q.timed_out;
            if let Some((before, then)) = self.ended.get(&q.queue)
                && now > *then
            {
                let rate = (done - before).max(0) as f64 / (now - then);
                self.rates.insert(q.queue.clone(), rate);
            }
            self.ended.insert(q.queue.clone(), (done, now));
        }
        self.metrics = metrics;
        self.workers = workers;
    }

    fn draw(&self, frame: &mut ratatui::Frame) {
        let w = self.metrics.workers.unwrap_or_default();
        let [head, queues, workers, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(self.metrics.queues.len() as u16 + 3),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(
            Line::from(format!(
                "koo top — {}   {}   workers {} live ({} external), slots {}/{} busy",
                self.target,
                output::time(self.metrics.time.as_ref()),
                w.live,
                w.external,
                w.busy,
                w.slots
            )),
            head,
        );
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let rows = self.metrics.queues.iter().map(|q| {
            let rate = self.rates.get(&q.queue).copied().unwrap_or(0.0);
            Row::new(vec![
                q.queue.clone(),
                q.queued.to_string(),
                q.running.to_string(),
                q.scheduled.to_string(),
                q.pending.to_string(),
                q.dead_letters.to_string(),
                format!("{rate:.1}"),
                q.succeeded.to_string(),
                q.failed.to_string(),
                output::duration(q.oldest_wait.as_ref()),
            ])
        });
        let header = [
            "QUEUE",
            "QUEUED",
            "RUNNING",
            "SCHEDULED",
            "PENDING",
            "DEAD",
            "DONE/S",
            "SUCCEEDED",
            "FAILED",
            "OLDEST WAIT",
        ];
        let widths = [Constraint::Length(16)]
            .into_iter()
            .chain(std::iter::repeat_n(Constraint::Length(9), header.len() - 2))
            .chain([Constraint::Min(11)]);
        frame.render_widget(
            Table::new(rows, widths)
                .header(Row::new(header).style(bold))
                .block(Block::bordered().title("queues")),
            queues,
        );
        let rows = ps::rows(&self.workers).into_iter().map(Row::new);
        let widths = [
            Constraint::Length(20),
            Constraint::Length(8),
            Constraint::Min(10),
            Constraint::Min(10),
            Constraint::Length(6),
            Constraint::Min(10),
            Constraint::Length(21),
        ];
        frame.render_widget(
            Table::new(rows, widths)
                .header(Row::new(ps::HEADER).style(bold))
                .block(Block::bordered().title("workers")),
            workers,
        );
        frame.render_widget(Line::from("q quits"), foot);
    }
}

/// Reads keys on a thread of its own (crossterm's reads block) until `q`,
/// Esc or Ctrl-C, or until nobody listens.
fn keys() -> mpsc::UnboundedReceiver<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while !tx.is_closed() {
            match event::poll(Duration::from_millis(100)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(_) => break,
            }
            let Ok(Event::Key(key)) = event::read() else {
                continue;
            };
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if key.kind == KeyEventKind::Press
                && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
            {
                let _ = tx.send(());
                break;
            }
        }
    });
    rx
}

/// Runs `koo top` until a key quits it.
pub async fn run(cli: TopCli) -> Result<ExitStatus, CliError> {
    if !std::io::stdout().is_terminal() {
        return Err(CliError::Usage(
            "koo top needs a terminal; for scripts use `koo task ... --json` or `koo ps --json`"
                .into(),
        ));
    }
    let conn = Conn::open(&cli.conn).await?;
    let mut client = TaskServiceClient::new(conn.channel());
    let request = pb::WatchTaskMetricsRequest {
        interval: prost_types::Duration::try_from(cli.interval).ok(),
    };
    let mut stream = client
        .watch_task_metrics(conn.stream(request))
        .await
        .map_err(|s| conn.failed(s))?
        .into_inner();
    let mut terminal = ratatui::try_init()?;
    let mut quit = keys();
    let mut view = View {
        target: cli.conn.target.clone(),
        ..View::default()
    };
    let result = loop {
        tokio::select! {
            _ = quit.recv() => break Ok(ExitStatus::Ok),
            item = stream.next() => {
                let metrics = match item {
                    Some(Ok(m)) => m,
                    Some(Err(s)) => break Err(conn.failed(s)),
                    None => break Err(conn.failed(tonic::Status::unavailable("koo ended the metrics stream"))),
                };
                let workers = match ps::workers(&conn).await {
                    Ok(w) => w,
                    Err(e) => break Err(e),
                };
                view.update(metrics, workers);
                if let Err(e) = terminal.draw(|f| view.draw(f)) {
                    break Err(e.into());
                }
            }
        }
    };
    ratatui::restore();
    result
}
