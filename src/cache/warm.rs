//! The warm file: critical entries to preload, one JSON object per line.
//!
//! ```text
//! # comments and blank lines are skipped
//! {"level": "app", "key": "greeting", "text": "hello", "ttl": "10m"}
//! {"level": "db", "key": "user:1", "json": {"name": "Ada"}, "ttl": 3600}
//! {"key": "logo", "base64": "iVBORw0KGgo=", "ttl": "1.5s"}
//! {"key": "home", "text": "<html>", "ttl": "1h", "soft_ttl": "10m", "tags": ["page", "user:1"]}
//! {"level": "api", "key": "rates", "task": {"name": "app.fetch_rates", "category": "research"}}
//! ```
//!
//! Each line names a `key`, exactly one of `text`, `json`, `base64` or
//! `task`, and optionally a `level` (default `app`) and a `ttl` (seconds as a
//! number, or a duration such as `"90s"`, `"10m"`, `"1h 30m"`; default: the
//! level's). A value line may carry `tags` (strings, for `InvalidateTags`)
//! and a `soft_ttl` (a duration, shorter than the TTL). A `task` line computes its value: the warm-up submits that task
//! (`name`, `category`, and optionally `args`, `kwargs`, `queue`,
//! `priority`), and its result is cached under the key when it succeeds.
//! The file is re-read on every warm-up, so edits take effect without a restart.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use tokio::io::AsyncBufReadExt;

use super::{Level, NewEntry, Value};
use crate::quote::quote;

/// One line's outcome: the entry, or what is wrong with it.
pub type ParsedLine = (u64, Result<WarmLine, String>);

/// One line of a warm file.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmLine {
    /// A value to write.
    Entry(NewEntry),
    /// A value to compute with a task, cached under the key on success.
    Task {
        /// Its level.
        level: Level,
        /// Its key.
        key: String,
        /// Its TTL; `None` means the level's default.
        ttl: Option<Duration>,
        /// The task: `name`, `category`, and optionally `args`, `kwargs`,
        /// `queue`, `priority`.
        task: serde_json::Map<String, serde_json::Value>,
    },
}

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
pub fn parse_line(line: &str) -> Result<WarmLine, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err("expected a JSON object".to_owned());
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field {} (expected {})",
            quote(unknown),
            FIELDS.join(", ")
        ));
    }
    let tags = line_tags(obj.remove("tags"))?;
    let soft_ttl = obj.remove("soft_ttl").map(|t| parse_ttl(&t)).transpose()?;
    if obj.contains_key("task") && (!tags.is_empty() || soft_ttl.is_some()) {
        return Err("tags and soft_ttl apply to value lines, not task lines".to_owned());
    }
    let level = line_level(obj.remove("level"))?;
    let key = match obj.remove("key") {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => {
            return Err(format!(
                "key must be a string, not {}",
                crate::quote::json(&other)
            ));
        }
        None => return Err("key is missing".to_owned()),
    };
    let ttl = obj.remove("ttl").map(|t| parse_ttl(&t)).transpose()?;
    if let Some(task) = obj.remove("task") {
        return task_line(&obj, task, level, key, ttl);
    }
    Ok(WarmLine::Entry(NewEntry {
        level,
        key,
        value: line_value(&mut obj)?,
        ttl,
        tags,
        soft_ttl,
    }))
}

/// The fields a line may have.
const FIELDS: [&str; 9] = [
    "level", "key", "text", "json", "base64", "task", "ttl", "soft_ttl", "tags",
];

/// A line's tags (none when absent); the cache validates them.
fn line_tags(raw: Option<serde_json::Value>) -> Result<Vec<String>, String> {
    let bad = |v: &serde_json::Value| {
        format!(
            "tags must be a list of strings, not {}",
            crate::quote::json(v)
        )
    };
    match raw {
        None => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .map(|t| match t {
                serde_json::Value::String(s) => Ok(s),
                other => Err(bad(&other)),
            })
            .collect(),
        Some(other) => Err(bad(&other)),
    }
}

/// A line's level (`app` when absent).
fn line_level(raw: Option<serde_json::Value>) -> Result<Level, String> {
    match raw {
        None => Ok(Level::App),
        Some(serde_json::Value::String(s)) => Level::parse(&s)
            .ok_or_else(|| format!("level {} is not one of app, db, api, session", quote(&s))),
        Some(other) => Err(format!(
            "level must be a string, not {}",
            crate::quote::json(&other)
        )),
    }
}

/// A `task` line (`rest`: its other fields, which must give no value).
fn task_line(
    rest: &serde_json::Map<String, serde_json::Value>,
    task: serde_json::Value,
    level: Level,
    key: String,
    ttl: Option<Duration>,
) -> Result<WarmLine, String> {
    if rest
        .keys()
        .any(|k| ["text", "json", "base64"].contains(&k.as_str()))
    {
        return Err("a task line computes its value: no text, json or base64".to_owned());
    }
    let serde_json::Value::Object(task) = task else {
        return Err("task must be an object with name and category".to_owned());
    };
    if !task.get("name").is_some_and(serde_json::Value::is_string) {
        return Err("task.name is missing".to_owned());
    }
    Ok(WarmLine::Task {
        level,
        key,
        ttl,
        task,
    })
}

/// A line's value: exactly one of `text`, `json` or `base64`.
fn line_value(obj: &mut serde_json::Map<String, serde_json::Value>) -> Result<Value, String> {
    let mut values = Vec::new();
    if let Some(t) = obj.remove("text") {
        match t {
            serde_json::Value::String(s) => values.push(Value::Text(s)),
            other => {
                return Err(format!(
                    "text must be a string, not {}",
                    crate::quote::json(&other)
                ));
            }
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
    match values.len() {
        1 => Ok(values.pop().expect("one value")),
        0 => Err("one of text, json, base64 or task is required".to_owned()),
        _ => Err("only one of text, json or base64 may be given".to_owned()),
    }
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
    if let Some(soft) = e.soft_ttl {
        line.insert("soft_ttl".into(), format!("{}ms", soft.as_millis()).into());
    }
    if !e.tags.is_empty() {
        line.insert("tags".into(), e.tags.clone().into());
    }
    serde_json::Value::Object(line)
}

fn parse_ttl(v: &serde_json::Value) -> Result<Duration, String> {
    let bad = || {
        format!(
            "ttl {} is not a positive duration (seconds, or e.g. \"90s\", \"10m\")",
            crate::quote::json(v)
        )
    };
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

    fn entry(line: &str) -> NewEntry {
        match parse_line(line).unwrap() {
            WarmLine::Entry(e) => e,
            other => panic!("{other:?}"),
        }
    }

    /// A task line keeps its task for the warm-up to submit.
    #[test]
    fn parses_task_lines() {
        let line = r#"{"level":"api","key":"rates","ttl":"10m","task":{"name":"app.rates","category":"research"}}"#;
        let WarmLine::Task {
            level,
            key,
            ttl,
            task,
        } = parse_line(line).unwrap()
        else {
            panic!("a task line")
        };
        assert_eq!(
            (level, key.as_str(), ttl),
            (Level::Api, "rates", Some(Duration::from_secs(600)))
        );
        assert_eq!(task["name"], "app.rates");
    }

    /// Every value form and TTL spelling parses.
    #[test]
    fn parses_good_lines() {
        let e = entry(r#"{"level":"db","key":"k","json":{"a":1},"ttl":"1.5s"}"#);
        assert_eq!(e.level, Level::Db);
        assert_eq!(e.value, Value::Json(r#"{"a":1}"#.into()));
        assert_eq!(e.ttl, Some(Duration::from_millis(1500)));
        let e = entry(r#"{"key":"k","base64":"AAH/","ttl":90}"#);
        assert_eq!(e.level, Level::App);
        assert_eq!(e.value, Value::Raw(Bytes::from_static(&[0, 1, 255])));
        assert_eq!(e.ttl, Some(Duration::from_secs(90)));
        let e = entry(r#"{"key":"k","text":"hi","ttl":"1h 30m"}"#);
        assert_eq!(e.ttl, Some(Duration::from_secs(5400)));
        let e = entry(r#"{"key":"k","json":null}"#);
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
                tags: vec!["t".into(), "é".into()],
                soft_ttl: Some(Duration::from_millis(500)),
            };
            assert_eq!(entry(&to_line(&e).to_string()), e);
        }
    }

    /// Bad lines say what is wrong.
    #[test]
    fn explains_bad_lines() {
        for (line, expect) in [
            ("{", "not valid JSON"),
            ("[1]", "expected a JSON object"),
            (r#"{"key":"k"}"#, "one of text, json, base64 or task"),
            (
                r#"{"key":"k","task":{"category":"cache"}}"#,
                "task.name is missing",
            ),
            (
                r#"{"key":"k","text":"a","task":{"name":"t"}}"#,
                "no text, json or base64",
            ),
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
