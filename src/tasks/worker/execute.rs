//! One run of a leased task on a built-in slot: the handler in a task of
//! its own, under its soft and hard limits, the cancel grace and the
//! shutdown grace, heartbeating its lease.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use super::registry::{HandlerError, Registry, TaskContext};
use crate::domain::task::Task;
use crate::store::Deadline;
use crate::tasks::engine::{CancelAsked, Finish, TaskEngine, TaskError};
use crate::trace;

/// How a run of a leased task ended.
pub(super) enum Ended {
    /// The handler ended (or hit a time limit): report it.
    Finished(Finish),
    /// The lease was lost: the new holder owns the outcome.
    Lost,
    /// The worker is stopping and the handler did not end within the
    /// shutdown grace: hand the task back.
    HandBack,
}

/// Runs one leased task to its end. When `stop` fires, the handler gets the
/// shutdown grace to end, then is abandoned and the task handed back.
pub(super) async fn execute(
    engine: &TaskEngine,
    registry: &Registry,
    task: &Task,
    cancels: &mut tokio::sync::broadcast::Receiver<CancelAsked>,
    stop: &CancellationToken,
) -> Ended {
    // Cancels sent before this run began are about earlier runs (a cancel
    // for this one since its lease is also in the store: the heartbeat
    // carries it).
    while !matches!(
        cancels.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Empty
            | tokio::sync::broadcast::error::TryRecvError::Closed)
    ) {}
    let Some(handler) = registry.handlers.get(&task.name).cloned() else {
        // Leasing filters by name, so this is a registry that changed.
        return Ended::Finished(Finish::failed(
            format!("no handler for {}", task.name),
            true,
        ));
    };
    let cancel = CancellationToken::new();
    let ctx = TaskContext {
        task: task.clone(),
        cancel: cancel.clone(),
        engine: engine.clone(),
    };
    // the handler runs in the task's `task.run` span (when traces are
    // exported), a child of the span that submitted the task
    let run = trace::run::start(task);
    let running = tokio::spawn(trace::run::InContext::new(handler(ctx), run.clone()));
    let ended = supervise(engine, task, running, cancel, cancels, stop).await;
    let (outcome, error) = match &ended {
        Ended::Finished(Finish::Succeeded(_)) => ("succeeded", None),
        Ended::Finished(Finish::Failed { message, .. }) => ("failed", Some(message.as_str())),
        Ended::Finished(Finish::TimedOut) => ("timed_out", Some("hard time limit reached")),
        Ended::Lost => ("lost", None),
        Ended::HandBack => ("handed_back", None),
    };
    trace::run::finish(run, outcome, error);
    ended
}

/// Watches a running handler until it ends or is abandoned. This is one
/// `select!` over the handler and its five timers (soft and hard limits,
/// shutdown grace, cancel grace, heartbeat) and the cancels: the arms
/// share their state (whether a cancel or a stop is under way), so they
/// stay together here, a little over the usual length, and each arm does
/// one thing.
async fn supervise(
    engine: &TaskEngine,
    task: &Task,
    mut running: JoinHandle<Result<serde_json::Value, HandlerError>>,
    cancel: CancellationToken,
    cancels: &mut tokio::sync::broadcast::Receiver<CancelAsked>,
    stop: &CancellationToken,
) -> Ended {
    let soft = tokio::time::sleep(Duration::from_millis(task.soft_ms));
    let hard = tokio::time::sleep(Duration::from_millis(task.hard_ms));
    // armed when `stop` fires
    let hand_back = tokio::time::sleep(Duration::ZERO);
    let mut stopping = false;
    // armed when a cancel is asked for: the handler's token fires at once,
    // and a handler still running at the end of the grace is abandoned
    let cancel_grace = tokio::time::sleep(Duration::ZERO);
    let mut cancelling = false;
    let mut cancels_open = true;
    tokio::pin!(soft, hard, hand_back, cancel_grace);
    let start_cancel = |cancelling: &mut bool, grace: std::pin::Pin<&mut tokio::time::Sleep>| {
        if !*cancelling {
            *cancelling = true;
            tracing::info!(task = %task.id, "cancel asked for; asking the handler to stop");
            cancel.cancel();
            grace.reset(Instant::now() + engine.config().cancel_grace);
        }
    };
    let mut soft_fired = task.soft_ms == 0;
    // The first heartbeat is due a third of a lease from now. (Not
    // `interval` + its immediate first tick: a timer due "now" still waits
    // for the timer wheel's next millisecond, a millisecond per task.)
    let period = engine.config().lease / 3;
    let mut beat = tokio::time::interval_at(Instant::now() + period, period);
    let mut last_beat = Instant::now();
    let finish = loop {
        tokio::select! {
            joined = &mut running => break ended(joined),
            _ = &mut soft, if !soft_fired => {
                soft_fired = true;
                tracing::info!(task = %task.id, "soft time limit reached; asking the handler to stop");
                cancel.cancel();
            }
            _ = &mut hard, if task.hard_ms > 0 => {
                running.abort();
                tracing::warn!(task = %task.id, "hard time limit reached; handler abandoned");
                break Finish::TimedOut;
            }
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                hand_back.as_mut().reset(Instant::now() + engine.config().shutdown_grace);
            }
            _ = &mut hand_back, if stopping => {
                running.abort();
                if cancelling {
                    // a cancelled task is not handed back to run again
                    break Finish::failed("the worker stopped while the task was being cancelled".to_owned(), false);
                }
                return Ended::HandBack;
            }
            got = cancels.recv(), if cancels_open && !cancelling => match got {
                // built-in handlers see the cancel, not its reason (their
                // context has a token, not a message)
                Ok(asked) if asked.id == task.id => start_cancel(&mut cancelling, cancel_grace.as_mut()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                // the heartbeat still carries cancels
                Err(tokio::sync::broadcast::error::RecvError::Closed) => cancels_open = false,
            },
            _ = &mut cancel_grace, if cancelling => {
                running.abort();
                tracing::warn!(task = %task.id, "the handler did not stop after a cancel; abandoned");
                break Finish::failed("the handler did not stop within the cancel grace".to_owned(), false);
            }
            _ = beat.tick() => match heartbeat(engine, task, &mut last_beat).await {
                Beat::Held => {}
                Beat::CancelAsked => start_cancel(&mut cancelling, cancel_grace.as_mut()),
                Beat::Lost => {
                    running.abort();
                    return Ended::Lost;
                }
            },
        }
    };
    Ended::Finished(finish)
}

/// How a handler's task ended, as a finish to report.
fn ended(joined: Result<Result<serde_json::Value, HandlerError>, JoinError>) -> Finish {
    match joined {
        Ok(Ok(result)) => Finish::Succeeded(result.to_string()),
        Ok(Err(e)) => Finish::failed(e.message, e.retryable),
        Err(e) if e.is_panic() => Finish::failed("the handler panicked".to_owned(), true),
        Err(_) => Finish::failed("the handler was aborted".to_owned(), true),
    }
}

/// What a slot's heartbeat found.
enum Beat {
    /// The lease is extended (or the store failed within the lease: the
    /// next beat tries again).
    Held,
    /// A cancel was asked for.
    CancelAsked,
    /// The lease is someone else's, or lapsed: abandon the handler.
    Lost,
}

/// Extends the lease of a running task; `last_beat` is when it last was.
async fn heartbeat(engine: &TaskEngine, task: &Task, last_beat: &mut Instant) -> Beat {
    let lease = engine.config().lease;
    match engine
        .heartbeat(&task.id, task.token, Deadline::after(lease / 3))
        .await
    {
        Ok(cancel_asked) => {
            *last_beat = Instant::now();
            if cancel_asked.is_some() {
                Beat::CancelAsked
            } else {
                Beat::Held
            }
        }
        Err(TaskError::Fenced(_)) => {
            tracing::warn!(task = %task.id, "lease lost; handler abandoned, the new holder owns the outcome");
            Beat::Lost
        }
        // A whole lease without a heartbeat: the lease has lapsed and the
        // task may run elsewhere; stop running it here.
        Err(e) if last_beat.elapsed() >= lease => {
            tracing::warn!(task = %task.id, error = %e, "no heartbeat for a whole lease; handler abandoned");
            Beat::Lost
        }
        Err(e) => {
            tracing::warn!(task = %task.id, error = %e, "heartbeat failed; will retry");
            Beat::Held
        }
    }
}
