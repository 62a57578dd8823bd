//! `WatchTasks` resume tokens: where a merged watch stands in each queue.
//!
//! A token is the URL-safe base64 (no padding) of a JSON object mapping each
//! queue name to the position of the last event the watcher received there
//! (a Redis stream id, or the embedded store's sequence number). Clients
//! keep tokens across restarts, so the encoding is part of the API: it does
//! not change.

use std::collections::BTreeMap;

use super::WatchError;

/// Each queue's position, by queue name.
pub type Positions = BTreeMap<String, String>;

/// Decodes a resume token (`""`: no positions, start from now).
pub fn decode(token: &str) -> Result<Positions, WatchError> {
    if token.is_empty() {
        return Ok(BTreeMap::new());
    }
    base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, token)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| WatchError::ResumeToken {
            reason: format!(
                "{} is not a token this server issued",
                crate::quote::quote(token)
            ),
        })
}

/// Encodes `positions` as a resume token.
///
/// Built per event for every watcher, so the common case (queue names and
/// store positions, which need no escaping) is written directly; the
/// output is byte for byte what `serde_json` writes, which other cases use.
pub fn encode(positions: &Positions) -> String {
    fn plain(s: &str) -> bool {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    }
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let json = if positions.iter().all(|(k, v)| plain(k) && plain(v)) {
        let mut json = String::with_capacity(2 + positions.len() * 40);
        json.push('{');
        for (i, (k, v)) in positions.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push('"');
            json.push_str(k);
            json.push_str("\":\"");
            json.push_str(v);
            json.push('"');
        }
        json.push('}');
        json.into_bytes()
    } else {
        serde_json::to_vec(positions).unwrap_or_default()
    };
    let mut token = String::with_capacity(json.len() * 4 / 3 + 4);
    base64::Engine::encode_string(engine, &json, &mut token);
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token is what serde_json writes, base64'd, and decodes back to the
    /// same positions, escaped or not.
    #[test]
    fn tokens_are_what_serde_json_writes_and_decode_back() {
        let mut p = BTreeMap::new();
        for (q, pos) in [
            ("research", "1796435668212-0"),
            ("ai_service", "0-0"),
            ("x.y-z", "42"),
        ] {
            p.insert(q.to_owned(), pos.to_owned());
        }
        let json = serde_json::to_vec(&p).unwrap();
        let expected =
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, json);
        assert_eq!(encode(&p), expected);
        assert_eq!(decode(&encode(&p)).unwrap(), p);
        // a position that needs escaping (kept from a client's token)
        p.insert("q".into(), "a\"b".into());
        assert_eq!(decode(&encode(&p)).unwrap(), p);
    }

    /// No token is no positions; a token koo did not issue is refused,
    /// naming why.
    #[test]
    fn empty_and_foreign_tokens() {
        assert!(decode("").unwrap().is_empty());
        let e = decode("not base64 json!").unwrap_err();
        assert_eq!(
            e.to_string(),
            "resume_token: \"not base64 json!\" is not a token this server issued"
        );
    }
}
