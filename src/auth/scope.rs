//! Worker key scopes: a key with `queues` or `task_names` may serve only
//! those, so a PDF worker's key cannot lease AI tasks. A declaration outside
//! the scope is refused (naming what is outside); one that leaves a kind
//! open ("every queue", "every name") is narrowed to the scope's.

use super::{AuthError, Caller};

/// What a worker declared it serves (`Work`'s hello, `LeaseTask`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// Queues (empty: every queue).
    pub queues: Vec<String>,
    /// Task names (empty: every name).
    pub task_names: Vec<String>,
}

/// `declared`, checked against `caller`'s scope and narrowed to it; `at`
/// prefixes the field names of refusals (e.g. `hello.`).
pub fn narrow(caller: &Caller, at: &str, declared: Declared) -> Result<Declared, AuthError> {
    let scope = &caller.scope;
    let queues = within(caller, at, "queues", declared.queues, &scope.queues)?;
    let task_names = within(
        caller,
        at,
        "task_names",
        declared.task_names,
        &scope.task_names,
    )?;
    Ok(Declared { queues, task_names })
}

/// One kind of declaration within one kind of scope (an empty scope: no
/// bound).
fn within(
    caller: &Caller,
    at: &str,
    field: &str,
    declared: Vec<String>,
    scope: &[String],
) -> Result<Vec<String>, AuthError> {
    if scope.is_empty() {
        return Ok(declared);
    }
    if declared.is_empty() {
        return Ok(scope.to_vec());
    }
    if let Some((i, outside)) = declared
        .iter()
        .enumerate()
        .find(|(_, d)| !scope.contains(d))
    {
        return Err(AuthError::OutOfScope {
            field: format!("{at}{field}[{i}]"),
            value: crate::quote::quote(outside).to_string(),
            principal: caller.principal.clone(),
            allowed: format!("{field} {}", scope.join(", ")),
        });
    }
    Ok(declared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Role, Scope};

    fn pdf() -> Caller {
        Caller {
            principal: "pdf-worker".into(),
            role: Some(Role::Worker),
            scope: Scope {
                queues: vec!["pdf".into()],
                task_names: vec![],
            },
            max_held: None,
        }
    }

    fn decl(queues: &[&str], names: &[&str]) -> Declared {
        Declared {
            queues: queues.iter().map(|s| s.to_string()).collect(),
            task_names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// In scope passes, "every queue" narrows, outside is refused naming the
    /// field and value; an unscoped caller passes as declared.
    #[test]
    fn narrows_and_refuses() {
        assert_eq!(
            narrow(&pdf(), "", decl(&["pdf"], &["x"])).unwrap(),
            decl(&["pdf"], &["x"])
        );
        assert_eq!(
            narrow(&pdf(), "", decl(&[], &["x"])).unwrap(),
            decl(&["pdf"], &["x"])
        );
        let err = narrow(&pdf(), "hello.", decl(&["pdf", "ai"], &[])).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("hello.queues[1]: \"ai\" is outside"),
            "{msg}"
        );
        let open = Caller::anonymous();
        assert_eq!(
            narrow(&open, "", decl(&[], &["x"])).unwrap(),
            decl(&[], &["x"])
        );
    }
}
