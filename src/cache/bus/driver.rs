//! The bus on Redis, one loop per process: reads the "someone watches" flag
//! once a second (so that writes are published while it is set), and while
//! this process has subscribers, keeps the flag alive and holds the Pub/Sub
//! connection whose messages it hands to the subscribers.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Change, ChangeKind, Event, Shared, wire};
use crate::store::Deadline;
use crate::store::redis::{Messages, keyevent_channels};

/// How often every koo reads the flag, and a koo with subscribers renews it.
pub(super) const READ_EVERY: Duration = Duration::from_secs(1);
/// The flag's TTL: it outlives two missed renewals.
const FLAG_TTL: Duration = Duration::from_secs(3);
/// What a renewal's measure of the flag's age may fall short of the time
/// since this process's last renewal without meaning that the flag lapsed:
/// the age is Redis's (whole milliseconds) and the interval this
/// process's, which also holds the two replies' different latencies. At
/// the renewal after the one that created the flag the two are the same
/// span, and without it a fresh flag often looked lapsed (a spurious
/// warning and a reset of every watcher a second after the first one).
const LAPSE_SLACK: Duration = Duration::from_millis(100);

/// Whether a flag of `age` at this renewal lapsed since the last renewal,
/// `since` ago (see [`LAPSE_SLACK`]).
fn flag_lapsed(age: Duration, since: Duration) -> bool {
    age + LAPSE_SLACK < since
}

/// How old the flag must be before every koo has surely read it: one read
/// interval, plus a margin for a read that was late or slow.
pub(super) const READY_AFTER: Duration = Duration::from_millis(1500);

/// What the loop keeps between steps.
#[derive(Default)]
struct Driver {
    sub: Option<Messages>,
    /// The subscription's other half, to ping it: a connection that died
    /// without a word (a host gone) would otherwise go unnoticed.
    sink: Option<PubSubSink>,
    /// When this process last renewed the flag.
    renewed: Option<Instant>,
    /// When this process last read the flag (without subscribers).
    read: Option<Instant>,
    /// Whether the last failure was logged (log transitions, not every second).
    failing: bool,
}

enum Wake {
    Tick,
    Watchers,
    Message(Option<redis::Msg>),
    Stop,
}

/// Runs until the cache is dropped.
pub(super) async fn run(bus: Weak<Shared>, mut watchers: watch::Receiver<usize>) {
    let mut d = Driver::default();
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = tokio::select! {
            _ = tick.tick() => Wake::Tick,
            r = watchers.changed() => if r.is_ok() { Wake::Watchers } else { Wake::Stop },
            m = next_message(&mut d.sub) => Wake::Message(m),
        };
        let Some(shared) = bus.upgrade() else { return };
        match wake {
            Wake::Stop => return,
            Wake::Message(Some(msg)) => shared.receive(&msg),
            Wake::Message(None) => {
                d.lost(&shared);
                d.step(&shared).await;
            }
            Wake::Tick | Wake::Watchers => d.step(&shared).await,
        }
    }
}

async fn next_message(sub: &mut Option<Messages>) -> Option<redis::Msg> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Driver {
    /// The subscription is gone: changes may have been missed.
    fn lost(&mut self, shared: &Shared) {
        tracing::warn!("lost the cache change subscription; resetting watchers");
        self.sub = None;
        self.sink = None;
        shared.live.send_replace(None);
        shared.deliver(Event::Lost);
    }

    async fn step(&mut self, shared: &Shared) {
        let Some(redis) = &shared.redis else { return };
        let watchers = *shared.watchers.borrow();
        if watchers == 0 {
            self.sink = None;
            if self.sub.take().is_some() {
                shared.live.send_replace(None);
            }
            if self.read.is_none_or(|t| t.elapsed() >= READ_EVERY / 2) {
                self.read = Some(Instant::now());
                match redis
                    .flag_is_set(&shared.flag, Deadline::after(READ_EVERY))
                    .await
                {
                    Ok(set) => shared.publishing.store(set, Ordering::Relaxed),
                    Err(e) => tracing::debug!(error = %e, "cannot read the cache watch flag"),
                }
            }
            return;
        }
        shared.publishing.store(true, Ordering::Relaxed);
        if self.sub.is_none() {
            let [expired, evicted] = keyevent_channels(redis.db());
            let channels = [shared.channel.clone(), expired, evicted];
            match redis.subscribe(&channels).await {
                Ok((sink, stream)) => (self.sink, self.sub) = (Some(sink), Some(stream)),
                Err(e) => return self.failed(&e.to_string()),
            }
            self.renewed = None;
        }
        if self.renewed.is_some_and(|t| t.elapsed() < READ_EVERY / 2) {
            return;
        }
        if let Some(sink) = &mut self.sink {
            let ping = tokio::time::timeout(READ_EVERY, sink.ping::<redis::Value>()).await;
            if !matches!(ping, Ok(Ok(_))) {
                return self.lost(shared);
            }
        }
        self.renew(shared).await;
    }

    /// Keeps the flag alive; makes the bus live once the flag is old enough.
    async fn renew(&mut self, shared: &Shared) {
        let Some(redis) = &shared.redis else { return };
        let deadline = Deadline::after(READ_EVERY);
        let age = match redis.hold_flag(&shared.flag, FLAG_TTL, deadline).await {
            Ok(age) => age,
            Err(e) => return self.failed(&e.to_string()),
        };
        self.failing = false;
        let now = Instant::now();
        let live_at = now + READY_AFTER.saturating_sub(age);
        // A flag younger than this process's last renewal expired in
        // between: some koo may have stopped publishing since.
        let lapsed = self.renewed.is_some_and(|t| flag_lapsed(age, now - t));
        self.renewed = Some(now);
        if lapsed {
            tracing::warn!("the cache watch flag lapsed; resetting watchers");
            shared.live.send_replace(Some(live_at));
            shared.deliver(Event::Lost);
        } else if shared.live.borrow().is_none() {
            shared.live.send_replace(Some(live_at));
        }
    }

    fn failed(&mut self, why: &str) {
        if !self.failing {
            tracing::warn!(
                error = why,
                "cannot watch cache changes; retrying every second"
            );
        }
        self.failing = true;
    }
}

impl Shared {
    /// A message of the subscription: a change, or a key Redis expired.
    fn receive(&self, msg: &redis::Msg) {
        let payload = msg.get_payload_bytes();
        if msg.get_channel_name() == self.channel {
            match wire::decode(payload) {
                Ok(change) => self.deliver(Event::Change(change.into())),
                Err(e) => tracing::warn!(error = %e, "ignored a malformed cache change"),
            }
            return;
        }
        // A keyspace notification: the payload is the key.
        let Ok(full) = std::str::from_utf8(payload) else {
            return;
        };
        if let Some((level, key)) = self.keys.split_cache_key(full) {
            let change = Change::keys(ChangeKind::Expired, level, vec![key.to_owned()]);
            self.deliver(Event::Change(change.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::flag_lapsed;

    #[test]
    fn a_fresh_flag_is_not_taken_for_a_lapsed_one() {
        let ms = Duration::from_millis;
        // created by the last renewal 500 ms ago, measured by Redis's
        // clock a few ms shorter than by ours
        assert!(!flag_lapsed(ms(497), ms(503)));
        assert!(!flag_lapsed(ms(2_000), ms(500)));
        // recreated since (expired, or deleted): younger than the interval
        assert!(flag_lapsed(ms(0), ms(500)));
        assert!(flag_lapsed(ms(200), ms(3_400)));
    }
}
