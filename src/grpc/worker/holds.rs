//! What each worker holds in this process, as the `WorkerService` sees it:
//! who a caller is for the hold bound (`KOO_MAX_HELD_PER_WORKER`, or its
//! key's `max_held`), room taken for a unary lease, room given back when a
//! report ends a lease or the lease lapses.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use super::WorkerApi;
use crate::domain::task::TaskId;
use crate::tasks::engine::TaskError;
use crate::tasks::remote::holds::{Holds, Taken, Tally};

impl WorkerApi {
    /// The tally of the worker making `request`: its authenticated
    /// principal (all its streams and leases), else its connection.
    pub(super) fn tally<T>(&self, request: &Request<T>) -> Arc<Tally> {
        let (identity, bound) = holder(request.extensions(), request.remote_addr());
        self.holds.tally(&identity, bound)
    }

    /// Forgets the unary holding of a lease that a report ended (or found
    /// ended).
    pub(super) fn ended<T>(&self, id: &str, token: u32, outcome: &Result<T, TaskError>) {
        if matches!(outcome, Ok(_) | Err(TaskError::Fenced(_)))
            && let Ok(id) = TaskId::parse(id)
        {
            self.holds.end_unary(&id, token);
        }
    }

    /// Room for one more task of the caller of a unary lease;
    /// RESOURCE_EXHAUSTED at its bound (after giving back lapsed leases).
    pub(super) fn take_room<T>(&self, request: &Request<T>) -> Result<Taken, Status> {
        let tally = self.tally(request);
        let mut taken = Taken::none(tally.clone());
        if !taken.take_one() {
            self.holds.sweep(tokio::time::Instant::now());
            if !taken.take_one() {
                let (held, bound) = (tally.held(), tally.bound());
                return Err(TaskError::TooManyHeld { held, bound }.into());
            }
        }
        Ok(taken)
    }
}

/// Who a request's worker is, for the hold bound, and its own bound if its
/// key sets one: the authenticated principal (all its streams and leases),
/// else the connection (as the transport numbers it, else its address).
pub(super) fn holder(
    extensions: &http::Extensions,
    addr: Option<std::net::SocketAddr>,
) -> (String, Option<u32>) {
    let caller = crate::auth::Caller::of(extensions);
    let identity = if caller.role.is_some() {
        format!("principal:{}", caller.principal)
    } else if let Some(peer) = extensions.get::<crate::transport::Peer>() {
        format!("connection:{}", peer.connection)
    } else if let Some(addr) = addr {
        format!("address:{addr}")
    } else {
        "unknown".to_owned()
    };
    (identity, caller.max_held)
}

/// Gives back, every `every`, the room of unary leases that lapsed.
pub(super) async fn sweep_holds(holds: Holds, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => holds.sweep(tokio::time::Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker is its principal when authenticated (whatever its
    /// connection, with its key's bound), else its connection.
    #[test]
    fn holders() {
        use crate::auth::{Caller, Role};
        use crate::transport::Peer;
        let a: std::net::SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let b: std::net::SocketAddr = "10.0.0.1:4001".parse().unwrap();
        let mut open = http::Extensions::new();
        assert_eq!(
            holder(&open, Some(a)),
            ("address:10.0.0.1:4000".into(), None)
        );
        assert_ne!(holder(&open, Some(a)), holder(&open, Some(b)));
        open.insert(Peer {
            addr: Some(a),
            identity: None,
            connection: 7,
        });
        assert_eq!(holder(&open, Some(a)).0, "connection:7");
        let mut keyed = open.clone();
        keyed.insert(Caller {
            role: Some(Role::Worker),
            max_held: Some(3),
            ..Caller::anonymous()
        });
        let mut other_conn = http::Extensions::new();
        other_conn.insert(keyed.get::<Caller>().unwrap().clone());
        assert_eq!(
            holder(&keyed, Some(a)),
            ("principal:anonymous".into(), Some(3))
        );
        assert_eq!(holder(&keyed, Some(a)), holder(&other_conn, Some(b)));
    }
}
