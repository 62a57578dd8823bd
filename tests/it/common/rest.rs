//! The REST tests' fixtures: `koo serve` with its HTTP listener on an
//! ephemeral port, and the real `curl` binary (Debian's, which
//! `scripts/test` installs) as the client.

use std::process::Command;

use serde_json::Value;

use super::{ChildGuard, logged_addr, serve_logged};

/// `koo serve` with `env` and the HTTP listener on an ephemeral port: the
/// process and the HTTP address.
pub fn serve_http(env: &[(&str, &str)]) -> (ChildGuard, String) {
    let (served, http, _) = serve_both(env);
    (served, http)
}

/// [`serve_http`], and the gRPC address.
pub fn serve_both(env: &[(&str, &str)]) -> (ChildGuard, String, String) {
    let env: Vec<(&str, &str)> = [("KOO_LOG", "info"), ("KOO_HTTP_LISTEN", "127.0.0.1:0")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let (served, lines) = serve_logged(&env);
    let http = logged_addr(&lines, "koo serving HTTP")
        .unwrap_or_else(|| panic!("koo announced no HTTP address: {lines:#?}"));
    let grpc = logged_addr(&lines, "koo serving gRPC").expect("a gRPC address");
    (served, http, grpc)
}

/// Runs `curl` with `args` (plus `-sS` and a status line): the HTTP status
/// and the body as JSON (`Value::Null` when it is not JSON).
pub fn curl(args: &[&str]) -> (u16, Value) {
    let (status, body) = curl_text(args);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// [`curl`] with the body as text.
pub fn curl_text(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): scripts/test installs it"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, status) = text.rsplit_once('\n').expect("curl printed the status");
    let status = status.trim().parse().expect("an HTTP status");
    (status, body.to_owned())
}

/// Runs a shell line (a curl command as the seed's README writes it): its
/// output as JSON.
pub fn shell_json(line: &str) -> Value {
    let out = Command::new("sh").args(["-c", line]).output().expect("sh");
    assert!(
        out.status.success(),
        "{line}: {}, {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
            .rsplit(['\r', '\n'])
            .next()
            .unwrap_or("")
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{line}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The seed's "Manual Maintenance" lines, verbatim; tests replace the
/// host:port.
pub const SEED_MAINTENANCE: [&str; 3] = [
    r#"curl -X POST "http://localhost:8000/api/v1/cache/maintenance""#,
    r#"curl -X POST "http://localhost:8000/api/v1/tasks/cleanup?hours_old=24""#,
    r#"curl -X POST "http://localhost:8000/api/v1/cache/warm""#,
];

/// Runs the seed's three maintenance lines against `http` and checks their
/// answers.
pub fn seed_maintenance(http: &str) {
    let [maintenance, cleanup, warm] =
        SEED_MAINTENANCE.map(|line| shell_json(&line.replace("localhost:8000", http)));
    assert!(
        maintenance["task_id"]
            .as_str()
            .is_some_and(|t| t.starts_with("cache~")),
        "{maintenance}"
    );
    assert_eq!(cleanup["removed_tasks"], "0", "{cleanup}");
    assert_eq!(cleanup["removed_dead_letters"], "0", "{cleanup}");
    assert!(
        warm["task_id"]
            .as_str()
            .is_some_and(|t| t.starts_with("cache~")),
        "{warm}"
    );
}
