//! Cached values and their stored form.
//!
//! A stored value is an 8-byte header and the payload:
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | `b'K'`, marks a koo value |
//! | 1 | format version, 1 or 2 |
//! | 2 | kind: 0 raw bytes, 1 UTF-8 text, 2 JSON text |
//! | 3 | encoding: 0 identity, 1 zlib |
//! | 4..8 | length of the value as set, little-endian u32 |
//!
//! Version 2 is written only for an entry with tags or a soft TTL; every
//! other entry stays version 1, byte for byte, so that the plain path costs
//! what it did. In version 2 an extension block ([`Meta`], see [`ext`])
//! sits between the header and the payload:
//!
//! | bytes | meaning |
//! |---|---|
//! | 1 | flags: bit 0 soft expiry present, bit 1 tags present; others must be 0 |
//! | 8 + 4 | (bit 0) soft expiry, i64 LE ms since the Unix epoch; compute time, u32 LE ms (0 unknown, kept for XFetch) |
//! | 2 | (bit 1) tag count, u16 LE |
//! | 2 + n + 8 | (bit 1) per tag: name length u16 LE, the UTF-8 name, its version u64 LE |
//!
//! The payload after it is encoded exactly as in version 1; the block itself
//! is never compressed, so that its tags can be read without inflating.
//!
//! The header makes the stored form self-describing, so that `Get` returns the
//! value in the form it was set, and so that a later format can be told apart
//! from this one during a rolling upgrade.

mod ext;

pub use self::ext::{Meta, NO_META};

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

const MAGIC: u8 = b'K';
const VERSION: u8 = 1;
/// The version of entries that carry a [`Meta`] block.
const VERSION_META: u8 = 2;
/// Bytes of koo's header in front of every stored value.
pub const HEADER: usize = 8;
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
    /// The bytes before the payload: the header, and in version 2 the
    /// tags and soft expiry (what compression figures leave out).
    pub overhead: usize,
}

thread_local! {
    /// One zlib compressor and decompressor per thread, reset between uses:
    /// their state is a few hundred KiB, and allocating and zeroing it on
    /// every call cost more than compressing a 4 KiB value.
    static DEFLATE: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Bytes sampled to decide whether a large payload is worth deflating.
const SAMPLE: usize = 512;

/// zlib-compresses `payload` after `header` (koo's header, and in version 2
/// the extension block) into a buffer no larger than `header + payload`; `None` when compression would not make it smaller
/// (the compressor stops as soon as the output fills that buffer, so
/// incompressible data costs at most one pass).
fn deflate(header: &[u8], payload: &[u8], level: Compression) -> Option<Vec<u8>> {
    DEFLATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compress = match cell.as_mut() {
            Some((l, c)) if *l == level.level() => {
                c.reset();
                c
            }
            _ => &mut cell.insert((level.level(), Compress::new(level, true))).1,
        };
        // Already-compressed data (images, archives, encrypted blobs) does not
        // shrink, and deflating it whole costs as much as everything else a
        // Set does. A sample from the front that does not shrink at all
        // predicts that well, for an eighth of the work.
        if payload.len() >= 4 * SAMPLE {
            let mut probe = Vec::with_capacity(SAMPLE);
            let shrank = matches!(
                compress.compress_vec(&payload[..SAMPLE], &mut probe, FlushCompress::Finish),
                Ok(Status::StreamEnd)
            );
            if !shrank {
                return None;
            }
            compress.reset();
        }
        let mut out = Vec::with_capacity(header.len() + payload.len());
        out.extend_from_slice(header);
        match compress.compress_vec(payload, &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) if out.len() < header.len() + payload.len() => {
                // The buffer was sized for the worst case; kept as is, a
                // stored value would pin its uncompressed size in memory.
                out.shrink_to_fit();
                Some(out)
            }
            _ => None,
        }
    })
}

/// Inflates exactly `len` bytes; anything else is damage.
fn inflate(body: &[u8], len: usize) -> Result<Vec<u8>, DecodeError> {
    // deflate cannot expand data more than ~1032:1; a header claiming more is
    // damaged, and must not make us allocate what it claims.
    if len > body.len().saturating_mul(1032).saturating_add(64) {
        return Err(DecodeError::Damaged(format!(
            "header says {len} bytes, more than {} compressed bytes can hold",
            body.len()
        )));
    }
    INFLATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompress = match cell.as_mut() {
            Some(d) => {
                d.reset(true);
                d
            }
            None => cell.insert(Decompress::new(true)),
        };
        // One spare byte, so that a stream longer than the header says is
        // caught rather than silently cut.
        let mut out = Vec::with_capacity(len + 1);
        let status = decompress
            .decompress_vec(body, &mut out, FlushDecompress::Finish)
            .map_err(|e| DecodeError::Damaged(format!("zlib stream is damaged: {e}")))?;
        if status != Status::StreamEnd || out.len() != len {
            return Err(DecodeError::Damaged(format!(
                "zlib stream inflates to {}{} bytes, header says {len}",
                out.len(),
                if status == Status::StreamEnd {
                    ""
                } else {
                    "+ (incomplete)"
                }
            )));
        }
        Ok(out)
    })
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
    if payload.len() > threshold
        && let Some(out) = deflate(&header(ZLIB), payload, level)
    {
        return Encoded {
            bytes: Bytes::from(out),
            compressed: true,
            overhead: HEADER,
        };
    }
    let mut out = BytesMut::with_capacity(HEADER + payload.len());
    out.put_slice(&header(IDENTITY));
    out.put_slice(payload);
    Encoded {
        bytes: out.freeze(),
        compressed: false,
        overhead: HEADER,
    }
}

/// Encodes a value with its tags and soft expiry: version 2 with `meta`'s
/// block, or exactly [`encode`] when `meta` is empty.
pub fn encode_with(value: &Value, meta: &Meta, threshold: usize, level: Compression) -> Encoded {
    if meta.is_empty() {
        return encode(value, threshold, level);
    }
    let payload = value.as_bytes();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut prefix = Vec::with_capacity(HEADER + 16 + meta.tags.len() * 24);
    prefix.extend_from_slice(&[MAGIC, VERSION_META, value.kind(), IDENTITY]);
    prefix.extend_from_slice(&len.to_le_bytes());
    meta.write(&mut prefix);
    let overhead = prefix.len();
    if payload.len() > threshold {
        prefix[3] = ZLIB;
        if let Some(out) = deflate(&prefix, payload, level) {
            return Encoded {
                bytes: Bytes::from(out),
                compressed: true,
                overhead,
            };
        }
        prefix[3] = IDENTITY;
    }
    prefix.extend_from_slice(payload);
    Encoded {
        bytes: Bytes::from(prefix),
        compressed: false,
        overhead,
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

/// The size of the value as set, read from a stored value's header without
/// decoding it; `None` for a value koo did not write.
pub fn declared_len(stored: &[u8]) -> Option<usize> {
    match stored {
        [MAGIC, VERSION | VERSION_META, _, _, a, b, c, d, ..] => {
            Some(u32::from_le_bytes([*a, *b, *c, *d]) as usize)
        }
        _ => None,
    }
}

/// A decoded value with facts about its stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The value as it was set.
    pub value: Value,
    /// Whether it was stored compressed.
    pub compressed: bool,
    /// Its tags and soft expiry (empty for a version-1 value).
    pub meta: Meta,
}

/// Decodes a stored value.
pub fn decode(stored: &Bytes) -> Result<Decoded, DecodeError> {
    if stored.len() < HEADER
        || stored[0] != MAGIC
        || (stored[1] != VERSION && stored[1] != VERSION_META)
    {
        return Err(DecodeError::Foreign(
            stored[..stored.len().min(HEADER)].to_vec(),
        ));
    }
    let kind = stored[2];
    let len = u32::from_le_bytes([stored[4], stored[5], stored[6], stored[7]]) as usize;
    let (meta, block) = match stored[1] {
        VERSION_META => Meta::read(&stored[HEADER..])?,
        _ => (Meta::default(), 0),
    };
    let body = stored.slice(HEADER + block..);
    let (payload, compressed) = match stored[3] {
        IDENTITY => (body, false),
        // Bounded by the recorded length, so a damaged value cannot inflate
        // without limit.
        ZLIB => (Bytes::from(inflate(&body, len)?), true),
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
    Ok(Decoded {
        value,
        compressed,
        meta,
    })
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

    /// A large value whose start is incompressible is not compressed, even
    /// if its tail would be; a compressible start still compresses.
    #[test]
    fn incompressible_sample_skips_compression() {
        let mut noise = vec![0u8; 600];
        rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
        let mut mostly_text = noise.clone();
        mostly_text.extend(std::iter::repeat_n(b'a', 10_000));
        assert!(
            !encode(
                &Value::Raw(Bytes::from(mostly_text)),
                100,
                Compression::fast()
            )
            .compressed
        );
        let mut text_first = vec![b'a'; 600];
        text_first.extend_from_slice(&noise);
        text_first.extend(std::iter::repeat_n(b'b', 2000));
        assert!(
            encode(
                &Value::Raw(Bytes::from(text_first)),
                100,
                Compression::fast()
            )
            .compressed
        );
    }

    /// The per-thread compressor is reused across levels and calls without
    /// leaking state from one value into the next.
    #[test]
    fn reused_compressor_is_clean() {
        for level in [1, 6, 1, 9] {
            for text in ["a".repeat(3000), "b".repeat(2000), "ab".repeat(4000)] {
                let e = encode(&Value::Text(text.clone()), 10, Compression::new(level));
                assert!(e.compressed);
                assert_eq!(decode(&e.bytes).unwrap().value, Value::Text(text));
            }
        }
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
        assert!(matches!(
            decode(&Bytes::from_static(b"hello")),
            Err(DecodeError::Foreign(_))
        ));
        assert!(matches!(
            decode(&Bytes::new()),
            Err(DecodeError::Foreign(_))
        ));
        let mut e = encode(&Value::Text("x".repeat(5000)), 10, Compression::fast())
            .bytes
            .to_vec();
        let last = e.len() - 1;
        e[last] ^= 0xff;
        e.truncate(last - 10);
        assert!(matches!(
            decode(&Bytes::from(e)),
            Err(DecodeError::Damaged(_))
        ));
        let mut lying = encode(
            &Value::Raw(Bytes::from_static(b"abc")),
            100,
            Compression::fast(),
        )
        .bytes
        .to_vec();
        lying[4] = 9;
        assert!(matches!(
            decode(&Bytes::from(lying)),
            Err(DecodeError::Damaged(_))
        ));
        // a compressed value whose header claims 4 GiB is refused without allocating it
        let mut bomb = encode(&Value::Text("y".repeat(5000)), 10, Compression::fast())
            .bytes
            .to_vec();
        bomb[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&Bytes::from(bomb)),
            Err(DecodeError::Damaged(_))
        ));
        // and one that claims fewer bytes than it holds is caught too
        let mut short = encode(&Value::Text("y".repeat(5000)), 10, Compression::fast())
            .bytes
            .to_vec();
        short[4..8].copy_from_slice(&4999u32.to_le_bytes());
        assert!(matches!(
            decode(&Bytes::from(short)),
            Err(DecodeError::Damaged(_))
        ));
    }
}
