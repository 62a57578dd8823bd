//! The payload of a change on the Redis channel: compact JSON, one short
//! name per field, so that `redis-cli SUBSCRIBE koo:v1:cache:changes` shows
//! something a person can read.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Change, ChangeKind};
use crate::domain::Level;

#[derive(Serialize, Deserialize)]
struct Wire {
    /// Kind: `s`et, `d`elete, `c`lear level, `t`ags, `e`xpired.
    k: char,
    /// Level; absent for tags across every level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l: Option<Level>,
    /// Milliseconds since the Unix epoch, by the publishing koo's clock.
    t: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
}

fn code(kind: ChangeKind) -> char {
    match kind {
        ChangeKind::Set => 's',
        ChangeKind::Delete => 'd',
        ChangeKind::ClearLevel => 'c',
        ChangeKind::Tags => 't',
        ChangeKind::Expired => 'e',
    }
}

fn kind(code: char) -> Option<ChangeKind> {
    Some(match code {
        's' => ChangeKind::Set,
        'd' => ChangeKind::Delete,
        'c' => ChangeKind::ClearLevel,
        't' => ChangeKind::Tags,
        'e' => ChangeKind::Expired,
        _ => return None,
    })
}

/// The payload of `change`.
pub(super) fn encode(change: &Change) -> Vec<u8> {
    let wire = Wire {
        k: code(change.kind),
        l: change.level,
        t: change
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        keys: change.keys.clone(),
        tags: change.tags.clone(),
    };
    // A struct of strings and numbers always serialises.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// The change in a payload; why not, for a payload koo did not write.
pub(super) fn decode(payload: &[u8]) -> Result<Change, String> {
    let wire: Wire = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    Ok(Change {
        kind: kind(wire.k).ok_or_else(|| format!("unknown kind {:?}", wire.k))?,
        level: wire.l,
        keys: wire.keys,
        tags: wire.tags,
        time: UNIX_EPOCH + Duration::from_millis(wire.t),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change survives the round trip, keys with any characters included,
    /// and the payload stays small.
    #[test]
    fn round_trip() {
        let change = Change {
            kind: ChangeKind::Set,
            level: Some(Level::Api),
            keys: vec!["a|b\n\"c".into(), "ü".into()],
            tags: vec![],
            time: UNIX_EPOCH + Duration::from_millis(1_764_000_000_123),
        };
        let bytes = encode(&change);
        assert!(bytes.len() < 80, "{}", String::from_utf8_lossy(&bytes));
        assert_eq!(decode(&bytes).unwrap(), change);
        assert!(decode(b"{\"k\":\"x\",\"t\":1}").is_err());
        assert!(decode(b"nonsense").is_err());
    }
}
