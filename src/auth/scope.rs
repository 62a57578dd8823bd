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

/// Whether a task of `queue` (and, when known, of `name`) is within
/// `caller`'s scope: what a scoped worker key may read and report on, as
/// it may lease. `None` for the name: only the queue is checked (a key
/// scoped by task name then needs the task read first). Refusals name
/// `field` (`task_id`) and quote the task's queue or name.
pub fn task_within(
    caller: &Caller,
    field: &str,
    queue: &str,
    name: Option<&str>,
) -> Result<(), AuthError> {
    let scope = &caller.scope;
    let outside = |what: &str, value: &str, allowed: &[String]| AuthError::OutOfScope {
        field: field.to_owned(),
        value: format!("a task of {what} {}", crate::quote::quote(value)),
        principal: caller.principal.clone(),
        allowed: format!("{what}s {}", allowed.join(", ")),
    };
    if !scope.queues.is_empty() && !scope.queues.iter().any(|q| q == queue) {
        return Err(outside("queue", queue, &scope.queues));
    }
    match name {
        Some(name)
            if !scope.task_names.is_empty() && !scope.task_names.iter().any(|n| n == name) =>
        {
            Err(outside("task name", name, &scope.task_names))
        }
        _ => Ok(()),
    }
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

    /// A task is within a scope by its queue and, when named, its name.
    #[test]
    fn tasks_within_a_scope() {
        assert!(task_within(&pdf(), "task_id", "pdf", Some("any")).is_ok());
        let e = task_within(&pdf(), "task_id", "ai", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("task_id: a task of queue \"ai\" is outside"),
            "{e}"
        );
        let named = Caller {
            scope: Scope {
                queues: vec![],
                task_names: vec!["pdf.render".into()],
            },
            ..pdf()
        };
        assert!(task_within(&named, "task_id", "ai", None).is_ok());
        assert!(task_within(&named, "task_id", "ai", Some("pdf.render")).is_ok());
        assert!(task_within(&named, "task_id", "ai", Some("ai.query")).is_err());
        assert!(task_within(&Caller::anonymous(), "task_id", "ai", Some("x")).is_ok());
    }
}
