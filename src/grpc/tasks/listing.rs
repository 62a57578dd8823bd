//! The listing requests (`ListActiveTasks`, `ListTaskHistory`) as the
//! domain's filters, and history entries as `TaskSummary`s.

use tonic::Status;

use super::model::{category, timestamp, to_pb_category, to_pb_state};
use crate::domain::task::{QueueName, State};
use crate::grpc::status::invalid_argument;
use crate::grpc::time;
use crate::pb::tasks::v1 as pb;
use crate::tasks::engine::TaskEngine;
use crate::tasks::listing::{ActiveFilter, HistoryFilter, Summary};

/// Default and largest list page sizes.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

pub(super) fn page_size(raw: i32) -> Result<usize, Status> {
    crate::grpc::page_size(raw, DEFAULT_PAGE, MAX_PAGE)
}

/// The queues a list request covers: a named queue, a category's, or all.
fn queues_for(
    engine: &TaskEngine,
    category_raw: i32,
    queue: &str,
) -> Result<Vec<QueueName>, Status> {
    if !queue.is_empty() {
        QueueName::parse(queue).map_err(|e| invalid_argument("queue", &e.to_string()))?;
        // as PauseQueue and SubmitTask have it: an unknown queue is a
        // mistake, not an empty list
        return Ok(vec![engine.known_queue(queue)?]);
    }
    Ok(match category_raw {
        0 => engine.config().queues(),
        c => vec![category(c)?.default_queue()],
    })
}

/// A `ListActiveTasks` request's filter.
pub(super) fn active_filter(
    engine: &TaskEngine,
    category_raw: i32,
    queue: &str,
    name: String,
) -> Result<ActiveFilter, Status> {
    Ok(ActiveFilter {
        queues: queues_for(engine, category_raw, queue)?,
        name: name_filter(name)?,
    })
}

/// A task-name filter (`name`): empty for every name, else a name as a
/// task could have (1 to 256 printable bytes), so that a filter that could
/// never match is named rather than answered with nothing.
pub(super) fn name_filter(name: String) -> Result<Option<String>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    crate::domain::task::check_task_name(&name).map_err(|e| invalid_argument("name", &e))?;
    Ok(Some(name))
}

/// A `ListTaskHistory` request's filter.
pub(super) fn history_filter(
    engine: &TaskEngine,
    r: &pb::ListTaskHistoryRequest,
) -> Result<HistoryFilter, Status> {
    let state = match pb::TaskState::try_from(r.state) {
        Ok(pb::TaskState::Unspecified) => None,
        Ok(pb::TaskState::Succeeded) => Some(State::Succeeded),
        Ok(pb::TaskState::Failed) => Some(State::Failed),
        Ok(pb::TaskState::Cancelled) => Some(State::Cancelled),
        Ok(pb::TaskState::TimedOut) => Some(State::TimedOut),
        _ => {
            return Err(invalid_argument(
                "state",
                "history holds only end states (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)",
            ));
        }
    };
    let category = match r.category {
        0 => None,
        c => Some(category(c)?),
    };
    let ms = |field: &str, t: Option<prost_types::Timestamp>, default: i64| {
        Ok::<_, Status>(time::time(field, t, None)?.map_or(default, crate::store::unix_millis))
    };
    let since_ms = ms("start_time", r.start_time, 0)?;
    let before_ms = ms("end_time", r.end_time, i64::MAX / 2)?;
    if before_ms < since_ms {
        return Err(invalid_argument(
            "end_time",
            "is before start_time: the window would hold nothing",
        ));
    }
    Ok(HistoryFilter {
        queues: match category {
            Some(c) => vec![c.default_queue()],
            None => engine.config().queues(),
        },
        state,
        category,
        name: name_filter(r.name.clone())?,
        since_ms,
        before_ms,
    })
}

/// A history entry as the API shows it.
pub(super) fn to_pb_summary(e: Summary) -> pb::TaskSummary {
    pb::TaskSummary {
        id: e.id,
        name: e.name,
        category: e.category.map_or(0, |c| to_pb_category(c) as i32),
        state: e.state.map_or(0, |s| to_pb_state(s) as i32),
        attempts: e.attempts as i32,
        end_time: timestamp(Some(e.finished_ms)),
        schedule: e.schedule.unwrap_or_default(),
        start_time: timestamp(e.started_ms),
        run_duration: e.started_ms.map(|s| {
            let ms = e.finished_ms.saturating_sub(s).max(0);
            prost_types::Duration {
                seconds: ms / 1000,
                nanos: ((ms % 1000) * 1_000_000) as i32,
            }
        }),
    }
}
