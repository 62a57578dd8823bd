//! `google.protobuf.Value` <-> JSON text, for the cache's JSON values.

use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

/// Serialises a protobuf `Value` as JSON text. Fails on NaN and infinities,
/// which JSON cannot hold, and on a value with no kind set.
pub fn to_json(value: &Value) -> Result<String, String> {
    let json = to_serde(value)?;
    serde_json::to_string(&json).map_err(|e| e.to_string())
}

/// A protobuf `Value` as a serde JSON value (see [`to_json`]).
pub fn to_serde(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match &value.kind {
        None => return Err("a JSON value has no kind set".to_owned()),
        Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("{n} is not a JSON number"))?,
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(to_serde).collect::<Result<_, _>>()?)
        }
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_serde(v)?)))
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
