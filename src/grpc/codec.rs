//! The protobuf codec for koo's services.
//!
//! It is tonic's prost codec with one change: a request that is not valid
//! protobuf (truncated, garbage, a `string` field holding bytes that are not
//! UTF-8) is answered `INVALID_ARGUMENT`, not `INTERNAL`. Such a request is the
//! caller's mistake, and the caller should be told so; INTERNAL would page
//! whoever runs koo for a bug that is not theirs.

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
            Status::invalid_argument(format!(
                "request is not a valid protobuf message: {}",
                status.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
