//! What the client prints: the proto3 JSON mapping of any reply (through
//! the descriptor set koo is built with, so `--json` always matches the
//! protos), aligned tables, and short names for enums, times and durations.

use std::sync::OnceLock;

use comfy_table::{Table, presets};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::pb::FILE_DESCRIPTOR_SET;

/// koo's descriptors, decoded once.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET).expect("koo's own descriptor set decodes")
    })
}

/// `message` (of the protobuf type `full_name`) in the proto3 JSON mapping:
/// lowerCamelCase names, enums by name, well-known types as JSON.
pub fn to_json<M: Message>(full_name: &str, message: &M) -> serde_json::Value {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .unwrap_or_else(|| panic!("{full_name} is one of koo's messages"));
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .expect("a message decodes as its own type");
    let mut out = serde_json::Serializer::new(Vec::new());
    dynamic
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .expect("JSON serialization of a decoded message");
    let mut json =
        serde_json::from_slice(&out.into_inner()).expect("serde_json reads its own output");
    integral(&mut json);
    json
}

/// protobuf's `Value` holds every number as a double, so `42` would print
/// as `42.0`; whole numbers that a double holds exactly are written as
/// integers (the same JSON number).
fn integral(json: &mut serde_json::Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    match json {
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
                && n.is_f64()
            {
                *n = serde_json::Number::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integral),
        _ => {}
    }
}

/// Writes one line to standard output. When the reader has gone (a closed
/// pipe) the command ends here with exit code 0: it got what it wanted, and
/// a panic message would be noise; any other write error exits 3.
pub fn line(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    written(out.write_fmt(args).and_then(|()| out.write_all(b"\n")));
}

/// Says on standard error that a listing stopped at its limit with a next
/// page to read (which may still turn out empty): never a silent cut.
pub fn more(shown: usize) {
    eprintln!("(stopped at {shown}: there may be more; --limit N reads further)");
}

/// Writes `bytes` to standard output as they are (a raw cache value),
/// ending the command as [`line`] does when it cannot.
pub fn raw(bytes: &[u8]) {
    use std::io::Write as _;
    written(std::io::stdout().lock().write_all(bytes));
}

/// What a write to standard output did: a closed pipe ends the command with
/// exit code 0, any other error with 3.
fn written(result: std::io::Result<()>) {
    if let Err(e) = result {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("koo: cannot write to standard output: {e}");
        std::process::exit(super::ExitStatus::Rpc as i32);
    }
}

/// Prints `message` as one line of JSON (`--json`).
pub fn print_json<M: Message>(full_name: &str, message: &M) {
    outln!("{}", to_json(full_name, message));
}

/// A table without borders: a header row and aligned columns.
pub fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header.iter().copied());
    for row in rows {
        t.add_row(row);
    }
    // comfy-table pads the first column with a space: trim each line's start
    // for output that starts at column 0, like other CLIs.
    t.lines()
        .map(|l| l.trim_end().strip_prefix(' ').unwrap_or(&l).to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An enum value's name without its prefix, lowercase (`TASK_STATE_RUNNING`
/// with prefix `TASK_STATE_` is `running`).
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A timestamp as RFC 3339 in UTC to the second, or `-`.
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, t.nanos.clamp(0, 999_999_999) as u32)
    })
    .map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// A duration for people (`1m 30s`, `250ms`), or `-`.
pub fn duration(d: Option<&prost_types::Duration>) -> String {
    d.and_then(|d| std::time::Duration::try_from(*d).ok())
        .map_or_else(
            || "-".to_owned(),
            |d| {
                // milliseconds are enough for people
                let d = std::time::Duration::from_millis(d.as_millis() as u64);
                humantime::format_duration(d).to_string()
            },
        )
}

/// A JSON value on one line, strings unquoted (for table cells).
pub fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies come out in the proto3 JSON mapping.
    #[test]
    fn json_mapping() {
        let task = crate::pb::tasks::v1::Task {
            id: "t1".into(),
            state: crate::pb::tasks::v1::TaskState::Running as i32,
            max_retries: 3,
            create_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Default::default()
        };
        let json = to_json("koo.tasks.v1.Task", &task);
        assert_eq!(json["id"], "t1");
        assert_eq!(json["state"], "TASK_STATE_RUNNING");
        assert_eq!(json["maxRetries"], 3);
        assert_eq!(json["createTime"], "1970-01-01T00:00:00Z");
        let value = crate::pb::tasks::v1::Task {
            result: Some(prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(42.0)),
            }),
            ..Default::default()
        };
        assert_eq!(
            to_json("koo.tasks.v1.Task", &value)["result"].to_string(),
            "42"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONG"], [vec!["xyz".into(), "1".into()]]);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("LONG"), lines[1].find('1'));
    }
}
