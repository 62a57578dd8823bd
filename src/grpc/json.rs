//! `google.protobuf.Value` <-> JSON text, for the cache's JSON values and
//! tasks' arguments and results.
//!
//! Numbers must come back exactly as they went in (a cache that alters data
//! is broken): serde_json is built with `float_roundtrip`, so that parsing
//! the text it wrote gives back the same double, bit for bit. Without it,
//! about one double in ten came back different in its last digit.
//!
//! JSON values nest at most [`MAX_DEPTH`] levels of arrays and objects.
//! protobuf decoding stops at 100 nested messages (prost's fixed limit), and
//! each JSON level costs two or three of them (`Value` then `ListValue`, or
//! `Value`, `Struct` and a map entry): a deeper value could be accepted here
//! yet not be readable by a client, so one documented limit applies to every
//! path, and the codec's own refusal of deeper messages names it.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// Most levels of arrays and objects a JSON value may nest.
pub const MAX_DEPTH: usize = 32;

/// Serialises a protobuf `Value` as JSON text. Fails on NaN and infinities,
/// which JSON cannot hold, on a value with no kind set, and on one nested
/// deeper than [`MAX_DEPTH`].
pub fn to_json(value: &Value) -> Result<String, String> {
    let json = to_serde(value)?;
    serde_json::to_string(&json).map_err(|e| e.to_string())
}

/// A protobuf `Value` as a serde JSON value (see [`to_json`]).
pub fn to_serde(value: &Value) -> Result<serde_json::Value, String> {
    to_serde_at(value, 0)
}

/// What is said of a value nested too deeply.
pub fn too_deep() -> String {
    format!("nests deeper than {MAX_DEPTH} levels of arrays and objects (the limit of JSON values)")
}

/// [`to_serde`] for a value inside `depth` arrays and objects.
fn to_serde_at(value: &Value, depth: usize) -> Result<serde_json::Value, String> {
    if depth >= MAX_DEPTH && matches!(value.kind, Some(Kind::ListValue(_) | Kind::StructValue(_))) {
        return Err(too_deep());
    }
    let inner = |v: &Value| to_serde_at(v, depth + 1);
    Ok(match &value.kind {
        None => return Err("a JSON value has no kind set".to_owned()),
        Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("{n} is not a JSON number"))?,
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(inner).collect::<Result<_, _>>()?)
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), inner(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// Parses JSON text into a protobuf `Value`.
pub fn from_json(text: &str) -> Result<Value, String> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(from_serde(json))
}

/// A serde JSON value as a protobuf `Value`.
pub fn from_serde(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(from_serde).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.into_iter().map(|(k, v)| (k, from_serde(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nested values round-trip through JSON text.
    #[test]
    fn round_trip() {
        let text = r#"{"a":[1.5,true,null,"x"],"b":{"c":-2.0}}"#;
        let v = from_json(text).unwrap();
        let back: serde_json::Value = serde_json::from_str(&to_json(&v).unwrap()).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(text).unwrap()
        );
    }

    /// Doubles come back bit for bit through JSON text, including the ones
    /// serde_json's default parser got wrong in the last digit.
    #[test]
    fn doubles_round_trip() {
        for f in [
            0.424_519_189_142_513_96,
            123_456_789.123_456_79,
            5e-324,
            -0.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            9_007_199_254_740_993.0,
        ] {
            let v = Value {
                kind: Some(Kind::NumberValue(f)),
            };
            let back = from_json(&to_json(&v).unwrap()).unwrap();
            assert_eq!(back.kind, Some(Kind::NumberValue(f)), "{f:e}");
            let Some(Kind::NumberValue(g)) = back.kind else {
                unreachable!()
            };
            assert_eq!(g.to_bits(), f.to_bits(), "{f:e}");
        }
    }

    /// A value nested MAX_DEPTH levels is fine, one more is refused.
    #[test]
    fn depth_limit() {
        let nest = |n: usize| {
            let mut v = Value {
                kind: Some(Kind::BoolValue(true)),
            };
            for _ in 0..n {
                v = Value {
                    kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
                };
            }
            v
        };
        assert!(to_json(&nest(MAX_DEPTH)).is_ok());
        assert_eq!(to_json(&nest(MAX_DEPTH + 1)), Err(too_deep()));
    }

    /// Values JSON cannot represent are refused.
    #[test]
    fn refuses_nan_and_empty() {
        let nan = Value {
            kind: Some(Kind::NumberValue(f64::NAN)),
        };
        assert!(to_json(&nan).is_err());
        assert!(to_json(&Value { kind: None }).is_err());
    }
}
