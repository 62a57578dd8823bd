//! Task scripts composed from declared pieces, so that no script counts
//! positions by hand.
//!
//! A [`Spec`] names a script's KEYS and ARGV once, in Rust. From it,
//! [`Composed`] generates the Lua prelude (`local K_ready = KEYS[2]`,
//! `local A_worker = ARGV[4]`, ...) and an [`Invocation`] pushes the keys in
//! the declared order from [`QueueKeys`]: the Lua body and the Rust caller
//! both go by name, and a script built from two transitions
//! (finish-then-lease) gets each part's offsets from the declarations rather
//! than from a hard-coded split.
//!
//! Every script starts with the same generated prelude:
//! - `BAND`, the width of one priority band of a ready score, from
//!   [`BAND_WIDTH`] (never a literal in Lua);
//! - `now`: Redis's `TIME` plus the store clock's offset, which the
//!   invocation passes as `ARGV[1]` (0 in production; tests move it with
//!   [`crate::store::clock::Clock::advance`]), so that every script of a
//!   store agrees with the embedded store's notion of now under test;
//! - then, when asked for, the shared library `lua/tasks/lib.lua`.
//!
//! Scripts stay loaded by SHA (`EVALSHA`, the full text on `NOSCRIPT`):
//! the text is generated once, when the store is built.

use std::borrow::Cow;
use std::fmt::Write as _;

use redis::{Script, ScriptInvocation, ToRedisArgs};

use crate::domain::task::TaskId;
use crate::domain::times;
use crate::keys::QueueKeys;
use crate::store::clock::Clock;
use crate::store::tasks::BAND_WIDTH;

mod library;
use library::used_lib;

/// A key a script works on: one of a queue's keys (see [`QueueKeys`]), or
/// one the caller names ([`Key::Claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
    /// The task's hash (`:log`, `:deps` and `:dependents` hang off it).
    Task,
    /// Ready ids, by band and enqueue time.
    Ready,
    /// Scheduled ids, by due time.
    Scheduled,
    /// Running ids, by lease deadline.
    Leases,
    /// PENDING ids, by submit time.
    Pending,
    /// Ended ids, by end time.
    History,
    /// Summaries of ended tasks.
    HistoryData,
    /// Dead letters, by end time.
    Dead,
    /// The event stream.
    Events,
    /// Counters per outcome.
    Stats,
    /// An idempotency claim (given by the caller).
    Claim,
    /// The prefix of the run and wait times' sub-windows (scripts append
    /// the sub-window's number).
    Times,
    /// The queue's pause (present while paused).
    Paused,
    /// The queue's debounce keys (key -> unstarted task id).
    Debounce,
    /// Waiting ids that expire, by expiry.
    Expiring,
    /// A flow-control key outside any queue (given by the caller: a key's
    /// back-off).
    Flow,
    /// The flag of a process whose workers wait idle on the queue.
    Idle,
    /// The list that process blocks on.
    Wake,
}

impl Key {
    /// The Lua local the prelude binds it to (`K_` and this).
    fn name(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Ready => "ready",
            Self::Scheduled => "scheduled",
            Self::Leases => "leases",
            Self::Pending => "pending",
            Self::History => "history",
            Self::HistoryData => "history_data",
            Self::Dead => "dead",
            Self::Events => "events",
            Self::Stats => "stats",
            Self::Claim => "claim",
            Self::Flow => "flow",
            Self::Times => "times",
            Self::Paused => "paused",
            Self::Debounce => "debounce",
            Self::Expiring => "expiring",
            Self::Idle => "idle",
            Self::Wake => "wake",
        }
    }

    /// The key's name for `keys` (and task `id`, for [`Key::Task`]);
    /// `None` for a key the caller names.
    fn resolve(self, keys: &QueueKeys, id: Option<&TaskId>) -> Option<String> {
        Some(match self {
            Self::Task => keys.task(id?),
            Self::Ready => keys.ready(),
            Self::Scheduled => keys.scheduled(),
            Self::Leases => keys.leases(),
            Self::Pending => keys.pending(),
            Self::History => keys.history(),
            Self::HistoryData => keys.history_data(),
            Self::Dead => keys.dead(),
            Self::Events => keys.events(),
            Self::Stats => keys.stats(),
            Self::Times => keys.times(),
            Self::Paused => keys.paused(),
            Self::Debounce => keys.debounce(),
            Self::Expiring => keys.expiring(),
            Self::Idle => keys.idle(),
            Self::Wake => keys.wake(),
            Self::Claim | Self::Flow => return None,
        })
    }
}

/// One script's declaration: its KEYS and ARGV by name, and its body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spec {
    /// Its name (the Lua function it becomes when composed).
    pub name: &'static str,
    /// KEYS, in order; the body reads `K_<name>`.
    pub keys: &'static [Key],
    /// ARGV after the clock offset, in order; the body reads `A_<name>`.
    pub args: &'static [&'static str],
    /// Whether more ARGV follow the declared ones (the body reads them from
    /// `ARGV[ARGN]` on). Only the last part of a composition may have them.
    pub variadic: bool,
    /// The Lua body.
    pub body: &'static str,
}

/// Where one part's KEYS and ARGV start in the composed script (1-based,
/// as Lua counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Offsets {
    /// Its first key.
    pub key: usize,
    /// Its first declared argument.
    pub arg: usize,
}

/// A loaded script made of one or more declared parts.
pub(crate) struct Composed {
    script: Script,
    parts: Vec<Spec>,
    /// The generated text (for tests and debugging).
    #[cfg_attr(not(test), allow(dead_code))]
    text: String,
}

/// How a script learns now (`ARGV[1]`): Redis's `TIME` plus an offset
/// (`0` in production), or a manual clock's pinned now, sent as `@` and the
/// ms (see [`Clock`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockArg {
    /// `TIME` plus this many ms.
    Offset(i64),
    /// This now, ms since the epoch.
    Pinned(i64),
}

impl ClockArg {
    /// The argument for `clock`.
    pub(crate) fn of(clock: &Clock) -> Self {
        match clock.pinned_ms() {
            Some(now) => ClockArg::Pinned(now),
            None => ClockArg::Offset(clock.offset_ms()),
        }
    }

    /// Now on Redis, given Redis's `TIME` in ms.
    pub(crate) fn now_ms(self, redis_time_ms: i64) -> i64 {
        match self {
            ClockArg::Offset(ms) => redis_time_ms + ms,
            ClockArg::Pinned(now) => now,
        }
    }
}

impl ToRedisArgs for ClockArg {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            ClockArg::Offset(ms) => ms.write_redis_args(out),
            // tests only: the allocation is not on a production path
            ClockArg::Pinned(now) => out.write_arg(format!("@{now}").as_bytes()),
        }
    }
}

/// The first ARGV index after the clock offset.
const FIRST_ARG: usize = 2;

/// The generated prelude every script starts with: the band width, the
/// run and wait times' layout (see [`crate::domain::times`]) and now.
pub(crate) fn prelude() -> String {
    format!(
        "-- generated by src/store/redis/script.rs\n\
         local BAND = {BAND_WIDTH}\n\
         local TIMES_SLOT_MS, TIMES_SLOTS, TIMES_NAMES = {slot_ms}, {slots}, {names}\n\
         local now, CLOCK_OFFSET\n\
         local LEASE_AGAIN, LEASE_WORKER = false, false\n\
         do\n  local t = redis.call('TIME')\n  \
         local real = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n  \
         if string.byte(ARGV[1], 1) == 64 then now = tonumber(string.sub(ARGV[1], 2))\n  \
         else now = real + tonumber(ARGV[1]) end\n  \
         CLOCK_OFFSET = now - real\n\
         end\n\
         local NOW = string.format('%d', now)\n",
        slot_ms = times::SLOT_MS,
        slots = times::SLOTS,
        names = times::NAME_CAP,
    )
}

/// Where each of `parts` starts.
pub(crate) fn offsets(parts: &[Spec]) -> Vec<Offsets> {
    let (mut key, mut arg) = (1, FIRST_ARG);
    parts
        .iter()
        .map(|p| {
            let at = Offsets { key, arg };
            key += p.keys.len();
            arg += p.args.len();
            at
        })
        .collect()
}

/// The `local K_x = KEYS[i]` and `local A_y = ARGV[j]` lines of a part
/// whose first key and argument are Lua expressions (a batch's parts:
/// their place depends on the number of items).
fn bindings_at(spec: &Spec, key: &str, arg: &str) -> String {
    let mut out = String::new();
    for (i, k) in spec.keys.iter().enumerate() {
        let _ = writeln!(out, "local K_{} = KEYS[{key} + {i}]", k.name());
    }
    for (i, a) in spec.args.iter().enumerate() {
        let _ = writeln!(out, "local A_{a} = ARGV[{arg} + {i}]");
    }
    if spec.variadic {
        let _ = writeln!(out, "local ARGN = {arg} + {}", spec.args.len());
    }
    out
}

/// The `local K_x = KEYS[i]` and `local A_y = ARGV[j]` lines of a part.
fn bindings(spec: &Spec, at: Offsets) -> String {
    let mut out = String::new();
    for (i, key) in spec.keys.iter().enumerate() {
        let _ = writeln!(out, "local K_{} = KEYS[{}]", key.name(), at.key + i);
    }
    for (i, arg) in spec.args.iter().enumerate() {
        let _ = writeln!(out, "local A_{arg} = ARGV[{}]", at.arg + i);
    }
    if spec.variadic {
        let _ = writeln!(out, "local ARGN = {}", at.arg + spec.args.len());
    }
    out
}

impl Composed {
    /// One declared script, after the prelude (and the functions of `lib`
    /// it uses, when given).
    pub(crate) fn single(spec: Spec, lib: Option<&str>) -> Self {
        let at = offsets(&[spec])[0];
        let text = format!(
            "{}{}\n{}{}",
            prelude(),
            lib.map(|l| used_lib(l, spec.body)).unwrap_or_default(),
            bindings(&spec, at),
            spec.body
        );
        Self {
            script: Script::new(&text),
            parts: vec![spec],
            text,
        }
    }

    /// `self` run even while Redis is out of memory (`maxmemory` reached
    /// under `noeviction`), for a script that grows nothing: a heartbeat
    /// rewrites one field and one score that exist. Without it Redis
    /// refuses its writes then, and a task whose worker is healthy loses its
    /// lease and burns its retries while Redis is full. (Redis 7's script
    /// flags, which koo's tags already need.)
    pub(crate) fn allowed_when_full(self) -> Self {
        let text = format!("#!lua flags=allow-oom\n{}", self.text);
        Self {
            script: Script::new(&text),
            parts: self.parts,
            text,
        }
    }

    /// Several declared scripts, each a Lua function named after it that
    /// sees its own KEYS and ARGV by name, then `body`, which calls them.
    /// The invocation pushes the parts' keys and arguments in order.
    pub(crate) fn compose(parts: &[Spec], lib: Option<&str>, body: &str) -> Self {
        debug_assert!(
            parts.iter().rev().skip(1).all(|p| !p.variadic),
            "only the last part may take more arguments"
        );
        let mut text = prelude();
        let all: String = parts.iter().map(|p| p.body).chain([body]).collect();
        text.push_str(&lib.map(|l| used_lib(l, &all)).unwrap_or_default());
        text.push('\n');
        for (spec, at) in parts.iter().zip(offsets(parts)) {
            let _ = write!(
                text,
                "local function {}()\n{}{}\nend\n",
                spec.name,
                bindings(spec, at),
                spec.body
            );
        }
        text.push_str(body);
        Self {
            script: Script::new(&text),
            parts: parts.to_vec(),
            text,
        }
    }

    /// A batch: `each` as a Lua function of a 0-based item `i`, whose keys
    /// and arguments come first and repeat for every item (`N` items,
    /// counted from the number of keys), then `then` as a function of none,
    /// its keys and arguments after the items' (it may take more
    /// arguments), then `body`, which calls them. Invoke with
    /// [`Self::call_batch`].
    pub(crate) fn batch(each: Spec, then: Spec, lib: Option<&str>, body: &str) -> Self {
        debug_assert!(!each.variadic, "a batch's items take no more arguments");
        let mut text = prelude();
        let all: String = [each.body, then.body, body].concat();
        text.push_str(&lib.map(|l| used_lib(l, &all)).unwrap_or_default());
        let (ek, ea) = (each.keys.len(), each.args.len());
        let _ = write!(
            text,
            "\nlocal ITEM_KEYS, ITEM_ARGS, ITEM_ARG0 = {ek}, {ea}, {FIRST_ARG}\n\
             local N = (#KEYS - {}) / ITEM_KEYS\n\
             local function {}(i)\n{}{}\nend\n\
             local function {}()\n{}{}\nend\n{body}",
            then.keys.len(),
            each.name,
            bindings_at(
                &each,
                &format!("i * {ek} + 1"),
                &format!("i * {ea} + {FIRST_ARG}")
            ),
            each.body,
            then.name,
            bindings_at(
                &then,
                &format!("N * {ek} + 1"),
                &format!("N * {ea} + {FIRST_ARG}")
            ),
            then.body,
        );
        Self {
            script: Script::new(&text),
            parts: vec![each, then],
            text,
        }
    }

    /// Starts a call of a [`Self::batch`] script of `items` items: push
    /// each item's keys and arguments, then the last part's.
    pub(crate) fn call_batch(&self, clock: ClockArg, items: usize) -> Invocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(clock);
        let (each, then) = (self.parts[0], self.parts[1]);
        let parts = std::iter::repeat_n(each, items).chain([then]).collect();
        Invocation {
            inv,
            parts: Cow::Owned(parts),
            part: 0,
            key: 0,
            arg: 0,
            #[cfg(test)]
            pushed: Vec::new(),
        }
    }

    /// The script (for pipelines that load it first).
    pub(crate) fn script(&self) -> &Script {
        &self.script
    }

    /// The generated text.
    #[cfg(test)]
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Starts a call: the clock is its first argument.
    pub(crate) fn call(&self, clock: ClockArg) -> Invocation<'_> {
        let mut inv = self.script.prepare_invoke();
        inv.arg(clock);
        Invocation {
            inv,
            parts: Cow::Borrowed(&self.parts),
            part: 0,
            key: 0,
            arg: 0,
            #[cfg(test)]
            pushed: Vec::new(),
        }
    }
}

/// A call being built: keys and arguments are pushed in the declared
/// order, and (in debug builds) checked against the declaration by name.
pub(crate) struct Invocation<'a> {
    inv: ScriptInvocation<'a>,
    parts: Cow<'a, [Spec]>,
    /// The part whose arguments are being pushed.
    part: usize,
    /// Keys pushed so far (of all parts).
    key: usize,
    /// Declared arguments of `part` pushed so far.
    arg: usize,
    /// The queue keys pushed, for tests.
    #[cfg(test)]
    pushed: Vec<String>,
}

impl<'a> Invocation<'a> {
    /// Pushes the declared keys of the next part whose keys are not pushed
    /// yet, from `keys` (the task hash of `id`): a batch's item by item.
    pub(crate) fn part_keys(&mut self, keys: &QueueKeys, id: Option<&TaskId>) -> &mut Self {
        let mut first = 0;
        let part = self.parts.iter().find(|p| {
            let here = first == self.key;
            first += p.keys.len();
            here
        });
        let part = *part.expect("a part whose keys are not pushed yet");
        self.push_keys(part, keys, id)
    }

    /// Pushes `part`'s declared keys from `keys` (the task hash of `id`).
    fn push_keys(&mut self, part: Spec, keys: &QueueKeys, id: Option<&TaskId>) -> &mut Self {
        for key in part.keys {
            let name = key
                .resolve(keys, id)
                .expect("a queue key (and the task id when the task is a key)");
            #[cfg(test)]
            self.pushed.push(name.clone());
            self.inv.key(name);
            self.key += 1;
        }
        self
    }

    /// Pushes every declared key of every part from `keys` (the task hash
    /// of `id`); a [`Key::Claim`] must be given with [`Self::key`] instead.
    pub(crate) fn queue_keys(&mut self, keys: &QueueKeys, id: Option<&TaskId>) -> &mut Self {
        for i in 0..self.parts.len() {
            let part = self.parts[i];
            self.push_keys(part, keys, id);
        }
        self
    }

    /// Pushes the next key, which must be declared as `key`.
    pub(crate) fn key(&mut self, key: Key, name: impl ToRedisArgs) -> &mut Self {
        debug_assert_eq!(
            self.parts.iter().flat_map(|p| p.keys).nth(self.key),
            Some(&key),
            "keys pushed out of their declared order"
        );
        self.inv.key(name);
        self.key += 1;
        self
    }

    /// Pushes the next declared argument, which must be named `name`.
    pub(crate) fn arg(&mut self, name: &'static str, value: impl ToRedisArgs) -> &mut Self {
        while self.part < self.parts.len() && self.arg == self.parts[self.part].args.len() {
            self.part += 1;
            self.arg = 0;
        }
        debug_assert_eq!(
            self.parts.get(self.part).and_then(|p| p.args.get(self.arg)),
            Some(&name),
            "arguments pushed out of their declared order"
        );
        self.inv.arg(value);
        self.arg += 1;
        self
    }

    /// Pushes an argument past the declared ones (a variadic tail).
    pub(crate) fn extra(&mut self, value: impl ToRedisArgs) -> &mut Self {
        debug_assert!(
            self.parts.last().is_some_and(|p| p.variadic),
            "the script takes no more arguments"
        );
        self.inv.arg(value);
        self
    }

    /// The invocation, to run.
    pub(crate) fn done(&self) -> &ScriptInvocation<'a> {
        debug_assert_eq!(
            self.key,
            self.parts.iter().map(|p| p.keys.len()).sum::<usize>(),
            "not every declared key was pushed"
        );
        &self.inv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::task::QueueName;

    const A: Spec = Spec {
        name: "first",
        keys: &[Key::Task, Key::Leases, Key::Events],
        args: &["id", "token"],
        variadic: false,
        body: "return 1",
    };
    const B: Spec = Spec {
        name: "second",
        keys: &[Key::Ready, Key::Events],
        args: &["worker"],
        variadic: true,
        body: "return 2",
    };

    /// Keys and arguments bind in the declared order, after the clock
    /// offset (ARGV[1]); a variadic tail starts after the declared ones.
    #[test]
    fn bindings_follow_the_declaration() {
        let text = bindings(&B, offsets(&[B])[0]);
        assert_eq!(
            text,
            "local K_ready = KEYS[1]\nlocal K_events = KEYS[2]\nlocal A_worker = ARGV[2]\nlocal ARGN = 3\n"
        );
    }

    /// A composition's second part starts after the first part's keys and
    /// arguments.
    #[test]
    fn composition_offsets_come_from_the_declarations() {
        assert_eq!(
            offsets(&[A, B]),
            [Offsets { key: 1, arg: 2 }, Offsets { key: 4, arg: 4 }]
        );
        let text = bindings(&B, offsets(&[A, B])[1]);
        assert!(text.contains("local K_ready = KEYS[4]"), "{text}");
        assert!(text.contains("local A_worker = ARGV[4]"), "{text}");
        assert!(text.contains("local ARGN = 5"), "{text}");
    }

    /// The prelude's band is the Rust constant.
    #[test]
    fn the_band_is_generated_from_rust() {
        assert_eq!(BAND_WIDTH, 4_398_046_511_104);
        assert!(prelude().contains(&format!("local BAND = {BAND_WIDTH}\n")));
        assert!(
            prelude().contains("tonumber(ARGV[1])"),
            "now adds the offset"
        );
        assert!(
            prelude().contains("string.sub(ARGV[1], 2)"),
            "or takes a pinned now"
        );
    }

    /// The invocation pushes every part's keys from the queue's keys, in
    /// the declared order.
    #[test]
    fn keys_are_pushed_in_the_declared_order() {
        let queue = QueueName::parse("q").unwrap();
        let keys = QueueKeys::new("koo", &queue);
        let id = TaskId::generate(&queue);
        let composed = Composed::compose(&[A, B], None, "return first()");
        let mut call = composed.call(ClockArg::Offset(0));
        call.queue_keys(&keys, Some(&id))
            .arg("id", id.as_str())
            .arg("token", 1)
            .arg("worker", "w")
            .extra("*");
        call.done();
        assert_eq!(
            call.pushed,
            [
                keys.task(&id),
                keys.leases(),
                keys.events(),
                keys.ready(),
                keys.events()
            ]
        );
    }

    /// A batch's items bind from their index, each item's keys and
    /// arguments after the one before; the last part binds after all of
    /// them (their number counted from KEYS), and its call pushes each
    /// item's keys, then the last part's.
    #[test]
    fn a_batch_binds_items_by_index_and_the_last_part_after_them() {
        let text = Composed::batch(A, B, None, "return 0").text().to_owned();
        assert!(text.contains("local N = (#KEYS - 2) / ITEM_KEYS"), "{text}");
        assert!(
            text.contains("local ITEM_KEYS, ITEM_ARGS, ITEM_ARG0 = 3, 2, 2"),
            "{text}"
        );
        assert!(text.contains("local function first(i)"), "{text}");
        assert!(
            text.contains("local K_task = KEYS[i * 3 + 1 + 0]"),
            "{text}"
        );
        assert!(
            text.contains("local A_token = ARGV[i * 2 + 2 + 1]"),
            "{text}"
        );
        assert!(
            text.contains("local K_ready = KEYS[N * 3 + 1 + 0]"),
            "{text}"
        );
        assert!(
            text.contains("local A_worker = ARGV[N * 2 + 2 + 0]"),
            "{text}"
        );
        assert!(text.contains("local ARGN = N * 2 + 2 + 1"), "{text}");
        let queue = QueueName::parse("q").unwrap();
        let keys = QueueKeys::new("koo", &queue);
        let (x, y) = (TaskId::generate(&queue), TaskId::generate(&queue));
        let composed = Composed::batch(A, B, None, "return 0");
        let mut call = composed.call_batch(ClockArg::Offset(0), 2);
        for id in [&x, &y] {
            call.part_keys(&keys, Some(id))
                .arg("id", id.as_str())
                .arg("token", 1);
        }
        call.part_keys(&keys, None).arg("worker", "w").extra("*");
        call.done();
        assert_eq!(
            call.pushed,
            [
                keys.task(&x),
                keys.leases(),
                keys.events(),
                keys.task(&y),
                keys.leases(),
                keys.events(),
                keys.ready(),
                keys.events()
            ]
        );
    }

    /// Arguments pushed out of order are caught (in debug builds).
    #[test]
    #[should_panic(expected = "declared order")]
    #[cfg(debug_assertions)]
    fn arguments_out_of_order_are_caught() {
        let composed = Composed::single(A, None);
        composed.call(ClockArg::Offset(0)).arg("token", 1);
    }
}
