//! `GetOrLock`, `Fill` and `GetOrCompute`: compute a missing value once.
//! The domain is `cache::compute` (locks, waiting) and `watch::compute`
//! (the task); this converts requests and replies.

use std::time::Duration;

use tonic::{Request, Response, Status};

use super::CacheApi;
use super::entries::{get_response, level, set_response, value};
use prost_types::value::Kind;

use crate::cache::compute::{Lease, Locked};
use crate::cache::{Cache, NewEntry};
use crate::domain::task::QueueName;
use crate::grpc::json;
use crate::grpc::status::invalid_argument;
use crate::grpc::time;
use crate::pb::cache::v1 as pb;
use crate::store::Deadline;
use crate::watch::compute::{ComputeRequest, compute_task};

/// GetOrLock's lock when the request names none.
const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);
/// GetOrCompute's lock when the request names none.
const DEFAULT_COMPUTE_LOCK_TTL: Duration = Duration::from_secs(300);

impl CacheApi {
    pub(super) async fn get_or_lock_rpc(
        &self,
        request: Request<pb::GetOrLockRequest>,
    ) -> Result<Response<pb::GetOrLockResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let level = level("level", r.level)?;
        let lock_ttl =
            time::duration("lock_ttl", r.lock_ttl, time::LOCK_TTL)?.unwrap_or(DEFAULT_LOCK_TTL);
        let wait = time::duration("wait", r.wait, time::LOCK_WAIT)?.map(Deadline::after);
        let locked = self
            .cache
            .get_or_lock(level, &r.key, lock_ttl, wait, deadline)
            .await?;
        Ok(Response::new(get_or_lock_response(&r.key, locked)?))
    }

    pub(super) async fn fill_rpc(
        &self,
        request: Request<pb::FillRequest>,
    ) -> Result<Response<pb::FillResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let level = level("level", r.level)?;
        let entry = match r.value {
            None => None,
            Some(v) => Some(NewEntry {
                level,
                key: r.key.clone(),
                value: value("value", Some(v), self.max_value_size)?,
                ttl: time::duration("ttl", r.ttl, time::CACHE_TTL)?,
                soft_ttl: time::duration("soft_ttl", r.soft_ttl, time::CACHE_TTL)?,
                tags: r.tags,
            }),
        };
        let stored = self
            .cache
            .fill(level, &r.key, &r.lock_token, entry, deadline)
            .await?;
        Ok(Response::new(pb::FillResponse {
            stored: stored.map(set_response),
        }))
    }

    pub(super) async fn get_or_compute_rpc(
        &self,
        request: Request<pb::GetOrComputeRequest>,
    ) -> Result<Response<pb::GetOrComputeResponse>, Status> {
        let deadline = self.deadline(&request);
        let r = request.into_inner();
        let key = r.key.clone();
        let compute = compute_request(r, &self.cache)?;
        let done = self.compute.get_or_compute(compute, deadline).await?;
        Ok(Response::new(pb::GetOrComputeResponse {
            entry: Some(get_response(&key, Some(done.hit))?),
            computed: done.computed,
            task_id: done.task_id.unwrap_or_default(),
        }))
    }
}

/// A GetOrCompute request as the domain takes it.
fn compute_request(r: pb::GetOrComputeRequest, cache: &Cache) -> Result<ComputeRequest, Status> {
    let level = level("level", r.level)?;
    let task = r
        .task
        .ok_or_else(|| invalid_argument("task", "is required (name, args, kwargs, queue)"))?;
    if task.name.is_empty() {
        return Err(invalid_argument("task.name", "must not be empty"));
    }
    let args = prost_types::Value {
        kind: Some(Kind::ListValue(prost_types::ListValue {
            values: task.args,
        })),
    };
    let kwargs = prost_types::Value {
        kind: Some(Kind::StructValue(task.kwargs.unwrap_or_default())),
    };
    let mut new = compute_task(
        &task.name,
        json::to_json(&args).map_err(|e| invalid_argument("task.args", &e))?,
        json::to_json(&kwargs).map_err(|e| invalid_argument("task.kwargs", &e))?,
    );
    if !task.queue.is_empty() {
        new.queue = Some(
            QueueName::parse(&task.queue)
                .map_err(|e| invalid_argument("task.queue", &e.to_string()))?,
        );
    }
    Ok(ComputeRequest {
        level,
        task: new,
        ttl: time::duration("ttl", r.ttl, time::CACHE_TTL)?.unwrap_or(cache.default_ttl(level)),
        soft_ttl: time::duration("soft_ttl", r.soft_ttl, time::CACHE_TTL)?,
        tags: r.tags,
        lock_ttl: time::duration("lock_ttl", r.lock_ttl, time::COMPUTE_LOCK_TTL)?
            .unwrap_or(DEFAULT_COMPUTE_LOCK_TTL),
        key: r.key,
    })
}

fn get_or_lock_response(key: &str, locked: Locked) -> Result<pb::GetOrLockResponse, Status> {
    let lease = |l: Lease| (l.token, Some(prost_types::Timestamp::from(l.expires)));
    let (hit, (lock_token, lock_expire_time)) = match locked {
        Locked::Value { hit, .. } => (Some(hit), (String::new(), None)),
        Locked::Refresh { hit, lease: l } => (Some(hit), lease(l)),
        Locked::Compute(l) => (None, lease(l)),
        Locked::TimedOut => (None, (String::new(), None)),
    };
    Ok(pb::GetOrLockResponse {
        found: hit.is_some(),
        entry: hit.map(|h| get_response(key, Some(h))).transpose()?,
        lock_token,
        lock_expire_time,
    })
}
