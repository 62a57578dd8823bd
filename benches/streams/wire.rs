//! Reading GetTaskMetrics' `streams` figures without depending on them at
//! compile time: the field is new (issue 12) and koo's generated types do
//! not have it yet, so the reply is decoded with a one-field message and the
//! field shown by number.

use anyhow::anyhow;
use koo::pb::tasks::v1::GetTaskMetricsRequest;
use tonic::transport::Channel;

/// GetTaskMetrics with only its field 3 (`StreamMetrics streams`) kept.
// TODO(issue 12): once `streams` is in task_service.proto, read
// `GetTaskMetricsResponse::streams` (events_fanned_out,
// watchers_fallen_behind, watchers by kind) through TaskServiceClient and
// drop this raw call and `wire_fields`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawTaskMetrics {
    #[prost(bytes = "vec", optional, tag = "3")]
    streams: Option<Vec<u8>>,
}

/// GetTaskMetrics' `streams` field as {"field_N": value}, null when koo has
/// no such field, or the error as text.
pub async fn raw_stream_metrics(channel: &Channel) -> serde_json::Value {
    let call = async {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.map_err(|e| anyhow!("{e}"))?;
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/koo.tasks.v1.TaskService/GetTaskMetrics",
        );
        let codec = tonic_prost::ProstCodec::<GetTaskMetricsRequest, RawTaskMetrics>::default();
        let reply = grpc
            .unary(tonic::Request::new(GetTaskMetricsRequest {}), path, codec)
            .await?;
        Ok::<_, anyhow::Error>(reply.into_inner().streams)
    };
    match call.await {
        Ok(Some(bytes)) => wire_fields(&bytes).unwrap_or_else(|| "undecodable".into()),
        Ok(None) => serde_json::Value::Null,
        Err(e) => format!("GetTaskMetrics failed: {e:#}").into(),
    }
}

/// A protobuf message's fields by number, without its schema: varints as
/// numbers, nested messages as objects, text as strings, repeated fields as
/// arrays. None if the bytes are not a message.
fn wire_fields(mut b: &[u8]) -> Option<serde_json::Value> {
    use prost::encoding::decode_varint;
    let mut map = serde_json::Map::new();
    while !b.is_empty() {
        let key = decode_varint(&mut b).ok()?;
        let value: serde_json::Value = match key & 7 {
            0 => decode_varint(&mut b).ok()?.into(),
            1 => {
                let (x, rest) = b.split_first_chunk::<8>()?;
                b = rest;
                u64::from_le_bytes(*x).into()
            }
            2 => {
                let len = usize::try_from(decode_varint(&mut b).ok()?).ok()?;
                let (inner, rest) = b.split_at_checked(len)?;
                b = rest;
                match std::str::from_utf8(inner) {
                    Ok(s) if !s.chars().any(char::is_control) => s.into(),
                    _ => wire_fields(inner).unwrap_or_else(|| format!("{len} bytes").into()),
                }
            }
            5 => {
                let (x, rest) = b.split_first_chunk::<4>()?;
                b = rest;
                u32::from_le_bytes(*x).into()
            }
            _ => return None,
        };
        let name = format!("field_{}", key >> 3);
        match map.get_mut(&name) {
            None => {
                map.insert(name, value);
            }
            Some(serde_json::Value::Array(a)) => a.push(value),
            Some(first) => *first = serde_json::Value::Array(vec![first.take(), value]),
        }
    }
    Some(map.into())
}
