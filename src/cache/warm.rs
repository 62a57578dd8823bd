//! The warm file: critical entries to preload, one JSON object per line.
//!
//! ```text
//! # comments and blank lines are skipped
//! {"level": "app", "key": "greeting", "text": "hello", "ttl": "10m"}
//! {"level": "db", "key": "user:1", "json": {"name": "Ada"}, "ttl": 3600}
//! {"key": "logo", "base64": "iVBORw0KGgo=", "ttl": "1.5s"}
//! ```
//!
//! Each line names a `key`, exactly one of `text`, `json` or `base64`, and
//! optionally a `level` (default `app`) and a `ttl` (seconds as a number, or a
//! duration such as `"90s"`, `"10m"`, `"1h 30m"`; default: the level's).
//! The file is re-read on every warm-up, so edits take effect without a restart.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use tokio::io::AsyncBufReadExt;

use super::{Level, NewEntry, Value};

/// One line's outcome: the entry, or what is wrong with it.
pub type ParsedLine = (u64, Result<NewEntry, String>);

/// Reads a warm file. Fails only when the file cannot be read at all; a bad
/// line is reported with its (1-based) number.
pub async fn read(path: &Path) -> std::io::Result<Vec<ParsedLine>> {
    let file = tokio::fs::File::open(path).await?;
    let mut lines = tokio::io::BufReader::new(file).split(b'\n');
    let mut out = Vec::new();
    let mut number = 0;
    while let Some(raw) = lines.next_segment().await? {
        number += 1;
        let line = match std::str::from_utf8(&raw) {
            Ok(l) => l.trim(),
            Err(_) => {
                out.push((number, Err("line is not UTF-8".to_owned())));
                continue;
            }
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push((number, parse_line(line)));
    }
    Ok(out)
}

/// Parses one line.
pub fn parse_line(line: &str) -> Result<NewEntry, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err("expected a JSON object".to_owned());
    };
    if let Some(unknown) = obj
        .keys()
        .find(|k| !["level", "key", "text", "json", "base64", "ttl"].contains(&k.as_str()))
    {
        return Err(format!(
            "unknown field {unknown:?} (expected level, key, text, json, base64, ttl)"
        ));
    }
    let level = match obj.remove("level") {
        None => Level::App,
        Some(serde_json::Value::String(s)) => Level::parse(&s)
            .ok_or_else(|| format!("level {s:?} is not one of app, db, api, session"))?,
        Some(other) => return Err(format!("level must be a string, not {other}")),
    };
    let key = match obj.remove("key") {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => return Err(format!("key must be a string, not {other}")),
        None => return Err("key is missing".to_owned()),
    };
    let ttl = obj.remove("ttl").map(|t| parse_ttl(&t)).transpose()?;
    let mut values = Vec::new();
    if let Some(t) = obj.remove("text") {
        match t {
            serde_json::Value::String(s) => values.push(Value::Text(s)),
            other => return Err(format!("text must be a string, not {other}")),
        }
    }
    if let Some(j) = obj.remove("json") {
        values.push(Value::Json(j.to_string()));
    }
    if let Some(b) = obj.remove("base64") {
        let serde_json::Value::String(s) = b else {
            return Err("base64 must be a string".to_owned());
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|e| format!("base64 is not valid base64: {e}"))?;
        values.push(Value::Raw(Bytes::from(bytes)));
    }
    let value = match values.len() {
        1 => values.pop().expect("one value"),
        0 => return Err("one of text, json or base64 is required".to_owned()),
        _ => return Err("only one of text, json or base64 may be given".to_owned()),
    };
    Ok(NewEntry {
        level,
        key,
        value,
        ttl,
    })
}

/// The warm-file line of an entry: how a `Warm` call's entries travel to
/// the warm task (in its arguments), parsed back with [`parse_line`].
pub fn to_line(e: &NewEntry) -> serde_json::Value {
    let mut line = serde_json::Map::new();
    line.insert("level".into(), e.level.as_str().into());
    line.insert("key".into(), e.key.clone().into());
    match &e.value {
        Value::Text(t) => line.insert("text".into(), t.clone().into()),
        Value::Json(j) => line.insert(
            "json".into(),
            serde_json::from_str(j).unwrap_or(serde_json::Value::Null),
        ),
        Value::Raw(b) => line.insert(
            "base64".into(),
            base64::engine::general_purpose::STANDARD.encode(b).into(),
        ),
    };
    if let Some(ttl) = e.ttl {
        line.insert("ttl".into(), format!("{}ms", ttl.as_millis()).into());
    }
    serde_json::Value::Object(line)
}

fn parse_ttl(v: &serde_json::Value) -> Result<Duration, String> {
    let bad = || format!("ttl {v} is not a positive duration (seconds, or e.g. \"90s\", \"10m\")");
    match v {
        serde_json::Value::Number(n) => {
            let secs = n.as_f64().ok_or_else(bad)?;
            Duration::try_from_secs_f64(secs).map_err(|_| bad())
        }
        serde_json::Value::String(s) => {
            let s = s.trim();
            if let Some(Ok(secs)) = s.strip_suffix('s').map(str::parse::<f64>) {
                return Duration::try_from_secs_f64(secs).map_err(|_| bad());
            }
            humantime::parse_duration(s).map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value form and TTL spelling parses.
    #[test]
    fn parses_good_lines() {
        let e = parse_line(r#"{"level":"db","key":"k","json":{"a":1},"ttl":"1.5s"}"#).unwrap();
        assert_eq!(e.level, Level::Db);
        assert_eq!(e.value, Value::Json(r#"{"a":1}"#.into()));
        assert_eq!(e.ttl, Some(Duration::from_millis(1500)));
        let e = parse_line(r#"{"key":"k","base64":"AAH/","ttl":90}"#).unwrap();
        assert_eq!(e.level, Level::App);
        assert_eq!(e.value, Value::Raw(Bytes::from_static(&[0, 1, 255])));
        assert_eq!(e.ttl, Some(Duration::from_secs(90)));
        let e = parse_line(r#"{"key":"k","text":"hi","ttl":"1h 30m"}"#).unwrap();
        assert_eq!(e.ttl, Some(Duration::from_secs(5400)));
        let e = parse_line(r#"{"key":"k","json":null}"#).unwrap();
        assert_eq!(e.value, Value::Json("null".into()));
    }

    /// An entry survives the trip through its line, whatever its value.
    #[test]
    fn lines_round_trip() {
        for value in [
            Value::Text("héllo".into()),
            Value::Json(r#"{"a":[1,2]}"#.into()),
            Value::Raw(Bytes::from_static(&[0, 159, 255])),
        ] {
            let e = NewEntry {
                level: Level::Session,
                key: "k:1".into(),
                value,
                ttl: Some(Duration::from_millis(1500)),
            };
            assert_eq!(parse_line(&to_line(&e).to_string()).unwrap(), e);
        }
    }

    /// Bad lines say what is wrong.
    #[test]
    fn explains_bad_lines() {
        for (line, expect) in [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            (r#"{"key":"k"}"#, "one of text, json or base64"),
            (r#"{"key":"k","text":"a","json":1}"#, "only one of"),
            (r#"{"text":"a"}"#, "key is missing"),
            (r#"{"key":"k","text":"a","level":"disk"}"#, "level \"disk\""),
            (r#"{"key":"k","text":"a","ttl":-1}"#, "ttl -1"),
            (r#"{"key":"k","text":"a","tll":1}"#, "unknown field \"tll\""),
            (r#"{"key":"k","base64":"***"}"#, "not valid base64"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(expect), "{line}: {err}");
        }
    }
}
