//! The extension block of a version-2 stored value: an entry's soft expiry
//! and its tags with their versions (layout in the parent module's doc).

use super::DecodeError;

const SOFT: u8 = 1;
const TAGS: u8 = 2;

/// What a version-2 entry carries besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// When the entry turns stale, in ms since the Unix epoch.
    pub soft_expiry_ms: Option<i64>,
    /// How long computing the value took, in ms (0: unknown); stored only
    /// with a soft expiry, for probabilistic early refresh (XFetch).
    pub compute_ms: u32,
    /// The entry's tags, each with the version it had when the entry was
    /// written (validated by the cache: at most 32, 1 to 256 bytes each).
    pub tags: Vec<(String, u64)>,
}

/// No block: what a version-1 entry carries (a static, so that the plain
/// path borrows it rather than building one).
pub static NO_META: Meta = Meta {
    soft_expiry_ms: None,
    compute_ms: 0,
    tags: Vec::new(),
};

impl Meta {
    /// Whether there is nothing to store (the entry stays version 1).
    pub fn is_empty(&self) -> bool {
        self.soft_expiry_ms.is_none() && self.tags.is_empty()
    }

    /// Appends the block to `out`.
    pub(super) fn write(&self, out: &mut Vec<u8>) {
        let flags = if self.soft_expiry_ms.is_some() {
            SOFT
        } else {
            0
        } | if self.tags.is_empty() { 0 } else { TAGS };
        out.push(flags);
        if let Some(at) = self.soft_expiry_ms {
            out.extend_from_slice(&at.to_le_bytes());
            out.extend_from_slice(&self.compute_ms.to_le_bytes());
        }
        if !self.tags.is_empty() {
            // The cache caps tags at 32 of 256 bytes; the clamps only keep
            // a misuse from writing a block that cannot be read back.
            let count = self.tags.len().min(usize::from(u16::MAX));
            out.extend_from_slice(&(count as u16).to_le_bytes());
            for (name, version) in &self.tags[..count] {
                let len = name.len().min(usize::from(u16::MAX));
                out.extend_from_slice(&(len as u16).to_le_bytes());
                out.extend_from_slice(&name.as_bytes()[..len]);
                out.extend_from_slice(&version.to_le_bytes());
            }
        }
    }

    /// Reads a block from the front of `bytes`; the block and its length.
    pub(super) fn read(bytes: &[u8]) -> Result<(Meta, usize), DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let flags = r.take::<1>()?[0];
        if flags & !(SOFT | TAGS) != 0 {
            return Err(DecodeError::Damaged(format!(
                "unknown extension flags {flags:#04x}"
            )));
        }
        let mut meta = Meta::default();
        if flags & SOFT != 0 {
            meta.soft_expiry_ms = Some(i64::from_le_bytes(r.take::<8>()?));
            meta.compute_ms = u32::from_le_bytes(r.take::<4>()?);
        }
        if flags & TAGS != 0 {
            let count = u16::from_le_bytes(r.take::<2>()?);
            // Each tag takes at least 10 bytes, so a damaged count cannot
            // make us reserve more than the block could hold.
            meta.tags = Vec::with_capacity(usize::from(count).min(bytes.len() / 10));
            for _ in 0..count {
                let len = usize::from(u16::from_le_bytes(r.take::<2>()?));
                let name = std::str::from_utf8(r.slice(len)?)
                    .map_err(|_| DecodeError::Damaged("a tag is not UTF-8".into()))?
                    .to_owned();
                meta.tags.push((name, u64::from_le_bytes(r.take::<8>()?)));
            }
        }
        Ok((meta, r.at))
    }
}

/// A cursor over the block that reports a short read as damage.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn slice(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            return Err(DecodeError::Damaged(format!(
                "extension block is cut short at byte {} of {}",
                self.bytes.len(),
                self.at.saturating_add(n)
            )));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.slice(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use flate2::Compression;

    use super::super::{Value, decode, encode, encode_with};
    use super::*;

    fn meta() -> Meta {
        Meta {
            soft_expiry_ms: Some(1_800_000_000_123),
            compute_ms: 42,
            tags: vec![("user:1".into(), u64::MAX), ("é".into(), 7)],
        }
    }

    /// Tags and soft expiry round-trip, compressed or not, alone or together.
    #[test]
    fn version_2_round_trips() {
        let soft_only = Meta {
            tags: Vec::new(),
            ..meta()
        };
        let tags_only = Meta {
            soft_expiry_ms: None,
            compute_ms: 0,
            ..meta()
        };
        for m in [meta(), soft_only, tags_only] {
            for (v, threshold) in [
                (Value::Text("x".repeat(5000)), 10),
                (Value::Raw(Bytes::from_static(b"\x00\xff")), 10),
                (Value::Json("[]".into()), 0),
            ] {
                let e = encode_with(&v, &m, threshold, Compression::fast());
                assert_eq!(e.bytes[1], 2);
                assert_eq!(super::super::declared_len(&e.bytes), Some(v.len()));
                let d = decode(&e.bytes).unwrap();
                assert_eq!((d.value, d.compressed, &d.meta), (v, e.compressed, &m));
            }
        }
        assert!(
            encode_with(
                &Value::Text("x".repeat(5000)),
                &meta(),
                10,
                Compression::fast()
            )
            .compressed
        );
    }

    /// An entry with neither tags nor soft TTL is version 1, byte for byte.
    #[test]
    fn no_meta_is_version_1() {
        for v in [
            Value::Text("y".repeat(3000)),
            Value::Raw(Bytes::from_static(b"ab")),
        ] {
            let plain = encode(&v, 100, Compression::fast());
            let with = encode_with(&v, &Meta::default(), 100, Compression::fast());
            assert_eq!(plain.bytes, with.bytes);
            assert_eq!(plain.bytes[1], 1);
            assert_eq!(decode(&plain.bytes).unwrap().meta, Meta::default());
        }
    }

    /// A damaged block is reported as damage at every cut, never panicked on.
    #[test]
    fn damaged_blocks_are_reported() {
        let e = encode_with(
            &Value::Text("hello".into()),
            &meta(),
            100,
            Compression::fast(),
        );
        let whole = e.bytes.to_vec();
        let payload_at = whole.len() - 5;
        for cut in 8..payload_at {
            let r = decode(&Bytes::copy_from_slice(&whole[..cut]));
            assert!(
                matches!(r, Err(DecodeError::Damaged(_))),
                "cut at {cut}: {r:?}"
            );
        }
        let mut flags = whole.clone();
        flags[8] |= 0x80;
        assert!(matches!(
            decode(&Bytes::from(flags)),
            Err(DecodeError::Damaged(m)) if m.contains("flags")
        ));
        let mut count = whole.clone();
        // flags (1) + soft (12), then the tag count
        count[8 + 13..8 + 15].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            decode(&Bytes::from(count)),
            Err(DecodeError::Damaged(_))
        ));
        let mut utf8 = whole;
        utf8[8 + 15 + 2] = 0xff;
        assert!(matches!(
            decode(&Bytes::from(utf8)),
            Err(DecodeError::Damaged(m)) if m.contains("UTF-8")
        ));
    }
}
