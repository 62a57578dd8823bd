//! Every Redis key name koo writes, built in one place.
//!
//! Layout, with the default prefix `koo`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `koo:cache:{level}:{key}` | string | a cached value (always with a TTL) |
//! | `koo:v1:clock:{level}:{key}` | string | a compute lock (GetOrLock): its holder's token, and `\|task id` for GetOrCompute (always with a TTL, the lease) |
//! | `koo:v1:ctag:{level}:{tag}` | string | a cache tag's version (a random u64, decimal; expires with the last entry that carries it; see `cache::tags`) |
//! | `koo:stats:cache:instances` | sorted set | koo instances publishing cache metrics, scored by last publish (ms) |
//! | `koo:stats:cache:instance:{id}` | string | one instance's metrics record (with a TTL) |
//! | `koo:v1:cache:changes` | Pub/Sub channel | cache changes, published only while someone watches (see `cache::bus`) |
//! | `koo:v1:cache:watched` | string | "someone watches": the Redis time (ms) it was set, kept alive (3 s TTL) by every koo with watchers |
//!
//! Task keys (data format `v1`) share their queue's hash tag `{t:QUEUE}`, so
//! that every transition of a task touches one Redis Cluster slot; see
//! `docs/design/tasks.md`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `koo:v1:{t:Q}:task:{id}` | hash | a task (expires `result_ttl` after its end; a dead letter `dead_ttl`) |
//! | `koo:v1:{t:Q}:task:{id}:log` | list | its ended attempts |
//! | `koo:v1:{t:Q}:ready` / `:scheduled` / `:leases` | sorted sets | queued, waiting, running ids |
//! | `koo:v1:{t:Q}:history` / `:history:data` / `:dead` | sorted set, hash, sorted set | ended tasks (capped), dead letters |
//! | `koo:v1:{t:Q}:events` | stream | state changes and progress (capped) |
//! | `koo:v1:{t:Q}:stats` | hash | counts per outcome |
//! | `koo:v1:{t:Q}:times:{n}` | hash | run and wait times of 5-minute sub-window `n` per task name: `r:{bucket}:{name}` / `w:{bucket}:{name}` counts, `n:{name}` markers of the names kept (20, then `other`), `names` (names offered); written by `times_add.lua` from each koo's in-process tally, about once a second; expires an hour after it closes |
//! | `koo:v1:idem:{key}` | string | an idempotency key's claim: `fingerprint|task id` (with a TTL) |
//! | `koo:v1:workers` | sorted set | worker pools, scored by when each last said it was alive (ms) |
//! | `koo:v1:worker:{id}` | string | one pool's or external worker's record (JSON, with a TTL) |
//! | `koo:v1:lease-key` | string | the key of lease secrets (64 hex digits, no TTL; see `tasks::remote::secret`) |
//! | `koo:v1:{schedules}:defs` / `:runs` / `:version` | hash, hash, string | schedules, their latest runs, a change counter (see `schedule::store`) |
//!
//! The prefix lets several deployments share one Redis; it is escaped in
//! every `SCAN MATCH` pattern so that a prefix with glob characters cannot
//! widen a match beyond koo's own keys.

use crate::domain::Level;
use crate::domain::task::{QueueName, TaskId};
use crate::glob;

/// Key names for one prefix.
#[derive(Debug, Clone)]
pub struct KeySpace {
    prefix: String,
    escaped: String,
    /// `{prefix}:cache:{level}:` per level, built once.
    level_prefixes: [String; 4],
}

impl KeySpace {
    /// Key names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            escaped: glob::escape(prefix),
            level_prefixes: Level::ALL.map(|l| format!("{prefix}:cache:{}:", l.as_str())),
        }
    }

    /// `{prefix}:cache:{level}:` — the start of every key of a level.
    pub fn level_prefix(&self, level: Level) -> &str {
        &self.level_prefixes[level.index()]
    }

    /// The Redis key of a cache entry.
    pub fn cache_key(&self, level: Level, key: &str) -> String {
        let prefix = self.level_prefix(level);
        let mut out = String::with_capacity(prefix.len() + key.len());
        out.push_str(prefix);
        out.push_str(key);
        out
    }

    /// The user's key within a full cache key of `level`.
    pub fn user_key<'a>(&self, level: Level, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.level_prefix(level))
    }

    /// A `SCAN MATCH` pattern for the keys of `level` that match the user's
    /// (validated) `pattern`.
    pub fn level_pattern(&self, level: Level, pattern: &str) -> String {
        format!("{}:cache:{}:{}", self.escaped, level.as_str(), pattern)
    }

    /// A pattern for every cache key of every level.
    pub fn cache_pattern(&self) -> String {
        format!("{}:cache:*", self.escaped)
    }

    /// The compute lock of a cache entry (GetOrLock, GetOrCompute): outside
    /// `:cache:`, so that listing, clearing and counting a level never meet
    /// it.
    pub fn lock_key(&self, level: Level, key: &str) -> String {
        format!("{}:v1:clock:{}:{key}", self.prefix, level.as_str())
    }

    /// The version key of a cache tag: outside `:cache:`, so that listing
    /// and clearing a level never see it.
    pub fn tag_key(&self, level: Level, tag: &str) -> String {
        format!("{}:v1:ctag:{}:{tag}", self.prefix, level.as_str())
    }

    /// `{prefix}:v1:ctag:` — the start of every tag key (the embedded
    /// store's image keeps them with the entries).
    pub fn tag_prefix(&self) -> String {
        format!("{}:v1:ctag:", self.prefix)
    }

    /// The sorted set of instances publishing cache metrics.
    pub fn cache_metrics_index(&self) -> String {
        format!("{}:stats:cache:instances", self.prefix)
    }

    /// One instance's cache metrics record.
    pub fn cache_metrics_record(&self, instance: &str) -> String {
        format!("{}:stats:cache:instance:{instance}", self.prefix)
    }

    /// The Pub/Sub channel of cache changes (see `cache::bus`).
    pub fn changes_channel(&self) -> String {
        format!("{}:v1:cache:changes", self.prefix)
    }

    /// The flag saying that some koo has watchers of cache changes.
    pub fn watched_flag(&self) -> String {
        format!("{}:v1:cache:watched", self.prefix)
    }

    /// The level and user key of a full cache key, if it is one.
    pub fn split_cache_key<'a>(&self, full: &'a str) -> Option<(Level, &'a str)> {
        Level::ALL
            .into_iter()
            .find_map(|l| self.user_key(l, full).map(|k| (l, k)))
    }
}

/// Flow control's keys, shared by every queue (see
/// `docs/design/flow-control.md`): `{prefix}:v1:` then `limits` (a hash,
/// field → limit), `limits:version`, `rl:<scope>` (a rate bucket's TAT),
/// `backoff:<key>` (a key's back-off) and `cc:<key>` (a concurrency key's
/// running tasks). The lease script builds the last three from this base.
pub fn flow_base(prefix: &str) -> String {
    format!("{prefix}:v1:")
}

/// [`flow_base`] on a Redis Cluster, `{prefix}:v1:{fc}:`: every key of flow
/// control in one slot, its own (hash tag `{fc}`, slot 15689), so that the
/// limits and their version change in one transaction and one script
/// checks all of a task's limits at once (`reserve.lua`). With three
/// masters it lands on the third, away from the default queues `research`
/// and `cache` (first) and `ai_service`, `database`, `health_check`
/// (second). Queues stay in their own slots.
pub fn flow_base_cluster(prefix: &str) -> String {
    format!("{prefix}:v1:{{fc}}:")
}

/// Key names of one task queue.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    /// `{prefix}:v1:{t:QUEUE}:`
    base: String,
}

impl QueueKeys {
    /// Keys of `queue` under `prefix`.
    pub fn new(prefix: &str, queue: &QueueName) -> Self {
        Self {
            base: format!("{prefix}:v1:{{t:{queue}}}:"),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    /// Prefix of task hashes; scripts append the id.
    pub fn task_prefix(&self) -> String {
        self.key("task:")
    }

    /// A task's hash.
    pub fn task(&self, id: &TaskId) -> String {
        format!("{}task:{id}", self.base)
    }

    /// A task's attempt log.
    pub fn task_log(&self, id: &TaskId) -> String {
        format!("{}task:{id}:log", self.base)
    }

    /// Queued ids, by priority band then enqueue time.
    pub fn ready(&self) -> String {
        self.key("ready")
    }

    /// Waiting ids, by due time.
    pub fn scheduled(&self) -> String {
        self.key("scheduled")
    }

    /// Running ids, by lease (or hard limit) deadline.
    pub fn leases(&self) -> String {
        self.key("leases")
    }

    /// Ended ids, by end time.
    pub fn history(&self) -> String {
        self.key("history")
    }

    /// Summaries of ended tasks, which outlive their results.
    pub fn history_data(&self) -> String {
        self.key("history:data")
    }

    /// PENDING ids (waiting on dependencies), by submit time.
    pub fn pending(&self) -> String {
        self.key("pending")
    }

    /// Dead-lettered ids, by end time.
    pub fn dead(&self) -> String {
        self.key("dead")
    }

    /// The event stream.
    pub fn events(&self) -> String {
        self.key("events")
    }

    /// Counters per outcome (submitted, succeeded, failed, timed_out,
    /// retried, lost): bounded, one small hash per queue.
    pub fn stats(&self) -> String {
        self.key("stats")
    }

    /// The queue's pause (a hash: `by`, `reason`, `at`), present while it
    /// is paused; in the queue's slot, so that the lease script reads it.
    pub fn paused(&self) -> String {
        self.key("paused")
    }

    /// Waiting ids that expire, by expiry (ms): entries leave when their
    /// task starts or ends, so it holds only tasks that may still expire.
    /// In the queue's slot, so that the recovery sweep ends them.
    pub fn expiring(&self) -> String {
        self.key("expiring")
    }

    /// Prefix of the run and wait times' sub-windows (hashes; scripts
    /// append the sub-window's number: see [`crate::domain::times`]).
    pub fn times(&self) -> String {
        self.key("times:")
    }

    /// The flag an idle koo process sets before it blocks on its wake list
    /// ([`Self::wake_to`]; a string with a TTL of a few seconds holding the
    /// list's id), beside one per task name its idle workers serve
    /// ([`Self::idle_for`]): a script that makes tasks ready without
    /// knowing one name (a sweep) deletes it and pushes one wake (see
    /// `store/redis/tasks/wake.rs`).
    pub fn idle(&self) -> String {
        self.key("idle")
    }

    /// The prefix of the lists idle koo processes block on (`BLPOP`,
    /// [`Self::wake_to`]): at most a wake or two each, expiring within
    /// seconds.
    pub fn wake(&self) -> String {
        self.key("wake")
    }

    /// The flag of idle koo processes whose idle workers serve task `name`
    /// (`*`: any name): a task of that name made ready wakes one of them
    /// before any other (see [`Self::idle`]).
    pub fn idle_for(&self, name: &str) -> String {
        format!("{}:{name}", self.idle())
    }

    /// The wake list of the koo process (its watch) `id`: the flags it
    /// sets hold `id`, and a script that finds one pushes the task's name
    /// here.
    pub fn wake_to(&self, id: &str) -> String {
        format!("{}:{id}", self.wake())
    }

    /// The queue's debounce keys (a hash: key -> the id of the unstarted
    /// task holding it). The scripts that start or end a task find it from
    /// the task's hash by [`DEBOUNCE_FROM_TASK`], so it must stay beside
    /// `task:` under the queue's base (a test pins that).
    pub fn debounce(&self) -> String {
        self.key("debounce")
    }
}

/// How `lib.lua`'s `forget_debounce` derives [`QueueKeys::debounce`] from a
/// task's hash: drop the id and this many bytes (`task:`), append
/// `debounce`.
pub const DEBOUNCE_FROM_TASK: usize = "task:".len();

/// An idempotency key's claim (not tied to a queue's slot: a key spans
/// queues).
pub fn idempotency(prefix: &str, key: &str) -> String {
    format!("{prefix}:v1:idem:{key}")
}

/// The index of live worker pools (not tied to a queue's slot).
pub fn workers_index(prefix: &str) -> String {
    format!("{prefix}:v1:workers")
}

/// The key of lease secrets (32 random bytes as hex, written once with
/// `SET NX` by the first koo process that needs it; no TTL: every lease's
/// secret depends on it).
pub fn lease_key(prefix: &str) -> String {
    format!("{prefix}:v1:lease-key")
}

/// One worker pool's record.
pub fn worker_record(prefix: &str, id: &str) -> String {
    format!("{prefix}:v1:worker:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of a queue carries the queue's hash tag.
    #[test]
    fn queue_keys_share_a_hash_tag() {
        let q = QueueName::parse("ai_service").unwrap();
        let keys = QueueKeys::new("koo", &q);
        let id = TaskId::generate(&q);
        for key in [
            keys.task(&id),
            keys.task_log(&id),
            keys.ready(),
            keys.leases(),
            keys.events(),
        ] {
            assert!(key.starts_with("koo:v1:{t:ai_service}:"), "{key}");
        }
        assert_eq!(keys.task(&id), format!("{}{id}", keys.task_prefix()));
        // lib.lua's forget_debounce derives the debounce hash this way
        let task = keys.task(&id);
        let base = &task[..task.len() - id.as_str().len() - DEBOUNCE_FROM_TASK];
        assert_eq!(format!("{base}debounce"), keys.debounce());
    }

    /// Keys and patterns keep levels apart and escape the prefix.
    #[test]
    fn layout() {
        let ks = KeySpace::new("k*o");
        assert_eq!(ks.cache_key(Level::Api, "a:b"), "k*o:cache:api:a:b");
        assert_eq!(ks.level_pattern(Level::Db, "x*"), "k\\*o:cache:db:x*");
        assert_eq!(ks.user_key(Level::Api, "k*o:cache:api:a:b"), Some("a:b"));
        assert_eq!(ks.user_key(Level::App, "k*o:cache:api:a:b"), None);
        let pattern = ks.level_pattern(Level::App, "*");
        assert!(glob::matches(
            pattern.as_bytes(),
            ks.cache_key(Level::App, "z").as_bytes()
        ));
        assert!(!glob::matches(pattern.as_bytes(), b"kxo:cache:app:z"));
        assert!(!glob::matches(
            pattern.as_bytes(),
            ks.cache_key(Level::Api, "z").as_bytes()
        ));
    }
}
