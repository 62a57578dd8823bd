//! Following a queue's event stream on Redis (`XREAD BLOCK` on a
//! connection of the reader's own), and where a reader may start: now, or
//! after a resume token's position if the stream still holds what follows.

use std::collections::HashMap;
use std::time::Duration;

use crate::keys::QueueKeys;
use crate::store::redis::RedisStore;
use crate::store::tasks::TaskEvent;
use crate::store::{Deadline, Result, StoreError};

use super::millis;

/// Follows one queue's event stream on a connection of its own, from the
/// moment it was opened.
pub struct StreamReader {
    conn: Option<crate::store::redis::conn::Conn>,
    store: RedisStore,
    stream: String,
    last: String,
}

impl StreamReader {
    /// The position after the last event read.
    pub fn position(&self) -> &str {
        &self.last
    }

    /// The next events, at most `max`, waiting up to `block` for some
    /// (empty after that).
    pub async fn next(&mut self, block: Duration, max: usize) -> Result<Vec<TaskEvent>> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => self
                .conn
                .insert(blocking_conn(&self.store, block, "an event").await?),
        };
        // Field-value pairs as read, not a map: an event has five fields, and
        // hashing them costs more than a scan.
        type Entries = Vec<(String, Vec<(String, String)>)>;
        let reply: redis::RedisResult<Option<Vec<(String, Entries)>>> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(millis(block).max(1))
            .arg("COUNT")
            .arg(max)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&self.last)
            .query_async(conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // reconnect on the next call
                self.conn = None;
                return Err(StoreError::Unavailable(format!(
                    "event stream read failed: {e}"
                )));
            }
        };
        let mut events = Vec::new();
        for (stream_id, fields) in reply.into_iter().flatten().flat_map(|(_, entries)| entries) {
            self.last.clone_from(&stream_id);
            let (mut id, mut state, mut name, mut progress, mut at_ms) =
                (None, None, None, None, 0);
            for (field, value) in fields {
                match field.as_str() {
                    "id" => id = Some(value),
                    "state" => state = Some(value),
                    "name" => name = Some(value),
                    "progress" => progress = Some(value),
                    "at" => at_ms = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            if let (Some(id), Some(state)) = (id, state) {
                events.push(TaskEvent {
                    stream_id,
                    id,
                    name: name.unwrap_or_default(),
                    state,
                    progress,
                    at_ms,
                });
            }
        }
        Ok(events)
    }
}

/// A connection of its own for a command that blocks up to `block` (its
/// replies wait that long and 5 s more); `what` names it in the error.
pub(super) async fn blocking_conn(
    store: &RedisStore,
    block: Duration,
    what: &str,
) -> Result<crate::store::redis::conn::Conn> {
    let inner = &store.inner;
    inner
        .connector
        .dedicated(inner.connect_timeout, block + Duration::from_secs(5))
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot open {what} connection: {e}")))
}

/// A stream entry id `ms-seq` as a comparable pair.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl RedisStore {
    /// A reader of the queue's events from now on: every event appended
    /// after this returns will be read.
    pub(super) async fn event_reader(
        &self,
        keys: &QueueKeys,
        deadline: Deadline,
    ) -> Result<StreamReader> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(keys.events()).arg("+").arg("-").arg("COUNT").arg(1);
        type Entries = Vec<(String, HashMap<String, String>)>;
        let newest: Entries = self.query(&cmd, deadline).await?;
        Ok(StreamReader {
            conn: None,
            store: self.clone(),
            stream: keys.events(),
            last: newest
                .into_iter()
                .next()
                .map_or_else(|| "0-0".to_owned(), |(id, _)| id),
        })
    }

    /// A reader of the queue's events after stream position `after` (a
    /// resume token's position). `Expired` when the stream has trimmed
    /// entries and its oldest kept entry is past `after`: resuming would
    /// silently skip what was trimmed. (Redis does not say which ids it
    /// trimmed, so a position exactly at the last trimmed entry is refused
    /// too: a spurious refusal costs a re-watch, a silent gap costs events.)
    pub(super) async fn event_reader_after(
        &self,
        keys: &QueueKeys,
        after: &str,
        deadline: Deadline,
    ) -> Result<StreamReader> {
        let Some(position) = stream_id(after) else {
            return Err(StoreError::InvalidCursor(format!(
                "{} is not an event position",
                crate::quote::quote(after)
            )));
        };
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("STREAM").arg(keys.events());
        // no stream yet: nothing was trimmed
        let info: HashMap<String, redis::Value> =
            self.query(&cmd, deadline).await.unwrap_or_default();
        let number = |name: &str| {
            info.get(name)
                .and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        };
        let first = info
            .get("recorded-first-entry-id")
            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
            .and_then(|id| stream_id(&id));
        let trimmed = matches!(
            (number("entries-added"), number("length")),
            (Some(added), Some(length)) if added > length
        );
        if trimmed && first.is_some_and(|first| first > position) {
            return Err(StoreError::Expired(format!(
                "events after position {after} are no longer kept (each queue keeps a capped number of recent events); watch again without a resume token"
            )));
        }
        Ok(StreamReader {
            conn: None,
            store: self.clone(),
            stream: keys.events(),
            last: after.to_owned(),
        })
    }
}
