//! The task scripts' declarations: each script's KEYS and ARGV by name
//! (the Lua bodies in `lua/tasks/` read them as `K_<key>` and `A_<arg>`),
//! and the scripts built from them once per store (see
//! [`crate::store::redis::script`]).

use crate::store::redis::script::{Composed, Key, Spec};

/// The shared Lua library (`ready_score`, `add_event`, `promote_due`,
/// `record_end`, ...).
const LIB: &str = include_str!("../lua/tasks/lib.lua");

use Key::{
    Claim, Dead, Debounce, Events, Expiring, Flow, History, HistoryData, Idle, Leases, Paused,
    Pending, Ready, Scheduled, Stats, Task, Times, Wake,
};

/// Then the ids waited on (`deps` of them) and the task hash's field,
/// value pairs.
pub(super) const SUBMIT: Spec = Spec {
    name: "submit",
    keys: &[
        Task, Ready, Scheduled, Events, Stats, Pending, Expiring, Idle, Wake,
    ],
    args: &[
        "id",
        "band",
        "delay_ms",
        "events_cap",
        "deps",
        "expire_ms",
        "fkey",
        "name",
        "wake",
    ],
    variadic: true,
    body: include_str!("../lua/tasks/submit.lua"),
};

/// `Task`: the new task's hash (used when no unstarted task holds `key`);
/// `prefix`: of task hashes; `name`, `category`: the new task's, which the
/// held task must share. Then the new task hash's field, value pairs.
pub(super) const DEBOUNCE: Spec = Spec {
    name: "debounce",
    keys: &[Task, Ready, Scheduled, Events, Stats, Debounce],
    args: &[
        "id",
        "prefix",
        "key",
        "window_ms",
        "name",
        "category",
        "events_cap",
    ],
    variadic: true,
    body: include_str!("../lua/tasks/debounce.lua"),
};

/// Then the task names served (`*`: all).
pub(super) const LEASE: Spec = Spec {
    name: "lease",
    keys: &[
        Ready,
        Scheduled,
        Leases,
        Events,
        Paused,
        History,
        HistoryData,
        Dead,
        Stats,
        Expiring,
    ],
    args: &[
        "prefix",
        "lease_ms",
        "worker",
        "events_cap",
        "scan",
        "history_cap",
        "flow",
        "flow_base",
        "queue",
        "cluster",
        "grant",
        "denied",
    ],
    variadic: true,
    body: include_str!("../lua/tasks/lease.lua"),
};

pub(super) const HEARTBEAT: Spec = Spec {
    name: "heartbeat",
    keys: &[Task, Leases],
    args: &["id", "token", "lease_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/heartbeat.lua"),
};

pub(super) const TAKE_OVER: Spec = Spec {
    name: "take_over",
    keys: &[Task, Leases],
    args: &["id", "token", "worker", "lease_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/take_over.lua"),
};

pub(super) const PROGRESS: Spec = Spec {
    name: "progress",
    keys: &[Task, Events],
    args: &["id", "token", "events_cap", "progress"],
    variadic: false,
    body: include_str!("../lua/tasks/progress.lua"),
};

/// finish.lua's arguments, then `$more`.
macro_rules! finish_args {
    ($($more:literal),*) => {
        &[
            "id",
            "token",
            "events_cap",
            "outcome",
            "payload",
            "delay_ms",
            "history_cap",
            "log",
            "dead_ttl_ms",
            $($more),*
        ]
    };
}

/// `outcome`: `succeeded`, `retry`, `failed`, `timed_out` or `cancelled`;
/// `payload`: the result or error JSON; `log`: the attempt's log entry.
pub(super) const FINISH: Spec = Spec {
    name: "finish",
    keys: &[
        Task,
        Leases,
        Scheduled,
        History,
        HistoryData,
        Dead,
        Events,
        Stats,
        Expiring,
    ],
    args: finish_args!(),
    variadic: false,
    body: include_str!("../lua/tasks/finish.lua"),
};

/// One item of a batch (finish_batch.lua): [`FINISH`]'s keys and
/// arguments, then `next`: the worker that the task leased after this
/// finish goes to (empty: none).
pub(super) const FINISH_ITEM: Spec = Spec {
    name: "finish",
    keys: FINISH.keys,
    args: finish_args!("next"),
    variadic: false,
    body: FINISH.body,
};

/// `acks_late`: `1` or `0`.
pub(super) const RECOVER: Spec = Spec {
    name: "recover",
    keys: &[
        Leases,
        Ready,
        History,
        HistoryData,
        Dead,
        Events,
        Stats,
        Scheduled,
        Expiring,
        Pending,
        Idle,
        Wake,
    ],
    args: &[
        "prefix",
        "events_cap",
        "acks_late",
        "history_cap",
        "dead_ttl_ms",
    ],
    variadic: false,
    body: include_str!("../lua/tasks/recover.lua"),
};

pub(super) const TRIM: Spec = Spec {
    name: "trim",
    keys: &[History, HistoryData, Dead, Events],
    args: &["before_ms", "events_cap", "prefix", "dead_before_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/trim.lua"),
};

pub(super) const RELEASE: Spec = Spec {
    name: "release",
    keys: &[Task, Leases, Ready, Events, Expiring, Idle, Wake],
    args: &["id", "token", "events_cap", "log"],
    variadic: false,
    body: include_str!("../lua/tasks/release.lua"),
};

pub(super) const CANCEL: Spec = Spec {
    name: "cancel",
    keys: &[
        Task,
        Ready,
        Scheduled,
        History,
        HistoryData,
        Dead,
        Events,
        Stats,
        Pending,
        Expiring,
    ],
    args: &["id", "events_cap", "history_cap", "reason", "only_running"],
    variadic: false,
    body: include_str!("../lua/tasks/cancel.lua"),
};

pub(super) const RETRY: Spec = Spec {
    name: "retry",
    keys: &[
        Task,
        Ready,
        History,
        HistoryData,
        Dead,
        Events,
        Stats,
        Idle,
        Wake,
    ],
    args: &["id", "events_cap"],
    variadic: false,
    body: include_str!("../lua/tasks/retry.lua"),
};

pub(super) const IDEM_CLAIM: Spec = Spec {
    name: "idem_claim",
    keys: &[Claim],
    args: &["value", "ttl_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/idem_claim.lua"),
};

/// `Flow`: the key's back-off (`{prefix}:v1:backoff:<key>`).
pub(super) const BACKOFF: Spec = Spec {
    name: "backoff",
    keys: &[Flow],
    args: &["wait_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/backoff.lua"),
};

/// A Cluster's flow control: a lease's candidate's tokens and running-set
/// entry taken in flow control's own slot (see `flow_cluster.rs`).
pub(super) const RESERVE: Spec = Spec {
    name: "reserve",
    keys: &[Flow],
    args: &[
        "flow_base",
        "flow",
        "queue",
        "repaired",
        "stale_ms",
        "drop_set",
        "drop_entry",
    ],
    variadic: true,
    body: include_str!("../lua/tasks/reserve.lua"),
};

/// What [`RESERVE`] took, given back (bucket, interval pairs follow).
pub(super) const GIVE_BACK: Spec = Spec {
    name: "give_back",
    keys: &[Flow],
    args: &["cc", "entry"],
    variadic: true,
    body: include_str!("../lua/tasks/give_back.lua"),
};

pub(super) const IDEM_SWAP: Spec = Spec {
    name: "idem_swap",
    keys: &[Claim],
    args: &["old", "new", "ttl_ms"],
    variadic: false,
    body: include_str!("../lua/tasks/idem_swap.lua"),
};

/// `Task`: the dependency's hash.
pub(super) const DEPEND: Spec = Spec {
    name: "depend",
    keys: &[Task],
    args: &["dependent"],
    variadic: false,
    body: include_str!("../lua/tasks/depend.lua"),
};

/// `dependency_state`: the state the dependency ended in.
pub(super) const RESOLVE: Spec = Spec {
    name: "resolve",
    keys: &[
        Task,
        Pending,
        Ready,
        History,
        HistoryData,
        Dead,
        Events,
        Stats,
        Expiring,
        Idle,
        Wake,
    ],
    args: &[
        "id",
        "dependency",
        "dependency_state",
        "events_cap",
        "history_cap",
    ],
    variadic: false,
    body: include_str!("../lua/tasks/resolve.lua"),
};

/// A read: the window's sub-windows of run and wait times.
pub(super) const TIMES: Spec = Spec {
    name: "times",
    keys: &[Times],
    args: &[],
    variadic: false,
    body: include_str!("../lua/tasks/times.lua"),
};

/// One koo process's run and wait times of a queue since its last flush
/// (the tail: see `times_add.lua`).
pub(super) const TIMES_ADD: Spec = Spec {
    name: "times_add",
    keys: &[Times],
    args: &[],
    variadic: true,
    body: include_str!("../lua/tasks/times_add.lua"),
};

/// The compiled task scripts (loaded by SHA, sent in full on a cache miss).
pub(crate) struct TaskScripts {
    pub(super) submit: Composed,
    pub(super) lease: Composed,
    pub(super) heartbeat: Composed,
    /// The same, unflagged, for a Redis before 7.0 (no script flags).
    pub(super) heartbeat_plain: Composed,
    /// Flagged to run while Redis is full, as the heartbeat (it overwrites
    /// fields it finds); `take_over_plain` unflagged, for a Redis before 7.0.
    pub(super) take_over: Composed,
    pub(super) take_over_plain: Composed,
    pub(super) progress: Composed,
    pub(super) finish: Composed,
    pub(super) recover: Composed,
    pub(super) trim: Composed,
    pub(super) finish_lease: Composed,
    pub(super) finish_batch: Composed,
    pub(super) release: Composed,
    pub(super) cancel: Composed,
    pub(super) retry: Composed,
    pub(super) idem_claim: Composed,
    pub(super) idem_swap: Composed,
    pub(super) depend: Composed,
    pub(super) resolve: Composed,
    pub(super) times: Composed,
    pub(super) times_add: Composed,
    pub(super) debounce: Composed,
    pub(super) backoff: Composed,
    pub(super) reserve: Composed,
    pub(super) give_back: Composed,
}

impl TaskScripts {
    pub(crate) fn new() -> Self {
        let with_lib = |spec| Composed::single(spec, Some(LIB));
        let alone = |spec| Composed::single(spec, None);
        Self {
            submit: with_lib(SUBMIT),
            lease: with_lib(LEASE),
            heartbeat: alone(HEARTBEAT).allowed_when_full(),
            heartbeat_plain: alone(HEARTBEAT),
            take_over: alone(TAKE_OVER).allowed_when_full(),
            take_over_plain: alone(TAKE_OVER),
            progress: with_lib(PROGRESS),
            finish: with_lib(FINISH),
            recover: with_lib(RECOVER),
            trim: alone(TRIM),
            release: with_lib(RELEASE),
            cancel: with_lib(CANCEL),
            retry: with_lib(RETRY),
            idem_claim: alone(IDEM_CLAIM),
            idem_swap: alone(IDEM_SWAP),
            depend: alone(DEPEND),
            resolve: with_lib(RESOLVE),
            times: alone(TIMES),
            times_add: alone(TIMES_ADD),
            debounce: with_lib(DEBOUNCE),
            backoff: alone(BACKOFF),
            reserve: with_lib(RESERVE),
            give_back: alone(GIVE_BACK),
            finish_lease: Composed::compose(
                &[FINISH, LEASE],
                Some(LIB),
                include_str!("../lua/tasks/finish_lease.lua"),
            ),
            finish_batch: Composed::batch(
                FINISH_ITEM,
                LEASE,
                Some(LIB),
                include_str!("../lua/tasks/finish_batch.lua"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The band width and the promote-due loop each have one source: no
    /// script body spells the band's value or moves due tasks itself.
    #[test]
    fn scripts_share_the_band_and_promote_due() {
        let band = crate::store::tasks::BAND_WIDTH.to_string();
        for spec in [
            SUBMIT, LEASE, HEARTBEAT, PROGRESS, FINISH, RECOVER, TRIM, RELEASE, CANCEL, RETRY,
            IDEM_CLAIM, IDEM_SWAP, DEPEND, RESOLVE, TIMES, TIMES_ADD, DEBOUNCE, BACKOFF, RESERVE,
            GIVE_BACK,
        ] {
            assert!(!spec.body.contains(&band), "{} spells the band", spec.name);
            assert!(
                !spec.body.contains("ZRANGEBYSCORE', K_scheduled"),
                "{} copies promote_due",
                spec.name
            );
            assert!(!spec.body.contains("KEYS["), "{} counts keys", spec.name);
        }
        assert!(!LIB.contains(&band));
        for spec in [LEASE, RECOVER] {
            assert!(spec.body.contains("promote_due("), "{}", spec.name);
        }
        // each script carries what it calls of the library, and only that
        let scripts_ = TaskScripts::new();
        let lease = scripts_.lease.text();
        assert!(
            lease.contains("local function promote_due(")
                && lease.contains("local function add_event(")
        );
        assert!(!lease.contains("local function budget_spent("));
        let finish = scripts_.finish.text();
        for f in [
            "budget_spent",
            "record_end",
            "trim_to_cap",
            "forget_debounce",
            "times_of",
        ] {
            assert!(
                finish.contains(&format!("local function {f}(")),
                "finish lacks {f}"
            );
        }
        let scripts = TaskScripts::new();
        assert!(
            scripts
                .lease
                .text()
                .contains(&format!("local BAND = {band}"))
        );
    }

    /// Finish-then-lease reads lease's keys after finish's nine and its
    /// arguments after finish's nine (and the clock offset).
    #[test]
    fn finish_and_lease_offsets() {
        let text = TaskScripts::new().finish_lease.text().to_owned();
        assert!(text.contains("local K_ready = KEYS[10]"), "{text}");
        assert!(text.contains("local A_prefix = ARGV[11]"), "{text}");
        assert!(text.contains("local ARGN = 23"), "{text}");
        assert!(text.contains("local function finish()"));
        assert!(text.contains("local function lease()"));
    }
}
