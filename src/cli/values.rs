//! Values typed on the command line: JSON text into protobuf values
//! (`--kwargs '{"query":"x"}'`), through the same proto3 JSON mapping the
//! output uses. Each parser is a clap value parser, so bad input is a usage
//! error (exit 2) naming the argument.

use prost::Message;
use prost_reflect::DynamicMessage;

use super::output::pool;

/// JSON text into the well-known type `full_name` (`google.protobuf.Value`,
/// `Struct`, `ListValue`).
fn from_json<M: Message + Default>(full_name: &str, json: &serde_json::Value) -> Result<M, String> {
    let descriptor = pool()
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("{full_name} is not in koo's descriptors"))?;
    let dynamic = DynamicMessage::deserialize(descriptor, json).map_err(|e| e.to_string())?;
    dynamic.transcode_to::<M>().map_err(|e| e.to_string())
}

fn parse(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))
}

/// Any JSON value (`42`, `"text"`, `{"a":1}`).
pub fn json_value(text: &str) -> Result<prost_types::Value, String> {
    from_json("google.protobuf.Value", &parse(text)?)
}

/// A JSON object (keyword arguments).
pub fn json_object(text: &str) -> Result<prost_types::Struct, String> {
    let value = parse(text)?;
    if !value.is_object() {
        return Err("must be a JSON object, e.g. '{\"query\":\"x\"}'".to_owned());
    }
    from_json("google.protobuf.Struct", &value)
}

/// A JSON array (positional arguments).
pub fn json_array(text: &str) -> Result<Vec<prost_types::Value>, String> {
    let value = parse(text)?;
    if !value.is_array() {
        return Err("must be a JSON array, e.g. '[1, \"two\"]'".to_owned());
    }
    Ok(from_json::<prost_types::ListValue>("google.protobuf.ListValue", &value)?.values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let kwargs = json_object(r#"{"query":"x","n":2}"#).unwrap();
        assert_eq!(kwargs.fields.len(), 2);
        assert_eq!(json_array("[1, 2, 3]").unwrap().len(), 3);
        assert!(json_object("[1]").unwrap_err().contains("object"));
        assert!(json_object("{nope").unwrap_err().contains("not JSON"));
        assert!(json_value("\"s\"").is_ok());
    }
}
