//! The route table: every unary RPC whose proto declares a
//! `google.api.http` rule, read from the compiled descriptor set at start-up,
//! so that a path is declared once (in the proto) and never by hand here.
//!
//! Templates are kept to what axum's router matches itself: literal segments
//! and single-segment variables (`{task_id}`) that name a singular,
//! non-message field of the request. Anything else in a rule (`**`,
//! `{name=foo/*}`, `additional_bindings`, a `body` naming one field,
//! `response_body`, a streaming RPC) is refused when the table is built, so
//! an annotation koo cannot serve fails a unit test rather than a request.

use std::fmt;

use axum::http::Method;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MethodDescriptor, Value,
};

/// The extension that carries the rules (`google/api/annotations.proto`).
const HTTP_RULE: &str = "google.api.http";

/// Where a request's body goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyRule {
    /// No body: every field comes from the path and the query.
    None,
    /// `body: "*"`: the body is the request message (less the path's fields).
    All,
}

/// One REST path of an RPC.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The HTTP verb.
    pub verb: Method,
    /// The path template, e.g. `/api/v1/tasks/status/{task_id}` (axum's
    /// syntax is the same for single-segment variables).
    pub template: String,
    /// The RPC.
    pub method: MethodDescriptor,
    /// Its gRPC path, `/package.Service/Method`.
    pub grpc_path: String,
    /// Where the body goes.
    pub body: BodyRule,
}

/// A `google.api.http` rule koo cannot serve: a mistake in a proto.
#[derive(Debug, thiserror::Error)]
#[error("{method}: google.api.http {why}")]
pub(crate) struct RuleError {
    method: String,
    why: String,
}

/// Every route of `pool`'s services, in proto order.
pub(crate) fn routes(pool: &DescriptorPool) -> Result<Vec<Route>, RuleError> {
    let Some(extension) = pool.get_extension_by_name(HTTP_RULE) else {
        return Ok(Vec::new());
    };
    let mut routes = Vec::new();
    for service in pool.services() {
        for method in service.methods() {
            let options = method.options();
            if !options.has_extension(&extension) {
                continue;
            }
            let rule = options.get_extension(&extension);
            let Some(rule) = rule.as_message() else {
                continue;
            };
            routes.push(route(&method, rule)?);
        }
    }
    Ok(routes)
}

/// The route of one rule.
fn route(method: &MethodDescriptor, rule: &DynamicMessage) -> Result<Route, RuleError> {
    let refuse = |why: String| RuleError {
        method: method.full_name().to_owned(),
        why,
    };
    if method.is_client_streaming() || method.is_server_streaming() {
        return Err(refuse(
            "on a streaming RPC: only unary RPCs are mapped".into(),
        ));
    }
    let text = |name: &str| match rule.get_field_by_name(name).as_deref() {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let verbs = [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ];
    let Some((verb, template)) = verbs
        .into_iter()
        .map(|(name, verb)| (verb, text(name)))
        .find(|(_, template)| !template.is_empty())
    else {
        return Err(refuse(
            "names no get, put, post, delete or patch path".into(),
        ));
    };
    if rule
        .get_field_by_name("additional_bindings")
        .is_some_and(|b| b.as_list().is_some_and(|l| !l.is_empty()))
    {
        return Err(refuse("additional_bindings are not supported".into()));
    }
    if !text("response_body").is_empty() {
        return Err(refuse("response_body is not supported".into()));
    }
    let body = match text("body").as_str() {
        "" => BodyRule::None,
        "*" => BodyRule::All,
        other => {
            return Err(refuse(format!(
                "body {other:?}: only \"*\" or none is supported"
            )));
        }
    };
    check_template(&template, method).map_err(refuse)?;
    Ok(Route {
        verb,
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        template,
        method: method.clone(),
        body,
    })
}

/// `template` is `/literal/.../{field}/...` with each variable a singular
/// scalar field of the request.
fn check_template(template: &str, method: &MethodDescriptor) -> Result<(), String> {
    let Some(rest) = template.strip_prefix('/') else {
        return Err(format!("path {template:?} does not start with /"));
    };
    for segment in rest.split('/') {
        let variable = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
        match variable {
            Some(name) => {
                let field = method.input().get_field_by_name(name).ok_or_else(|| {
                    format!(
                        "path {template:?}: {{{name}}} is not a field of {}",
                        method.input().full_name()
                    )
                })?;
                if !is_scalar(&field) {
                    return Err(format!(
                        "path {template:?}: {{{name}}} is repeated or a message"
                    ));
                }
            }
            None if segment.is_empty() || segment.contains(['{', '}', '*', ':', '=']) => {
                return Err(format!(
                    "path {template:?}: segment {segment:?} is not a literal or a {{field}}"
                ));
            }
            None => {}
        }
    }
    Ok(())
}

/// A field a path segment can carry.
fn is_scalar(field: &FieldDescriptor) -> bool {
    !field.is_list() && !field.is_map() && !matches!(field.kind(), Kind::Message(_))
}

impl fmt::Display for Route {
    /// `GET /api/v1/cache/health -> koo.cache.v1.CacheService.GetHealth`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.verb,
            self.template,
            self.method.full_name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn koo_routes() -> Vec<Route> {
        let pool = super::super::pool().expect("koo's descriptors decode");
        routes(&pool).expect("koo's google.api.http rules are all servable")
    }

    /// The seed's twenty paths and `invalidate-tags`, each once, on unary
    /// RPCs.
    #[test]
    fn the_seeds_twenty_paths() {
        let routes = koo_routes();
        assert_eq!(routes.len(), 21, "{routes:#?}");
        let mut paths: Vec<_> = routes
            .iter()
            .map(|r| format!("{} {}", r.verb, r.template))
            .collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 21);
        let cancel = routes
            .iter()
            .find(|r| r.template == "/api/v1/tasks/cancel/{task_id}")
            .unwrap();
        assert_eq!(cancel.verb, Method::POST);
        assert_eq!(cancel.grpc_path, "/koo.tasks.v1.TaskService/CancelTask");
        assert_eq!(cancel.body, BodyRule::All);
    }

    /// The route table's Markdown row, as docs/rest-curl.md and README.md
    /// write it.
    fn row(r: &Route) -> String {
        let service = r.method.parent_service().name().to_owned();
        let path = if r.template.contains('{') {
            "path, "
        } else {
            ""
        };
        let fields = match r.body {
            BodyRule::All => "JSON body or query",
            BodyRule::None => "query",
        };
        let fields = format!("{path}{fields}");
        format!(
            "| `{}` | `{}` | `{service}.{}` | {fields} |",
            r.verb,
            r.template,
            r.method.name()
        )
    }

    /// The rows of `doc`'s REST route table.
    fn rows_of(doc: &str) -> Vec<&str> {
        doc.lines()
            .filter(|l| l.starts_with("| `") && l.contains("` | `/api/"))
            .collect()
    }

    /// The route tables of the docs are the descriptors' (README.md's once
    /// it has one): a rule added to a proto fails here until documented.
    #[test]
    fn the_documented_tables_match_the_protos() {
        let want: Vec<String> = koo_routes().iter().map(row).collect();
        let doc = include_str!("../../../docs/rest-curl.md");
        assert_eq!(
            rows_of(doc),
            want,
            "docs/rest-curl.md: the table should be\n{}",
            want.join("\n")
        );
        let readme = include_str!("../../../README.md");
        let rows = rows_of(readme);
        assert!(
            rows.is_empty() || rows == want,
            "README.md: the table should be\n{}",
            want.join("\n")
        );
    }

    /// A template variable that names no field is refused, naming it.
    #[test]
    fn a_variable_must_name_a_field() {
        let pool = super::super::pool().unwrap();
        let method = pool
            .get_service_by_name("koo.tasks.v1.TaskService")
            .unwrap()
            .methods()
            .find(|m| m.name() == "GetTask")
            .unwrap();
        let e = check_template("/api/v1/tasks/{id}", &method).unwrap_err();
        assert!(e.contains("{id} is not a field"), "{e}");
        let e = check_template("/api/v1/**", &method).unwrap_err();
        assert!(e.contains("is not a literal"), "{e}");
        assert!(check_template("/api/v1/tasks/status/{task_id}", &method).is_ok());
    }
}
