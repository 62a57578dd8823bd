//! The task watch streams (`WatchTask`, `WatchTasks`) as gRPC response
//! streams over the domain's watchers ([`crate::watch`]).
//!
//! No task is spawned per watcher: each stream is a state machine that tonic
//! polls, popping its watcher's buffer, so an idle watcher is a few hundred
//! bytes and no work.

use tonic::Status;

use super::model::{progress, timestamp, to_pb_state, to_pb_task};
use crate::pb::tasks::v1 as pb;
use crate::watch::{Delivered, QueuesWatch, TaskWatch};

/// A `WatchTask` response stream.
pub(crate) type TaskStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchTaskResponse, Status>> + Send>>;

/// A `WatchTasks` response stream.
pub(crate) type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchTasksResponse, Status>> + Send>>;

/// The `WatchTask` response stream: the task now, then each change until it
/// ends.
pub(crate) fn task_stream(watch: TaskWatch) -> TaskStream {
    Box::pin(futures::stream::unfold(watch, |mut w| async move {
        let reply = w
            .next()
            .await?
            .map_err(Status::from)
            .map(|task| pb::WatchTaskResponse {
                task: Some(to_pb_task(task)),
            });
        Some((reply, w))
    }))
}

/// The `WatchTasks` response stream: every matching event, each with its
/// token.
pub(crate) fn event_stream(watch: QueuesWatch) -> EventStream {
    Box::pin(futures::stream::unfold(watch, |mut w| async move {
        let reply = w.next().await?.map_err(Status::from).map(reply);
        Some((reply, w))
    }))
}

fn reply(d: Delivered) -> pb::WatchTasksResponse {
    let e = &d.event;
    pb::WatchTasksResponse {
        task_id: e.event.id.clone(),
        queue: e.queue.to_string(),
        state: e.state.map_or(0, |s| to_pb_state(s) as i32),
        progress: e.event.progress.as_deref().and_then(progress),
        event_time: timestamp(Some(e.event.at_ms)),
        resume_token: d.resume_token,
        name: e.event.name.clone(),
    }
}
