//! The keys file (`KOO_AUTH_FILE`): API keys by their SHA-256 and mTLS
//! principals, each with a role (and, for workers, a scope and a hold
//! limit); validated whole, swapped in whole when it changes on disk.
//!
//! The file holds digests, never keys: a leaked keys file gives no key. Keys
//! are random and long (`koo auth new-key`), so a plain SHA-256 is enough (no
//! salt or slow hash: nothing to brute-force). A presented key is hashed and
//! compared with *every* entry's 32-byte digest in constant time, so neither
//! the time taken nor its length tells how close a guess came.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tokio_util::sync::CancellationToken;

use super::{Caller, Role, Scope};

/// The principal name of `KOO_WORKER_TOKEN` as a worker key.
pub const WORKER_TOKEN_NAME: &str = "KOO_WORKER_TOKEN";

/// Why a keys file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("KOO_AUTH_FILE: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML of the expected shape (unknown fields included).
    #[error("KOO_AUTH_FILE: {path} is not a valid keys file: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        reason: String,
    },
    /// An entry's field is wrong.
    #[error("KOO_AUTH_FILE: {entry}: {field}: {reason}")]
    Invalid {
        /// The entry, e.g. `key[2] "pdf-worker"`.
        entry: String,
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// One `[[key]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    role: String,
    sha256: String,
    #[serde(default)]
    queues: Vec<String>,
    #[serde(default)]
    task_names: Vec<String>,
    max_held: Option<u32>,
}

/// One `[[principal]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    name: String,
    role: String,
    #[serde(default)]
    queues: Vec<String>,
    #[serde(default)]
    task_names: Vec<String>,
    max_held: Option<u32>,
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    key: Vec<KeyEntry>,
    #[serde(default)]
    principal: Vec<PrincipalEntry>,
}

/// A key's digest and whom it names.
#[derive(Debug, Clone)]
struct KeyRecord {
    digest: [u8; 32],
    caller: Caller,
}

/// A validated keys file (plus `KOO_WORKER_TOKEN` as a worker key).
#[derive(Debug, Clone, Default)]
pub struct Keys {
    keys: Vec<KeyRecord>,
    principals: HashMap<String, Caller>,
}

/// The SHA-256 of `key`.
pub fn digest(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The caller named by `key` among `records`: every digest is compared,
/// without early exit, and the match is selected without a branch on it.
fn find(records: &[KeyRecord], key: &[u8]) -> Option<usize> {
    let presented = digest(key);
    let mut found = Choice::from(0);
    let mut index = 0u32;
    for (i, r) in records.iter().enumerate() {
        let eq = presented.ct_eq(&r.digest);
        index = u32::conditional_select(&index, &(i as u32), eq);
        found |= eq;
    }
    bool::from(found).then_some(index as usize)
}

impl Keys {
    /// The caller whose key this is.
    pub fn by_key(&self, key: &str) -> Option<Caller> {
        find(&self.keys, key.as_bytes()).map(|i| self.keys[i].caller.clone())
    }

    /// The caller whose client certificate has this identity.
    pub fn by_principal(&self, identity: &str) -> Option<Caller> {
        self.principals.get(identity).cloned()
    }

    /// How many keys (the worker token included) and principals.
    pub fn len(&self) -> (usize, usize) {
        (self.keys.len(), self.principals.len())
    }

    /// Says at WARN when the file at `path` admits no one: every call but
    /// health is then refused, which is safe but rarely meant (an emptied
    /// or truncated file), and nothing else would say why.
    pub fn warn_if_empty(&self, path: &Path) {
        if self.keys.is_empty() && self.principals.is_empty() {
            tracing::warn!(
                file = %path.display(),
                "the keys file (KOO_AUTH_FILE) holds no keys and no principals: every call but health is refused"
            );
        }
    }

    /// Only `KOO_WORKER_TOKEN`, as a worker key (koo runs without a keys
    /// file, but WorkerService needs that token).
    pub fn worker_token(token: &str) -> Self {
        Self {
            keys: vec![worker_token_record(token)],
            principals: HashMap::new(),
        }
    }

    /// Parses and validates a keys file's text; `worker_token` becomes one
    /// more worker key named `KOO_WORKER_TOKEN`.
    pub fn parse(path: &Path, text: &str, worker_token: Option<&str>) -> Result<Self, KeysError> {
        let file: KeysFile = toml::from_str(text).map_err(|e| KeysError::Parse {
            path: path.to_owned(),
            reason: parse_reason(text, &e),
        })?;
        let mut names = HashSet::new();
        let mut digests = HashSet::new();
        let mut keys = Vec::with_capacity(file.key.len() + 1);
        for (i, k) in file.key.iter().enumerate() {
            let entry = format!("key[{i}] {}", crate::quote::quote(&k.name));
            let caller = caller(
                &entry,
                &k.name,
                &k.role,
                &k.queues,
                &k.task_names,
                k.max_held,
            )?;
            let digest = parse_digest(&entry, &k.sha256)?;
            claim(&mut names, &entry, &k.name)?;
            if !digests.insert(digest) {
                return Err(invalid(&entry, "sha256", "the same digest as another key"));
            }
            keys.push(KeyRecord { digest, caller });
        }
        let mut principals = HashMap::with_capacity(file.principal.len());
        for (i, p) in file.principal.iter().enumerate() {
            let entry = format!("principal[{i}] {}", crate::quote::quote(&p.name));
            let caller = caller(
                &entry,
                &p.name,
                &p.role,
                &p.queues,
                &p.task_names,
                p.max_held,
            )?;
            claim(&mut names, &entry, &p.name)?;
            principals.insert(p.name.clone(), caller);
        }
        if let Some(token) = worker_token {
            let record = worker_token_record(token);
            let entry = "KOO_WORKER_TOKEN";
            if names.contains(WORKER_TOKEN_NAME) {
                return Err(invalid(
                    entry,
                    "name",
                    "an entry of the keys file is named KOO_WORKER_TOKEN, the name the worker token takes",
                ));
            }
            if digests.contains(&record.digest) {
                return Err(invalid(
                    entry,
                    "sha256",
                    "the worker token is also a key of the keys file",
                ));
            }
            keys.push(record);
        }
        Ok(Self { keys, principals })
    }

    /// Reads and validates the keys file at `path`.
    pub fn load(path: &Path, worker_token: Option<&str>) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, worker_token)
    }
}

fn worker_token_record(token: &str) -> KeyRecord {
    KeyRecord {
        digest: digest(token.as_bytes()),
        caller: Caller {
            principal: Arc::from(WORKER_TOKEN_NAME),
            role: Some(Role::Worker),
            scope: Scope::default(),
            max_held: None,
        },
    }
}

fn invalid(entry: &str, field: &'static str, reason: impl Into<String>) -> KeysError {
    KeysError::Invalid {
        entry: entry.to_owned(),
        field,
        reason: reason.into(),
    }
}

/// Records `name` (unique across keys and principals: audit lines name them).
fn claim(names: &mut HashSet<String>, entry: &str, name: &str) -> Result<(), KeysError> {
    if !names.insert(name.to_owned()) {
        return Err(invalid(entry, "name", "another entry has this name"));
    }
    Ok(())
}

fn parse_digest(entry: &str, hex_digest: &str) -> Result<[u8; 32], KeysError> {
    let mut out = [0u8; 32];
    if hex_digest.len() != 64 {
        return Err(invalid(
            entry,
            "sha256",
            format!(
                "must be 64 hex digits (a SHA-256), got {} characters",
                hex_digest.len()
            ),
        ));
    }
    hex::decode_to_slice(hex_digest, &mut out).map_err(|e| {
        invalid(
            entry,
            "sha256",
            format!("must be 64 hex digits (a SHA-256): {e}"),
        )
    })?;
    Ok(out)
}

/// Where and why the file is not TOML of the expected shape, without
/// quoting it: the parser's own message shows the line, and the line may
/// hold a key pasted into the wrong field (an ERROR line would put it in
/// the logs). Quoted values in the message are left out too.
fn parse_reason(text: &str, e: &toml::de::Error) -> String {
    let place = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    format!("{}{}", place.unwrap_or_default(), unquoted(e.message()))
}

/// The words a keys file's parse error may quote as they are: its own
/// field and table names.
const FIELDS: [&str; 9] = [
    "key",
    "principal",
    "name",
    "role",
    "sha256",
    "uri",
    "queues",
    "task_names",
    "max_held",
];

/// A parser message with what it quotes of the file left out: a string
/// (`"…"`), and a name in backticks unless it is one of the file's own
/// [`FIELDS`] (an unknown field may be a key pasted as a name).
fn unquoted(message: &str) -> String {
    let mut out = String::new();
    let mut rest = message.trim_end();
    while let Some(at) = rest.find(['"', '`']) {
        out.push_str(&rest[..at].replace('\n', " "));
        let mark = &rest[at..=at];
        let after = &rest[at + 1..];
        let Some(end) = after.find(mark) else {
            // an unmatched mark: what follows may be the file's
            out.push_str(mark);
            out.push('…');
            return out;
        };
        let inner = &after[..end];
        let shown = mark == "`" && FIELDS.contains(&inner);
        out.push_str(mark);
        out.push_str(if shown { inner } else { "…" });
        out.push_str(mark);
        rest = &after[end + 1..];
    }
    out.push_str(&rest.replace('\n', " "));
    out
}

/// An entry's caller: its role, and the scope and hold limit only a worker
/// may have.
fn caller(
    entry: &str,
    name: &str,
    role: &str,
    queues: &[String],
    task_names: &[String],
    max_held: Option<u32>,
) -> Result<Caller, KeysError> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(invalid(
            entry,
            "name",
            "must be 1 to 256 bytes without control characters",
        ));
    }
    let role = Role::parse(role).ok_or_else(|| {
        invalid(
            entry,
            "role",
            // a long value is not quoted: a key pasted into the wrong field
            // would reach the logs
            if role.chars().count() <= 16 {
                format!(
                    "{} is not a role (reader, writer, admin or worker)",
                    crate::quote::quote(role)
                )
            } else {
                format!(
                    "{} characters that are not a role (reader, writer, admin or worker)",
                    role.chars().count()
                )
            },
        )
    })?;
    if role != Role::Worker {
        let field = match (queues.is_empty(), task_names.is_empty(), max_held) {
            (false, _, _) => Some("queues"),
            (_, false, _) => Some("task_names"),
            (_, _, Some(_)) => Some("max_held"),
            _ => None,
        };
        if let Some(field) = field {
            return Err(invalid(
                entry,
                field,
                format!(
                    "only a worker key has a scope or a hold limit; this one is {}",
                    role.as_str()
                ),
            ));
        }
    }
    for (field, list) in [("queues", queues), ("task_names", task_names)] {
        if let Some(bad) = list.iter().find(|q| q.is_empty() || q.len() > 256) {
            return Err(invalid(
                entry,
                field,
                format!("{} must be 1 to 256 bytes", crate::quote::quote(bad)),
            ));
        }
    }
    if max_held == Some(0) {
        return Err(invalid(entry, "max_held", "must be at least 1"));
    }
    Ok(Caller {
        principal: Arc::from(name),
        role: Some(role),
        scope: Scope {
            queues: queues.to_vec(),
            task_names: task_names.to_vec(),
        },
        max_held,
    })
}

/// The keys in force: a cheap `Clone` handle that the auth layer reads on
/// every call and the reload loop swaps.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    // std RwLock: held only to clone or swap an Arc, never across an await.
    current: Arc<RwLock<Arc<Keys>>>,
}

impl Keyring {
    /// A keyring holding `keys`.
    pub fn new(keys: Keys) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(keys))),
        }
    }

    /// The keys in force now.
    pub fn keys(&self) -> Arc<Keys> {
        self.current.read().expect("not poisoned").clone()
    }

    /// Re-reads `path`; a file that does not load is logged and the keys in
    /// force stay (a half-written file must not lock everyone out).
    pub fn reload(&self, path: &Path, worker_token: Option<&str>) {
        match Keys::load(path, worker_token) {
            Ok(keys) => {
                let (k, p) = keys.len();
                keys.warn_if_empty(path);
                *self.current.write().expect("not poisoned") = Arc::new(keys);
                tracing::info!(keys = k, principals = p, file = %path.display(), "keys file reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "the keys file changed but cannot be used; the previous keys stay in force");
            }
        }
    }

    /// Re-reads `path` whenever it changes on disk, every `every`, until
    /// `stop`.
    pub async fn watch(
        self,
        path: PathBuf,
        worker_token: Option<String>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let file = path.clone();
        let load = Arc::new(move || self.reload(&file, worker_token.as_deref()));
        crate::reload::watch("keys file", vec![path], every, stop, load).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PDF: &str = "pdf-key-0123456789";

    fn file(body: &str) -> Result<Keys, KeysError> {
        Keys::parse(Path::new("keys.toml"), body, None)
    }

    fn entry(name: &str, role: &str, key: &str) -> String {
        format!(
            "[[key]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            hex::encode(digest(key.as_bytes()))
        )
    }

    /// The example shape parses; keys and principals are found,
    /// others are not.
    #[test]
    fn parses_the_documented_shape() {
        let text = format!(
            "{}queues = [\"pdf_processing\"]\ntask_names = []\nmax_held = 10\n\n[[principal]]\nname = \"spiffe://prod/api\"\nrole = \"writer\"\n",
            entry("pdf-worker", "worker", PDF)
        );
        let keys = file(&text).unwrap();
        let c = keys.by_key(PDF).unwrap();
        assert_eq!(&*c.principal, "pdf-worker");
        assert_eq!(c.role, Some(Role::Worker));
        assert_eq!(c.scope.queues, ["pdf_processing"]);
        assert_eq!(c.max_held, Some(10));
        assert!(keys.by_key("pdf-key-012345678").is_none());
        assert!(keys.by_key("").is_none());
        let p = keys.by_principal("spiffe://prod/api").unwrap();
        assert_eq!(p.role, Some(Role::Writer));
        assert!(keys.by_principal("spiffe://prod/other").is_none());
    }

    /// Each mistake is refused with a message naming the entry and field.
    #[test]
    fn refuses_bad_files_naming_entry_and_field() {
        let ok = entry("a", "reader", "k1");
        let cases: Vec<(String, &str)> = vec![
            (
                entry("a", "root", "k1"),
                "key[0] \"a\": role: \"root\" is not a role",
            ),
            (
                "[[key]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"abc\"\n".into(),
                "key[0] \"a\": sha256: must be 64 hex digits",
            ),
            (
                format!(
                    "[[key]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"{}\"\n",
                    "zz".repeat(32)
                ),
                "key[0] \"a\": sha256: must be 64 hex digits (a SHA-256): Invalid character",
            ),
            (
                format!("{ok}{}", entry("a", "writer", "k2")),
                "key[1] \"a\": name: another entry",
            ),
            (
                format!("{ok}{}", entry("b", "writer", "k1")),
                "key[1] \"b\": sha256: the same digest",
            ),
            (
                format!("{ok}queues = [\"q\"]\n"),
                "key[0] \"a\": queues: only a worker key",
            ),
            (
                format!("{ok}max_held = 3\n"),
                "key[0] \"a\": max_held: only a worker key",
            ),
            (
                format!("{ok}colour = \"red\"\n"),
                "unknown field `…`, expected one of `name`",
            ),
            (
                "[[principal]]\nname = \"p\"\nrole = \"reader\"\nsha256 = \"x\"\n".into(),
                "unknown field `sha256`",
            ),
            (
                "[[principal]]\nname = \"a\"\nrole = \"worker\"\ntask_names = [\"\"]\n".into(),
                "principal[0] \"a\": task_names",
            ),
        ];
        for (text, want) in cases {
            let err = file(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}\n=> {err}\n(wanted {want})");
        }
        let token = Keys::parse(
            Path::new("k"),
            &entry("KOO_WORKER_TOKEN", "worker", "k"),
            Some("t"),
        );
        assert!(
            token
                .unwrap_err()
                .to_string()
                .contains("KOO_WORKER_TOKEN: name")
        );
    }

    /// KOO_WORKER_TOKEN is one more worker key.
    #[test]
    fn worker_token_is_a_worker_key() {
        let keys = Keys::parse(Path::new("k"), &entry("a", "admin", "k1"), Some("tok")).unwrap();
        let c = keys.by_key("tok").unwrap();
        assert_eq!(
            (&*c.principal, c.role),
            (WORKER_TOKEN_NAME, Some(Role::Worker))
        );
        assert_eq!(keys.by_key("k1").unwrap().role, Some(Role::Admin));
    }

    /// A file that does not parse is refused by line and column, never
    /// quoting it: a raw key pasted into the wrong field (or left
    /// unquoted) would otherwise reach the logs.
    #[test]
    fn parse_errors_do_not_quote_the_file() {
        let secret = "koo_SUPERSECRETSUPERSECRET";
        for text in [
            format!("[[key]]\nname = \"svc\"\nrole = \"writer\"\nkey = \"{secret}\"\n"),
            format!("[[key]]\nname = \"svc\"\nrole = \"writer\"\nsha256 = {secret}\n"),
            format!("[[key]]\nname = \"svc\"\nrole = [\"{secret}\"]\n"),
            format!("[[key]]\nname = \"svc\"\n{secret} = 1\n"),
            format!("[{secret}]\nname = 1\n"),
            format!(
                "[[key]]\nname = \"svc\"\nrole = \"{secret}\"\nsha256 = \"{}\"\n",
                "a".repeat(64)
            ),
        ] {
            let e = Keys::parse(Path::new("k.toml"), &text, None)
                .unwrap_err()
                .to_string();
            assert!(!e.contains("SUPERSECRET"), "{e}");
            assert!(
                e.contains("line ") || e.contains("role: 26 characters"),
                "{e}"
            );
        }
    }

    /// A reload that does not parse keeps the previous keys.
    #[test]
    fn bad_reload_keeps_previous_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, entry("a", "reader", "k1")).unwrap();
        let ring = Keyring::new(Keys::load(&path, None).unwrap());
        std::fs::write(&path, "[[key]]\nname = ").unwrap();
        ring.reload(&path, None);
        assert!(ring.keys().by_key("k1").is_some());
        std::fs::write(&path, entry("b", "reader", "k2")).unwrap();
        ring.reload(&path, None);
        assert!(ring.keys().by_key("k1").is_none());
        assert!(ring.keys().by_key("k2").is_some());
    }
}
