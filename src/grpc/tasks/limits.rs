//! Flow control's eight RPCs (`SetRateLimit` … `DeleteConcurrencyLimit`):
//! rate limits and concurrency caps as protobuf, and the handlers that
//! check a request, call the engine and convert its answer.
//!
//! A limit's name is its scope (`queues/x`, `tasks/x`, `keys/x`, `keys/*`,
//! see [`Scope`]); a concurrency cap's is a key's only. Fields are named as
//! the request spells them (`rate_limit.period`), and a name that is not
//! one is quoted, bounded.

use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::TaskApi;
use super::model::{pb_duration_ms, timestamp};
use crate::auth::audit;
use crate::domain::flow::{ConcurrencyLimit, Limit, LimitState, Policy, RateLimit, Scope, Source};
use crate::grpc::status::invalid_argument;
use crate::grpc::time::{self, LIMIT_PERIOD};
use crate::pb::tasks::v1 as pb;
use crate::tasks::engine::TaskError;

pub(super) async fn set_rate_limit(
    api: &TaskApi,
    request: Request<pb::SetRateLimitRequest>,
) -> Result<Response<pb::SetRateLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    audit::target(request.extensions(), || {
        let name = request
            .get_ref()
            .rate_limit
            .as_ref()
            .map(|r| r.name.as_str());
        format!(
            "rate limit {}",
            crate::quote::quote(name.unwrap_or_default())
        )
    });
    let limit = rate_limit_in(request.into_inner().rate_limit)?;
    let stored = api.engine().set_rate_limit(limit, deadline).await?;
    Ok(Response::new(pb::SetRateLimitResponse {
        rate_limit: pb_rate_limit(stored),
    }))
}

pub(super) async fn get_rate_limit(
    api: &TaskApi,
    request: Request<pb::GetRateLimitRequest>,
) -> Result<Response<pb::GetRateLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    let name = request.into_inner().name;
    let field = RateLimit::field_of(&scope("name", &name)?);
    let found = api.engine().limit(&field, deadline).await?;
    Ok(Response::new(pb::GetRateLimitResponse {
        rate_limit: Some(
            found
                .and_then(pb_rate_limit)
                .ok_or_else(|| missing("rate limit", &name))?,
        ),
    }))
}

pub(super) async fn list_rate_limits(
    api: &TaskApi,
    request: Request<pb::ListRateLimitsRequest>,
) -> Result<Response<pb::ListRateLimitsResponse>, Status> {
    let deadline = api.deadline(&request);
    let limits = api.engine().list_limits(deadline).await?;
    Ok(Response::new(pb::ListRateLimitsResponse {
        rate_limits: limits.into_iter().filter_map(pb_rate_limit).collect(),
    }))
}

pub(super) async fn delete_rate_limit(
    api: &TaskApi,
    request: Request<pb::DeleteRateLimitRequest>,
) -> Result<Response<pb::DeleteRateLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    audit::target(request.extensions(), || {
        format!(
            "rate limit {}",
            crate::quote::quote(&request.get_ref().name)
        )
    });
    let name = request.into_inner().name;
    let field = RateLimit::field_of(&scope("name", &name)?);
    if !api.engine().delete_limit(&field, deadline).await? {
        return Err(missing("rate limit", &name));
    }
    Ok(Response::new(pb::DeleteRateLimitResponse {}))
}

pub(super) async fn set_concurrency_limit(
    api: &TaskApi,
    request: Request<pb::SetConcurrencyLimitRequest>,
) -> Result<Response<pb::SetConcurrencyLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    audit::target(request.extensions(), || {
        let name = request
            .get_ref()
            .concurrency_limit
            .as_ref()
            .map(|c| c.name.as_str());
        format!(
            "concurrency limit {}",
            crate::quote::quote(name.unwrap_or_default())
        )
    });
    let limit = concurrency_limit_in(request.into_inner().concurrency_limit)?;
    let stored = api.engine().set_concurrency_limit(limit, deadline).await?;
    Ok(Response::new(pb::SetConcurrencyLimitResponse {
        concurrency_limit: pb_concurrency_limit(stored),
    }))
}

pub(super) async fn get_concurrency_limit(
    api: &TaskApi,
    request: Request<pb::GetConcurrencyLimitRequest>,
) -> Result<Response<pb::GetConcurrencyLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    let name = request.into_inner().name;
    let field = ConcurrencyLimit::field_of(&concurrency_key("name", &name)?);
    let found = api.engine().limit(&field, deadline).await?;
    let limit = found.and_then(pb_concurrency_limit);
    Ok(Response::new(pb::GetConcurrencyLimitResponse {
        concurrency_limit: Some(limit.ok_or_else(|| missing("concurrency limit", &name))?),
    }))
}

pub(super) async fn list_concurrency_limits(
    api: &TaskApi,
    request: Request<pb::ListConcurrencyLimitsRequest>,
) -> Result<Response<pb::ListConcurrencyLimitsResponse>, Status> {
    let deadline = api.deadline(&request);
    let limits = api.engine().list_limits(deadline).await?;
    Ok(Response::new(pb::ListConcurrencyLimitsResponse {
        concurrency_limits: limits
            .into_iter()
            .filter_map(pb_concurrency_limit)
            .collect(),
    }))
}

pub(super) async fn delete_concurrency_limit(
    api: &TaskApi,
    request: Request<pb::DeleteConcurrencyLimitRequest>,
) -> Result<Response<pb::DeleteConcurrencyLimitResponse>, Status> {
    let deadline = api.deadline(&request);
    audit::target(request.extensions(), || {
        format!(
            "concurrency limit {}",
            crate::quote::quote(&request.get_ref().name)
        )
    });
    let name = request.into_inner().name;
    let field = ConcurrencyLimit::field_of(&concurrency_key("name", &name)?);
    if !api.engine().delete_limit(&field, deadline).await? {
        return Err(missing("concurrency limit", &name));
    }
    Ok(Response::new(pb::DeleteConcurrencyLimitResponse {}))
}

/// NOT_FOUND for the `what` named `name`.
fn missing(what: &str, name: &str) -> Status {
    TaskError::Missing(format!("no {what} named {}", crate::quote::quote(name))).into()
}

/// A limit's name as a scope; INVALID_ARGUMENT naming `field` otherwise.
fn scope(field: &str, name: &str) -> Result<Scope, Status> {
    if name.is_empty() {
        return Err(invalid_argument(field, "is required (e.g. keys/openai)"));
    }
    Scope::parse(name)
        .map_err(|why| invalid_argument(field, &format!("{} {why}", crate::quote::quote(name))))
}

/// A concurrency cap's name (`keys/<key>` or `keys/*`) as its key.
fn concurrency_key(field: &str, name: &str) -> Result<String, Status> {
    match scope(field, name)? {
        Scope::Key(key) => Ok(key),
        _ => Err(invalid_argument(
            field,
            &format!(
                "{}: a concurrency cap applies to a key: keys/<concurrency_key> or keys/*",
                crate::quote::quote(name)
            ),
        )),
    }
}

/// A rate limit as set; the engine checks the numbers.
fn rate_limit_in(r: Option<pb::RateLimit>) -> Result<RateLimit, Status> {
    let r = r.ok_or_else(|| invalid_argument("rate_limit", "is required"))?;
    let scope = scope("rate_limit.name", &r.name)?;
    let period = time::duration("rate_limit.period", r.period, LIMIT_PERIOD)?
        .ok_or_else(|| invalid_argument("rate_limit.period", "is required (e.g. 1s)"))?;
    Ok(RateLimit {
        scope,
        limit: r.limit,
        period,
        burst: r.burst,
        source: Source::Api,
    })
}

/// A concurrency cap as set; the engine checks the count.
fn concurrency_limit_in(c: Option<pb::ConcurrencyLimit>) -> Result<ConcurrencyLimit, Status> {
    let c = c.ok_or_else(|| invalid_argument("concurrency_limit", "is required"))?;
    let key = concurrency_key("concurrency_limit.name", &c.name)?;
    use pb::ConcurrencyPolicy as P;
    let policy = match P::try_from(c.policy) {
        Ok(P::Unspecified | P::Wait) => Policy::Wait,
        Ok(P::CancelNewest) => Policy::CancelNewest,
        Ok(P::CancelOldest) => Policy::CancelOldest,
        Err(_) => {
            return Err(invalid_argument(
                "concurrency_limit.policy",
                &format!("{} is not a concurrency policy", c.policy),
            ));
        }
    };
    Ok(ConcurrencyLimit {
        key,
        max_running: c.max_running,
        policy,
        source: Source::Api,
    })
}

fn pb_source(s: Source) -> pb::LimitSource {
    match s {
        Source::Config => pb::LimitSource::Config,
        Source::Api => pb::LimitSource::Api,
    }
}

/// A rate limit with its state (`None` for a concurrency cap). An idle
/// bucket's next free token is now.
fn pb_rate_limit((limit, state): (Limit, LimitState)) -> Option<pb::RateLimit> {
    let Limit::Rate(r) = limit else { return None };
    let now = crate::store::unix_millis(SystemTime::now());
    Some(pb::RateLimit {
        name: r.scope.name(),
        limit: r.limit,
        period: pb_duration_ms(r.period.as_millis() as u64),
        burst: r.burst,
        source: pb_source(r.source) as i32,
        next_free_time: timestamp(Some(state.next_free_ms.unwrap_or(now))),
        backoff_until: timestamp(state.backoff_until_ms.filter(|&ms| ms > now)),
    })
}

/// A concurrency cap with its key's running count (`None` for a rate
/// limit).
fn pb_concurrency_limit((limit, state): (Limit, LimitState)) -> Option<pb::ConcurrencyLimit> {
    let Limit::Concurrency(c) = limit else {
        return None;
    };
    let policy = match c.policy {
        Policy::Wait => pb::ConcurrencyPolicy::Wait,
        Policy::CancelNewest => pb::ConcurrencyPolicy::CancelNewest,
        Policy::CancelOldest => pb::ConcurrencyPolicy::CancelOldest,
    };
    Some(pb::ConcurrencyLimit {
        name: Scope::Key(c.key).name(),
        max_running: c.max_running,
        policy: policy as i32,
        source: pb_source(c.source) as i32,
        running: state.running,
    })
}
