//! `koo auth new-key`: a fresh API key and the keys-file entry holding its
//! digest. The key is printed once and never stored by koo.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use ring::rand::SecureRandom as _;

use super::keys::{Keys, KeysError, digest};

/// What the new key is for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The entry's name (logs and audit lines).
    pub name: String,
    /// reader, writer, admin or worker.
    pub role: String,
    /// A worker key's queues.
    pub queues: Vec<String>,
    /// A worker key's task names.
    pub task_names: Vec<String>,
    /// A worker key's hold limit.
    pub max_held: Option<u32>,
}

/// A new key and its entry.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// `koo_` and 32 random bytes in base64url (43 characters).
    pub key: String,
    /// The `[[key]]` entry to paste into the keys file.
    pub entry: String,
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| toml::Value::String(s.clone()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Makes a key for `request`, checked as the keys file will check it.
pub fn new_key(request: &Request) -> Result<NewKey, KeysError> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    let key = format!(
        "koo_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let mut entry = String::from("[[key]]\n");
    let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
    let _ = writeln!(entry, "name = {}", s(&request.name));
    let _ = writeln!(entry, "role = {}", s(&request.role));
    let _ = writeln!(
        entry,
        "sha256 = \"{}\"",
        hex::encode(digest(key.as_bytes()))
    );
    if !request.queues.is_empty() {
        let _ = writeln!(entry, "queues = {}", toml_list(&request.queues));
    }
    if !request.task_names.is_empty() {
        let _ = writeln!(entry, "task_names = {}", toml_list(&request.task_names));
    }
    if let Some(n) = request.max_held {
        let _ = writeln!(entry, "max_held = {n}");
    }
    Keys::parse(Path::new("(new entry)"), &entry, None)?;
    Ok(NewKey { key, entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entry parses and names the key; two keys differ; a scope on a
    /// reader is refused as the keys file would.
    #[test]
    fn entry_matches_key() {
        let req = Request {
            name: "pdf \"worker\"".into(),
            role: "worker".into(),
            queues: vec!["pdf".into()],
            max_held: Some(5),
            ..Request::default()
        };
        let made = new_key(&req).unwrap();
        assert!(
            made.key.starts_with("koo_") && made.key.len() == 47,
            "{}",
            made.key
        );
        let keys = Keys::parse(Path::new("x"), &made.entry, None).unwrap();
        let c = keys.by_key(&made.key).unwrap();
        assert_eq!(&*c.principal, "pdf \"worker\"");
        assert_eq!(c.max_held, Some(5));
        assert_ne!(new_key(&req).unwrap().key, made.key);
        let bad = Request {
            role: "reader".into(),
            ..req
        };
        assert!(new_key(&bad).unwrap_err().to_string().contains("queues"));
    }
}
