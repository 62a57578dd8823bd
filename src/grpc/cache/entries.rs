//! Cache entries as `CacheService` takes and shows them: levels, values
//! (raw, text or JSON as a protobuf `Value`), entries to write, hits and
//! what a write stored.

use tonic::Status;

use super::reports::pb_duration;
use crate::cache::{CacheError, Hit, Level, NewEntry, Stored, Value};
use crate::grpc::json;
use crate::grpc::status::invalid_argument;
use crate::grpc::time;
use crate::pb::cache::v1 as pb;

pub(crate) fn level(field: &str, raw: i32) -> Result<Level, Status> {
    match pb::CacheLevel::try_from(raw) {
        Ok(pb::CacheLevel::Unspecified | pb::CacheLevel::App) => Ok(Level::App),
        Ok(pb::CacheLevel::Db) => Ok(Level::Db),
        Ok(pb::CacheLevel::Api) => Ok(Level::Api),
        Ok(pb::CacheLevel::Session) => Ok(Level::Session),
        Err(_) => Err(invalid_argument(
            field,
            &format!("{raw} is not a cache level"),
        )),
    }
}

pub(crate) fn to_pb_level(l: Level) -> pb::CacheLevel {
    match l {
        Level::App => pb::CacheLevel::App,
        Level::Db => pb::CacheLevel::Db,
        Level::Api => pb::CacheLevel::Api,
        Level::Session => pb::CacheLevel::Session,
    }
}

pub(super) fn value(
    field: &str,
    v: Option<pb::CacheValue>,
    max_value_size: usize,
) -> Result<Value, Status> {
    match v.and_then(|v| v.kind) {
        None => Err(invalid_argument(
            field,
            "is required (one of raw, text or json)",
        )),
        Some(pb::cache_value::Kind::Raw(b)) => Ok(Value::Raw(b)),
        Some(pb::cache_value::Kind::Text(t)) => Ok(Value::Text(t)),
        Some(pb::cache_value::Kind::Json(j)) => {
            // JSON travels as a protobuf Value, which can be several times
            // larger than its text; the limit applies to the larger form so
            // that what is accepted can always be sent back.
            let encoded = prost::Message::encoded_len(&j);
            if encoded > max_value_size {
                return Err(invalid_argument(
                    &format!("{field}.json"),
                    &format!(
                        "encodes to {encoded} bytes of protobuf, over the limit of {max_value_size} bytes (CACHE_MAX_VALUE_SIZE)"
                    ),
                ));
            }
            json::to_json(&j)
                .map(Value::Json)
                .map_err(|e| invalid_argument(&format!("{field}.json"), &e))
        }
    }
}

pub(super) fn entry(
    at: &str,
    e: pb::CacheEntry,
    max_value_size: usize,
) -> Result<NewEntry, Status> {
    Ok(NewEntry {
        level: level(&format!("{at}level"), e.level)?,
        value: value(&format!("{at}value"), e.value, max_value_size)?,
        ttl: time::duration(&format!("{at}ttl"), e.ttl, time::CACHE_TTL)?,
        soft_ttl: time::duration(&format!("{at}soft_ttl"), e.soft_ttl, time::CACHE_TTL)?,
        tags: e.tags,
        key: e.key,
    })
}

fn pb_value(key: &str, v: Value) -> Result<pb::CacheValue, Status> {
    let kind = match v {
        Value::Raw(b) => pb::cache_value::Kind::Raw(b),
        Value::Text(t) => pb::cache_value::Kind::Text(t),
        Value::Json(j) => {
            pb::cache_value::Kind::Json(json::from_json(&j).map_err(|e| CacheError::Corrupt {
                key: key.to_owned(),
                reason: format!("stored JSON does not parse: {e}"),
            })?)
        }
    };
    Ok(pb::CacheValue { kind: Some(kind) })
}

pub(super) fn get_response(key: &str, hit: Option<Hit>) -> Result<pb::GetResponse, Status> {
    let Some(hit) = hit else {
        return Ok(pb::GetResponse::default());
    };
    Ok(pb::GetResponse {
        found: true,
        value: Some(pb_value(key, hit.value)?),
        ttl: hit.ttl.map(pb_duration),
        size_bytes: hit.size as i64,
        stored_size_bytes: hit.stored_size as i64,
        compressed: hit.compressed,
        tags: hit.tags,
        stale: hit.stale,
        soft_ttl: hit.soft_ttl.map(pb_duration),
    })
}

pub(super) fn set_response(s: Stored) -> pb::SetResponse {
    pb::SetResponse {
        ttl: Some(pb_duration(s.ttl)),
        size_bytes: s.size as i64,
        stored_size_bytes: s.stored_size as i64,
        compressed: s.compressed,
    }
}
