//! Cached values and their stored form.
//!
//! A stored value is an 8-byte header and the payload:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | `b'K'`, marks a koo value |
//! | 1 | format version, 1 |
//! | 2 | kind: 0 raw bytes, 1 UTF-8 text, 2 JSON text |
//! | 3 | encoding: 0 identity, 1 zlib |
//! | 4..8 | length of the value as set, little-endian u32 |
//!
//! The header makes the stored form self-describing, so that `Get` returns the
//! value in the form it was set, and so that a later format can be told apart
//! from this one during a rolling upgrade.

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

const MAGIC: u8 = b'K';
const VERSION: u8 = 1;
const HEADER: usize = 8;
const IDENTITY: u8 = 0;
const ZLIB: u8 = 1;

/// A cached value, in the form it was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Arbitrary bytes.
    Raw(Bytes),
    /// UTF-8 text.
    Text(String),
    /// JSON text (already validated by whoever built it).
    Json(String),
}

impl Value {
    fn kind(&self) -> u8 {
        match self {
            Value::Raw(_) => 0,
            Value::Text(_) => 1,
            Value::Json(_) => 2,
        }
    }

    /// The value's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Value::Raw(b) => b,
            Value::Text(s) | Value::Json(s) => s.as_bytes(),
        }
    }

    /// Size in bytes, as the size limit counts it.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A value in its stored form.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Header and payload, ready for the store.
    pub bytes: Bytes,
    /// Whether the payload is zlib-compressed.
    pub compressed: bool,
}

/// Encodes a value, compressing it when it is larger than `threshold` bytes
/// and compression makes it smaller. `value.len()` must fit in a u32 (the
/// size limit ensures it).
pub fn encode(value: &Value, threshold: usize, level: Compression) -> Encoded {
    let payload = value.as_bytes();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let header = |encoding| {
        let mut h = [MAGIC, VERSION, value.kind(), encoding, 0, 0, 0, 0];
        h[4..].copy_from_slice(&len.to_le_bytes());
        h
    };
    if payload.len() > threshold {
        let mut out = Vec::with_capacity(HEADER + payload.len() / 2);
        out.extend_from_slice(&header(ZLIB));
        let mut z = ZlibEncoder::new(out, level);
        // Writing into a Vec cannot fail.
        if z.write_all(payload).is_ok()
            && let Ok(out) = z.finish()
            && out.len() < HEADER + payload.len()
        {
            return Encoded {
                bytes: Bytes::from(out),
                compressed: true,
            };
        }
    }
    let mut out = BytesMut::with_capacity(HEADER + payload.len());
    out.put_slice(&header(IDENTITY));
    out.put_slice(payload);
    Encoded {
        bytes: out.freeze(),
        compressed: false,
    }
}

/// Why a stored value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not written by koo, or by an incompatible version.
    #[error("not a koo value (unknown header {0:02x?})")]
    Foreign(Vec<u8>),
    /// The header is koo's but the content does not match it.
    #[error("{0}")]
    Damaged(String),
}

/// A decoded value with facts about its stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The value as it was set.
    pub value: Value,
    /// Whether it was stored compressed.
    pub compressed: bool,
}

/// Decodes a stored value.
pub fn decode(stored: &Bytes) -> Result<Decoded, DecodeError> {
    if stored.len() < HEADER || stored[0] != MAGIC || stored[1] != VERSION {
        return Err(DecodeError::Foreign(stored[..stored.len().min(HEADER)].to_vec()));
    }
    let kind = stored[2];
    let len = u32::from_le_bytes([stored[4], stored[5], stored[6], stored[7]]) as usize;
    let body = stored.slice(HEADER..);
    let (payload, compressed) = match stored[3] {
        IDENTITY => (body, false),
        ZLIB => {
            // Bounded by the recorded length, so a damaged value cannot
            // inflate without limit.
            let mut out = Vec::with_capacity(len);
            let read = ZlibDecoder::new(&body[..])
                .take(len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| DecodeError::Damaged(format!("zlib stream is damaged: {e}")))?;
            if read != len {
                return Err(DecodeError::Damaged(format!(
                    "inflated to {read} bytes, header says {len}"
                )));
            }
            (Bytes::from(out), true)
        }
        other => return Err(DecodeError::Damaged(format!("unknown encoding {other}"))),
    };
    if payload.len() != len {
        return Err(DecodeError::Damaged(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    let text = |p: Bytes| {
        String::from_utf8(p.to_vec()).map_err(|_| DecodeError::Damaged("text is not UTF-8".into()))
    };
    let value = match kind {
        0 => Value::Raw(payload),
        1 => Value::Text(text(payload)?),
        2 => Value::Json(text(payload)?),
        other => return Err(DecodeError::Damaged(format!("unknown kind {other}"))),
    };
    Ok(Decoded { value, compressed })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value, threshold: usize) -> Decoded {
        let e = encode(&v, threshold, Compression::fast());
        let d = decode(&e.bytes).unwrap();
        assert_eq!(d.value, v);
        assert_eq!(d.compressed, e.compressed);
        d
    }

    /// Compression applies strictly above the threshold, and only when it helps.
    #[test]
    fn compresses_above_threshold_only_when_smaller() {
        let text = "a".repeat(1024);
        assert!(!round_trip(Value::Text(text.clone()), 1024).compressed);
        assert!(round_trip(Value::Text(text + "a"), 1024).compressed);
        // incompressible bytes stay as they are
        let mut noise = vec![0u8; 4096];
        rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
        assert!(!round_trip(Value::Raw(Bytes::from(noise)), 1024).compressed);
    }

    /// Every kind round-trips, including empty values.
    #[test]
    fn kinds_round_trip() {
        round_trip(Value::Raw(Bytes::new()), 0);
        round_trip(Value::Raw(Bytes::from_static(&[0, 255, 1, 254])), 0);
        round_trip(Value::Text("héllo".into()), 1);
        round_trip(Value::Json(r#"{"a":[1,2,3]}"#.into()), 1);
    }

    /// Foreign and damaged values are reported, never panicked on.
    #[test]
    fn rejects_foreign_and_damaged() {
        assert!(matches!(decode(&Bytes::from_static(b"hello")), Err(DecodeError::Foreign(_))));
        assert!(matches!(decode(&Bytes::new()), Err(DecodeError::Foreign(_))));
        let mut e = encode(&Value::Text("x".repeat(5000)), 10, Compression::fast()).bytes.to_vec();
        let last = e.len() - 1;
        e[last] ^= 0xff;
        e.truncate(last - 10);
        assert!(matches!(decode(&Bytes::from(e)), Err(DecodeError::Damaged(_))));
        let mut lying = encode(&Value::Raw(Bytes::from_static(b"abc")), 100, Compression::fast()).bytes.to_vec();
        lying[4] = 9;
        assert!(matches!(decode(&Bytes::from(lying)), Err(DecodeError::Damaged(_))));
    }
}
