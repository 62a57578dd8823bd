//! JSON and URLs to request messages, reply messages to JSON: the proto3
//! JSON mapping (prost-reflect's), field by field so that an error names
//! the field it is about.
//!
//! A request message is assembled from its body (under `body: "*"`), then
//! its query parameters, then its path variables, each later source
//! overriding an earlier one. Field names may be the proto names
//! (`hours_old`) or their JSON names (`hoursOld`). Query parameters are
//! accepted on every route, a body rule or not: the seed's clients put
//! arguments in the query of POSTs too.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage as _, SerializeOptions,
};

use super::error::RestError;
use super::routes::{BodyRule, Route};
use crate::quote::quote;

/// Where a field's value came from, for messages.
#[derive(Debug, Clone, Copy)]
enum Source {
    Body,
    Query,
    Path,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Self::Body => "the body's field",
            Self::Query => "query parameter",
            Self::Path => "path variable",
        }
    }
}

/// The request message of `route` from its path variables, query string
/// and body.
pub(crate) fn request(
    route: &Route,
    path: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, RestError> {
    let desc = route.method.input();
    let mut message = DynamicMessage::new(desc.clone());
    if !body.iter().all(u8::is_ascii_whitespace) {
        if route.body == BodyRule::None {
            return Err(RestError::bad_request(format!(
                "{} {} takes no body (its fields go in the query)",
                route.verb, route.template
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            RestError::bad_request(format!(
                "the body is not JSON ({e}): {}",
                crate::quote::quote_bytes(body)
            ))
        })?;
        let serde_json::Value::Object(fields) = json else {
            return Err(RestError::bad_request(format!(
                "the body must be a JSON object (the fields of {}), not {}",
                desc.name(),
                quote(&json.to_string())
            )));
        };
        for (name, value) in fields {
            set(&mut message, Source::Body, &name, value)?;
        }
    }
    for (name, values) in query_fields(query)? {
        let field = field(&desc, Source::Query, &name)?;
        let value = query_value(&field, values);
        set(&mut message, Source::Query, &name, value)?;
    }
    for (name, value) in path {
        let field = field(&desc, Source::Path, name)?;
        let value = query_value(&field, vec![value.clone()]);
        set(&mut message, Source::Path, name, value)?;
    }
    Ok(message)
}

/// The query's parameters, grouped by name in order of first appearance
/// (a repeated field takes `?k=a&k=b`). A name or value that is not UTF-8
/// once percent-decoded is refused: decoded lossily, `%C0` and `%FF` would
/// both read U+FFFD, and a request could act on a key it never named.
fn query_fields(query: Option<&str>) -> Result<Vec<(String, Vec<String>)>, RestError> {
    let mut fields: Vec<(String, Vec<String>)> = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_component(raw_name, raw_name)?;
        let v = decode_component(raw_value, raw_name)?;
        match fields.iter_mut().find(|(name, _)| *name == k) {
            Some((_, values)) => values.push(v),
            None => fields.push((k, vec![v])),
        }
    }
    Ok(fields)
}

/// One `application/x-www-form-urlencoded` component (`+` is a space),
/// percent-decoded strictly (`crate::percent`), as UTF-8; `name` is its
/// parameter's raw name, for the message.
fn decode_component(raw: &str, name: &str) -> Result<String, RestError> {
    crate::percent::decode(&raw.replace('+', " ")).ok_or_else(|| {
        RestError::bad_request(format!(
            "query parameter {}: {} holds a malformed %-escape or is not UTF-8 once decoded",
            quote(name),
            quote(raw)
        ))
    })
}

/// The field `name` (a proto or JSON name) of `desc`.
fn field(
    desc: &MessageDescriptor,
    source: Source,
    name: &str,
) -> Result<FieldDescriptor, RestError> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
        .ok_or_else(|| {
            let known: Vec<_> = desc.fields().map(|f| f.name().to_owned()).collect();
            RestError::bad_request(format!(
                "unknown {} {}: {} has {}",
                source.name(),
                quote(name),
                desc.name(),
                if known.is_empty() {
                    "no fields".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
}

/// A URL's text as the JSON the field's type reads: numbers and booleans
/// unquoted when they parse as such (else left as text, for the field's own
/// error), an array for a repeated field.
fn query_value(field: &FieldDescriptor, values: Vec<String>) -> serde_json::Value {
    let one = |text: String| -> serde_json::Value {
        let numeric = matches!(
            field.kind(),
            Kind::Int32
                | Kind::Sint32
                | Kind::Sfixed32
                | Kind::Uint32
                | Kind::Fixed32
                | Kind::Float
                | Kind::Double
                | Kind::Enum(_)
        );
        match field.kind() {
            Kind::Bool if text == "true" || text == "false" => {
                serde_json::Value::Bool(text == "true")
            }
            _ if numeric => text
                .parse::<serde_json::Number>()
                .map_or(serde_json::Value::String(text), serde_json::Value::Number),
            _ => serde_json::Value::String(text),
        }
    };
    if field.is_list() {
        serde_json::Value::Array(values.into_iter().map(one).collect())
    } else {
        // the last of repeated parameters wins, as in a JSON object
        values
            .into_iter()
            .last()
            .map_or(serde_json::Value::Null, one)
    }
}

/// Sets the field `name` of `message` from `value`, or says what is wrong
/// with it, naming it.
fn set(
    message: &mut DynamicMessage,
    source: Source,
    name: &str,
    value: serde_json::Value,
) -> Result<(), RestError> {
    let desc = message.descriptor();
    field(&desc, source, name)?;
    let quoted = value.to_string();
    let one = serde_json::Value::Object([(name.to_owned(), value)].into_iter().collect());
    let part = DynamicMessage::deserialize_with_options(
        desc,
        one,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| {
        RestError::bad_request(format!(
            "{} {}: {} (got {})",
            source.name(),
            quote(name),
            bounded(&e.to_string()),
            quote(&quoted)
        ))
    })?;
    for (field, value) in part.fields() {
        message.set_field(&field, value.clone());
    }
    Ok(())
}

/// The most bytes of a parser's message an error keeps: serde's
/// messages quote the input they refuse (`invalid type: string "…"`), whole.
const MAX_PARSER_MESSAGE: usize = 160;

/// `message` cut to [`MAX_PARSER_MESSAGE`] bytes.
fn bounded(message: &str) -> String {
    crate::quote::clip(message, MAX_PARSER_MESSAGE).into_owned()
}

/// `message` as one gRPC length-prefixed message (uncompressed).
pub(crate) fn grpc_frame(message: &DynamicMessage) -> Bytes {
    let len = message.encoded_len();
    let mut frame = BytesMut::with_capacity(5 + len);
    frame.put_u8(0);
    // a message over 4 GiB cannot pass the body limit before this
    frame.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    message
        .encode(&mut frame)
        .expect("BytesMut grows to fit the message");
    frame.freeze()
}

/// The message of a unary reply's body: one length-prefixed message.
pub(crate) fn reply_message(
    desc: MessageDescriptor,
    mut body: Bytes,
) -> Result<DynamicMessage, String> {
    if body.len() < 5 {
        return Err(format!("a reply of {} bytes has no message", body.len()));
    }
    if body[0] != 0 {
        return Err("the reply is compressed, though none was offered".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let payload = body.split_off(5);
    if payload.len() != len {
        return Err(format!(
            "the reply's length prefix says {len} bytes, {} came",
            payload.len()
        ));
    }
    DynamicMessage::decode(desc, payload).map_err(|e| format!("the reply does not decode: {e}"))
}

/// How replies are written: the proto names (`task_id`, as the seed's
/// Python API wrote them, and as the query takes them), every field even at
/// its default (a JavaScript client reads `false` and `0`, not a missing
/// key), 64-bit integers as strings (the proto3 JSON mapping's rule, since
/// JavaScript numbers lose digits past 2^53).
pub(crate) fn json_options() -> SerializeOptions {
    SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
}

/// `message` as JSON.
pub(crate) fn to_json(message: &DynamicMessage) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = serde_json::Serializer::new(Vec::new());
    message.serialize_with_options(&mut out, &json_options())?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::pool;
    use super::super::routes::routes;
    use super::*;

    fn route(template: &str) -> Route {
        routes(&pool().unwrap())
            .unwrap()
            .into_iter()
            .find(|r| r.template == template)
            .unwrap()
    }

    /// Path, query and body fill one message; JSON names work too.
    #[test]
    fn path_query_and_body() {
        let r = route("/api/v1/tasks/cancel/{task_id}");
        let m = request(
            &r,
            &[("task_id".into(), "abc".into())],
            None,
            br#"{"reason": "no longer needed"}"#,
        )
        .unwrap();
        let json = String::from_utf8(to_json(&m).unwrap()).unwrap();
        assert_eq!(json, r#"{"task_id":"abc","reason":"no longer needed"}"#);
        let r = route("/api/v1/tasks/cleanup");
        let m = request(&r, &[], Some("hours_old=24&includeDeadLetters=true"), b"").unwrap();
        let json = String::from_utf8(to_json(&m).unwrap()).unwrap();
        assert_eq!(json, r#"{"include_dead_letters":true,"hours_old":24}"#);
    }

    /// Every error names the field and quotes the input, bounded.
    #[test]
    fn errors_name_the_field() {
        let r = route("/api/v1/tasks/cleanup");
        let e = request(&r, &[], Some("hours_old=lots"), b"").unwrap_err();
        assert!(e.message.contains("query parameter \"hours_old\""), "{e:?}");
        assert!(e.message.contains("lots"), "{e:?}");
        let e = request(&r, &[], Some("days_old=1"), b"").unwrap_err();
        assert!(
            e.message.contains("unknown query parameter \"days_old\""),
            "{e:?}"
        );
        let r = route("/api/v1/tasks/submit");
        let e = request(&r, &[], None, br#"{"name": 5}"#).unwrap_err();
        assert!(e.message.contains("the body's field \"name\""), "{e:?}");
        let long = format!("{{\"name\": \"{}", "x".repeat(10_000));
        let e = request(&r, &[], None, long.as_bytes()).unwrap_err();
        assert!(e.message.contains("not JSON"), "{e:?}");
        assert!(e.message.len() < 400, "{e:?}");
        let e = request(
            &r,
            &[],
            None,
            format!("{{\"kwargs\": \"{}\"}}", "y".repeat(10_000)).as_bytes(),
        )
        .unwrap_err();
        assert!(e.message.contains("the body's field \"kwargs\""), "{e:?}");
        assert!(e.message.len() < 400, "{e:?}");
        let e = request(&r, &[], None, b"[1]").unwrap_err();
        assert!(e.message.contains("must be a JSON object"), "{e:?}");
    }

    /// A reply frame decodes back.
    #[test]
    fn frames_round_trip() {
        let r = route("/api/v1/tasks/status/{task_id}");
        let m = request(&r, &[("task_id".into(), "t1".into())], None, b"").unwrap();
        let frame = grpc_frame(&m);
        let back = reply_message(r.method.input(), frame.clone()).unwrap();
        assert_eq!(back, m);
        assert!(reply_message(r.method.input(), frame.slice(..3)).is_err());
    }
}
