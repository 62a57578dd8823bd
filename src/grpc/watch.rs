//! The task watch streams (`WatchTask`, `WatchTasks`) as gRPC response
//! streams over the process's feeds ([`crate::watch`]).
//!
//! No task is spawned per watcher: each stream is a state machine that tonic
//! polls, popping its watcher's buffer, so an idle watcher is a few hundred
//! bytes and no work.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::status::invalid_argument;
use super::tasks::{progress, timestamp, to_pb_state, to_pb_task};
use crate::domain::task::{QueueName, State, Task};
use crate::pb::tasks::v1 as pb;
use crate::store::{Deadline, StoreError};
use crate::tasks::engine::TaskError;
use crate::watch::{Event, Hub, Next, Permit, Subscription, WatchError};

/// A `WatchTask` response stream.
pub(crate) type TaskStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchTaskResponse, Status>> + Send>>;

/// A `WatchTasks` response stream.
pub(crate) type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::WatchTasksResponse, Status>> + Send>>;

/// One `WatchTask` watcher.
pub(crate) struct TaskWatch {
    pub hub: Hub,
    pub sub: Subscription,
    /// The task as read when the watch began: the first reply.
    pub first: Option<Task>,
    pub shutdown: CancellationToken,
    /// Deadline of each re-read.
    pub timeout: Duration,
    /// Held for the stream's life: it counts against `KOO_MAX_WATCHERS`.
    pub _permit: Permit,
}

struct TaskWatchState {
    w: TaskWatch,
    last: Option<Task>,
    done: bool,
}

impl TaskWatch {
    /// The response stream: the task now, then each change until it ends.
    pub fn into_stream(self) -> TaskStream {
        let state = TaskWatchState {
            w: self,
            last: None,
            done: false,
        };
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            let reply = s.next_reply().await?;
            Some((reply, s))
        }))
    }
}

impl TaskWatchState {
    async fn next_reply(&mut self) -> Option<Result<pb::WatchTaskResponse, Status>> {
        if self.done {
            return None;
        }
        let task = match self.w.first.take() {
            Some(first) => first,
            None => match self.next_change().await {
                Ok(Some(task)) => task,
                Ok(None) => return None,
                Err(status) => {
                    self.done = true;
                    return Some(Err(status));
                }
            },
        };
        self.done = task.state.is_final();
        self.last = Some(task.clone());
        Some(Ok(pb::WatchTaskResponse {
            task: Some(to_pb_task(task)),
        }))
    }

    /// The task after its next change; `None` when koo stops.
    async fn next_change(&mut self) -> Result<Option<Task>, Status> {
        let id = match &self.last {
            Some(t) => t.id.to_string(),
            None => return Ok(None),
        };
        loop {
            let next_state = tokio::select! {
                biased;
                _ = self.w.shutdown.cancelled() => return Ok(None),
                next = self.w.sub.next() => match next {
                    Next::Event(e) => e.state,
                    // events were dropped: re-read
                    Next::Resync | Next::Gap(_) | Next::FellBehind => None,
                    Next::Closed if self.w.shutdown.is_cancelled() => return Ok(None),
                    Next::Closed => return Err(Status::unavailable("task events stopped; watch again")),
                },
            };
            // Every event is sent with the state it recorded (a lease moves a
            // task through QUEUED and RUNNING in one step, and both are
            // shown); the other fields come from a fresh read.
            let last = self.last.as_ref();
            match self
                .w
                .hub
                .engine()
                .get(&id, Deadline::after(self.w.timeout))
                .await
            {
                Ok(mut task) => {
                    if let Some(st) = next_state {
                        task.state = st;
                    } else if last
                        .is_some_and(|l| l.state == task.state && l.progress == task.progress)
                    {
                        continue;
                    }
                    return Ok(Some(task));
                }
                // The result expired right after the end: the final state
                // still goes out.
                Err(TaskError::NotFound(_)) if next_state.is_some_and(State::is_final) => {
                    let Some(mut task) = self.last.clone() else {
                        return Ok(None);
                    };
                    task.state = next_state.unwrap_or(task.state);
                    return Ok(Some(task));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Decodes a `WatchTasks` resume token: each queue's position.
pub(crate) fn decode_token(token: &str) -> Result<BTreeMap<String, String>, Status> {
    if token.is_empty() {
        return Ok(BTreeMap::new());
    }
    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| invalid_argument("resume_token", "is not a token this server issued"))
}

/// Encodes a resume token: base64 of the positions as a JSON object.
///
/// Built per event for every watcher, so the common case (queue names and
/// store positions, which need no escaping) is written directly; the
/// output is byte for byte what `serde_json` writes, which other cases use.
fn encode_token(positions: &BTreeMap<String, String>) -> String {
    fn plain(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    }
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let json = if positions.iter().all(|(k, v)| plain(k) && plain(v)) {
        let mut json = String::with_capacity(2 + positions.len() * 40);
        json.push('{');
        for (i, (k, v)) in positions.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push('"');
            json.push_str(k);
            json.push_str("\":\"");
            json.push_str(v);
            json.push('"');
        }
        json.push('}');
        json.into_bytes()
    } else {
        serde_json::to_vec(positions).unwrap_or_default()
    };
    let mut token = String::with_capacity(json.len() * 4 / 3 + 4);
    base64::Engine::encode_string(engine, &json, &mut token);
    token
}

/// One `WatchTasks` watcher.
pub(crate) struct TasksWatch {
    pub sub: Subscription,
    /// Each queue's position: the token's, with the watched queues' where
    /// this watch begins.
    pub positions: BTreeMap<String, String>,
    pub shutdown: CancellationToken,
    pub buffer: usize,
    /// Held for the stream's life: it counts against `KOO_MAX_WATCHERS`.
    pub _permit: Permit,
}

impl TasksWatch {
    /// Subscribes `hub` watchers to `queues` after the token's positions.
    pub async fn subscribe(
        hub: &Hub,
        queues: Vec<QueueName>,
        name: String,
        token: &str,
        deadline: Deadline,
    ) -> Result<(Subscription, BTreeMap<String, String>), Status> {
        let mut positions = decode_token(token)?;
        let wanted: Vec<(QueueName, Option<String>)> = queues
            .into_iter()
            .map(|q| {
                let after = positions.get(q.as_str()).cloned();
                (q, after)
            })
            .collect();
        let filter = if name.is_empty() {
            crate::watch::Filter::All
        } else {
            crate::watch::Filter::Name(name)
        };
        let sub = hub
            .subscribe(&wanted, filter, crate::watch::Overflow::End, deadline)
            .await
            .map_err(|e| match e {
                StoreError::InvalidCursor(reason) => invalid_argument("resume_token", &reason),
                other => other.into(),
            })?;
        for (queue, start) in sub.positions() {
            positions.insert(queue.to_string(), start.clone());
        }
        Ok((sub, positions))
    }

    /// The response stream: every matching event, each with its token.
    pub fn into_stream(self) -> EventStream {
        Box::pin(futures::stream::unfold(
            (self, false),
            |(mut w, done)| async move {
                if done {
                    return None;
                }
                let reply = w.next_reply().await?;
                let done = reply.is_err();
                Some((reply, (w, done)))
            },
        ))
    }

    async fn next_reply(&mut self) -> Option<Result<pb::WatchTasksResponse, Status>> {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                next = self.sub.next() => next,
            };
            return match next {
                Next::Event(e) => Some(Ok(self.reply(&e))),
                Next::Resync => continue,
                Next::FellBehind => Some(Err(WatchError::FellBehind {
                    buffer: self.buffer,
                    resume_token: encode_token(&self.positions),
                }
                .into())),
                Next::Gap(queue) => Some(Err(WatchError::Gap { queue }.into())),
                Next::Closed if self.shutdown.is_cancelled() => None,
                Next::Closed => Some(Err(Status::unavailable("task events stopped; watch again"))),
            };
        }
    }

    fn reply(&mut self, e: &Arc<Event>) -> pb::WatchTasksResponse {
        if let Some(p) = self.positions.get_mut(e.queue.as_str()) {
            p.clone_from(&e.event.stream_id);
        }
        pb::WatchTasksResponse {
            task_id: e.event.id.clone(),
            queue: e.queue.to_string(),
            state: e.state.map_or(0, |s| to_pb_state(s) as i32),
            progress: e.event.progress.as_deref().and_then(progress),
            event_time: timestamp(Some(e.event.at_ms)),
            resume_token: encode_token(&self.positions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_what_serde_json_writes_and_decode_back() {
        let mut p = BTreeMap::new();
        for (q, pos) in [
            ("research", "1796435668212-0"),
            ("ai_service", "0-0"),
            ("x.y-z", "42"),
        ] {
            p.insert(q.to_owned(), pos.to_owned());
        }
        let json = serde_json::to_vec(&p).unwrap();
        let expected =
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, json);
        assert_eq!(encode_token(&p), expected);
        assert_eq!(decode_token(&encode_token(&p)).unwrap(), p);
        // a position that needs escaping (kept from a client's token)
        p.insert("q".into(), "a\"b".into());
        assert_eq!(decode_token(&encode_token(&p)).unwrap(), p);
    }
}
