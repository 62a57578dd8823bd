//! Listing active tasks and history across queues, a page at a time.
//!
//! Page tokens are opaque to clients and bound to the filters they were
//! issued for. Active tasks are listed queue by queue (running, queued,
//! scheduled) by position, so a task that moves between pages may be missed
//! or repeated; history is listed newest first by end time and id, which do
//! not move, so it pages exactly.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::engine::{TaskEngine, TaskError};
use crate::domain::task::{Category, QueueName, State, Task};
use crate::store::{Deadline, fnv1a};

/// Store round trips one page may take before it returns what it has.
const MAX_ROUNDS: usize = 20;

/// Which active tasks to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveFilter {
    /// Queues to look in.
    pub queues: Vec<QueueName>,
    /// Only this task name.
    pub name: Option<String>,
}

/// Which ended tasks to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryFilter {
    /// Queues to look in.
    pub queues: Vec<QueueName>,
    /// Only this end state.
    pub state: Option<State>,
    /// Only this category.
    pub category: Option<Category>,
    /// Only this task name.
    pub name: Option<String>,
    /// Ended at or after (ms since the epoch).
    pub since_ms: i64,
    /// Ended before (ms since the epoch).
    pub before_ms: i64,
}

/// What history keeps of an ended task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its category.
    pub category: Option<Category>,
    /// Its end state.
    pub state: Option<State>,
    /// Attempts made.
    pub attempts: u32,
    /// When it ended (ms).
    pub finished_ms: i64,
    /// When its last attempt started (ms), if one did: its run time is
    /// `finished_ms - started_ms`.
    pub started_ms: Option<i64>,
    /// The schedule that submitted it, if one did.
    pub schedule: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ActiveToken {
    f: u64,
    q: usize,
    s: usize,
    o: u64,
}

#[derive(Serialize, Deserialize)]
struct HistoryToken {
    f: u64,
    ms: i64,
    id: String,
}

fn encode<T: Serialize>(token: &T) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(token).unwrap_or_default())
}

fn decode<T: for<'a> Deserialize<'a>>(token: &str) -> Result<T, TaskError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| TaskError::InvalidArgument {
            field: "page_token".into(),
            reason: format!(
                "{} is not a token this server issued",
                crate::quote::quote(token)
            ),
        })
}

fn mismatch() -> TaskError {
    TaskError::InvalidArgument {
        field: "page_token".into(),
        reason: "was issued for other filters".into(),
    }
}

impl TaskEngine {
    /// One page of active tasks.
    pub async fn list_active(
        &self,
        filter: &ActiveFilter,
        page_size: usize,
        token: &str,
        deadline: Deadline,
    ) -> Result<(Vec<Task>, String), TaskError> {
        let fingerprint = fnv1a(format!("{filter:?}").as_bytes());
        let (mut q, mut set, mut offset) = if token.is_empty() {
            (0, 0, 0)
        } else {
            let t: ActiveToken = decode(token)?;
            if t.f != fingerprint {
                return Err(mismatch());
            }
            (t.q, t.s, t.o)
        };
        let mut page = Vec::new();
        for _ in 0..MAX_ROUNDS {
            if page.len() >= page_size || q >= filter.queues.len() {
                break;
            }
            let (tasks, next) = self
                .store()
                .list_active(
                    &filter.queues[q],
                    set,
                    offset,
                    page_size - page.len(),
                    deadline,
                )
                .await?;
            page.extend(
                tasks
                    .into_iter()
                    .filter(|t| filter.name.as_ref().is_none_or(|n| *n == t.name)),
            );
            match next {
                Some((s, o)) => (set, offset) = (s, o),
                None => (q, set, offset) = (q + 1, 0, 0),
            }
        }
        let next = if q < filter.queues.len() {
            encode(&ActiveToken {
                f: fingerprint,
                q,
                s: set,
                o: offset,
            })
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// One page of history, newest first.
    pub async fn list_history(
        &self,
        filter: &HistoryFilter,
        page_size: usize,
        token: &str,
        deadline: Deadline,
    ) -> Result<(Vec<Summary>, String), TaskError> {
        let fingerprint = fnv1a(format!("{filter:?}").as_bytes());
        let (mut max_ms, mut below) = if token.is_empty() {
            (filter.before_ms.saturating_sub(1), None)
        } else {
            let t: HistoryToken = decode(token)?;
            if t.f != fingerprint {
                return Err(mismatch());
            }
            (t.ms, Some(t.id))
        };
        let mut page = Vec::new();
        let mut exhausted = false;
        for _ in 0..MAX_ROUNDS {
            if page.len() >= page_size {
                break;
            }
            let want = page_size - page.len();
            let mut merged = Vec::new();
            let mut all_short = true;
            for queue in &filter.queues {
                let entries = self
                    .store()
                    .history_page(
                        queue,
                        max_ms,
                        below.as_deref(),
                        filter.since_ms,
                        want,
                        deadline,
                    )
                    .await?;
                all_short &= entries.len() < want;
                merged.extend(entries);
            }
            merged.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
            let took_all = merged.len() <= want;
            for (id, ms, summary) in merged.into_iter().take(want) {
                (max_ms, below) = (ms, Some(id.clone()));
                let s = parse_summary(id, ms, &summary);
                let keep = filter.state.is_none_or(|st| s.state == Some(st))
                    && filter.category.is_none_or(|c| s.category == Some(c))
                    && filter.name.as_ref().is_none_or(|n| *n == s.name);
                if keep {
                    page.push(s);
                }
            }
            if all_short && took_all {
                exhausted = true;
                break;
            }
        }
        let next = if exhausted {
            String::new()
        } else {
            encode(&HistoryToken {
                f: fingerprint,
                ms: max_ms,
                id: below.unwrap_or_default(),
            })
        };
        Ok((page, next))
    }
}

fn parse_summary(id: String, ms: i64, json: &str) -> Summary {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    Summary {
        id,
        name: v["name"].as_str().unwrap_or_default().to_owned(),
        category: v["category"].as_str().and_then(Category::parse),
        state: v["state"].as_str().and_then(State::parse),
        attempts: v["attempts"].as_u64().unwrap_or(0) as u32,
        finished_ms: ms,
        started_ms: v["started_ms"].as_i64(),
        schedule: v["schedule"].as_str().map(str::to_owned),
    }
}
