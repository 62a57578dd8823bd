//! The protobuf codec for koo's services.
//!
//! It is tonic's prost codec with one change: a request that is not valid
//! protobuf (truncated, garbage, a `string` field holding bytes that are not
//! UTF-8) is answered `INVALID_ARGUMENT`, not `INTERNAL`. Such a request is the
//! caller's mistake, and the caller should be told so; INTERNAL would page
//! whoever runs koo for a bug that is not theirs. A message nested past
//! prost's fixed limit of 100 levels is almost always deep JSON, so that
//! refusal names koo's JSON depth limit (see [`super::json::MAX_DEPTH`])
//! rather than calling the request invalid protobuf.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// A prost codec whose decode errors are `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct KooCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for KooCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for KooCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = KooDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        KooDecoder(ProstCodec::<T, U>::raw_decoder(BufferSettings::default()))
    }
}

/// Decodes with prost and turns a malformed message into `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct KooDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for KooDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.message().contains("recursion limit reached") {
                return Status::invalid_argument(format!(
                    "request nests too deeply to decode: a JSON value {}",
                    super::json::too_deep()
                ));
            }
            // prost's message names the path to the error, which a deep
            // message makes long
            Status::invalid_argument(format!(
                "request is not a valid protobuf message: {}",
                crate::quote::clip(status.message(), 512)
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use prost_types::value::Kind;
    use prost_types::{Struct, Value};

    use super::super::json::MAX_DEPTH;
    use crate::pb;

    /// A JSON value of `depth` nested objects.
    fn objects(depth: usize) -> Value {
        let mut v = Value {
            kind: Some(Kind::NumberValue(1.0)),
        };
        for _ in 0..depth {
            v = Value {
                kind: Some(Kind::StructValue(Struct {
                    fields: [("a".to_owned(), v)].into(),
                })),
            };
        }
        v
    }

    fn as_struct(v: Value) -> Struct {
        match v.kind {
            Some(Kind::StructValue(s)) => s,
            _ => unreachable!(),
        }
    }

    /// A JSON value at the documented depth limit decodes in the request
    /// that wraps it deepest (objects cost the most protobuf levels), so the
    /// limit can be met whatever path a value takes; prost's own limit trips
    /// only past it.
    #[test]
    fn the_depth_limit_fits_every_request() {
        let deepest = [
            pb::tasks::v1::SubmitTasksRequest {
                tasks: vec![pb::tasks::v1::SubmitTaskRequest {
                    kwargs: Some(as_struct(objects(MAX_DEPTH))),
                    args: vec![objects(MAX_DEPTH - 1)],
                    ..Default::default()
                }],
            }
            .encode_to_vec(),
            pb::worker::v1::WorkRequest {
                message: Some(pb::worker::v1::work_request::Message::Fail(
                    pb::worker::v1::Fail {
                        details: Some(as_struct(objects(MAX_DEPTH))),
                        ..Default::default()
                    },
                )),
            }
            .encode_to_vec(),
            pb::cache::v1::WarmRequest {
                entries: vec![pb::cache::v1::CacheEntry {
                    value: Some(pb::cache::v1::CacheValue {
                        kind: Some(pb::cache::v1::cache_value::Kind::Json(objects(MAX_DEPTH))),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ];
        pb::tasks::v1::SubmitTasksRequest::decode(&deepest[0][..]).unwrap();
        pb::worker::v1::WorkRequest::decode(&deepest[1][..]).unwrap();
        pb::cache::v1::WarmRequest::decode(&deepest[2][..]).unwrap();
        let past = pb::cache::v1::SetRequest {
            value: Some(pb::cache::v1::CacheValue {
                kind: Some(pb::cache::v1::cache_value::Kind::Json(objects(50))),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let e = pb::cache::v1::SetRequest::decode(&past[..]).unwrap_err();
        assert!(e.to_string().contains("recursion limit reached"), "{e}");
    }
}
