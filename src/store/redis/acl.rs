//! The least a Redis ACL user must be granted for koo to work: every
//! command koo sends, from Rust and from its Lua scripts (Redis checks a
//! script's calls against the caller's ACL too), and nothing else.
//!
//! Not granted: `FLUSHALL`/`FLUSHDB` (a cache level is cleared by `SCAN` and
//! `UNLINK` of its own keys), `KEYS` (koo walks keys with `SCAN`),
//! `CONFIG`, `DEBUG`, `EVAL` (scripts run by digest, loaded with `SCRIPT
//! LOAD`). Pub/Sub: only for `WatchInvalidations` (see `crate::cache::bus`),
//! whose channels are granted apart: `&{prefix}:v1:cache:changes`, and
//! `&__keyevent@{db}__:expired &__keyevent@{db}__:evicted` for expiries;
//! without them koo works, and its invalidation streams say RESET. `INFO` is
//! optional: without it the memory figures and eviction-policy checks
//! degrade (see [`super::RedisStore::memory`]). `SELECT` is needed only for
//! a database other than 0. The key pattern is the prefix: every key koo
//! touches starts with `{KOO_PREFIX}:` (see `crate::keys`), so the ACL line
//! is `~koo:*` for the default prefix.
//!
//! A Redis Cluster client also needs `CLUSTER SLOTS` (redis-rs reads the
//! slot map with it, at connection and after a `MOVED`), `ASKING` (sent
//! before following an `ASK` redirection during a slot migration), and koo
//! reads `CLUSTER NODES` and `CLUSTER INFO` to walk every master. Not
//! `READONLY`: koo never reads from replicas (redis-rs sends `PING` in its
//! place). They read only the topology, so the same rules serve one server
//! and a Cluster (on a Cluster, set the user on every node: ACLs are per
//! node).

/// The command rules, in `ACL SETUSER` syntax, that koo's user needs (with
/// `on >password ~{prefix}:* resetchannels` before them). A test reads
/// koo's Redis code and scripts and fails if a command is missing here.
pub const REDIS_ACL_RULES: &str = "-@all \
+ping +select +info +time \
+get +set +mget +strlen +incr \
+exists +del +unlink +pttl +pexpire +pexpireat +persist +scan +memory|usage \
+hget +hgetall +hmget +hset +hsetnx +hdel +hexists +hincrby +hlen +hscan \
+lrange +rpush +blpop +smembers +sadd +srem +scard \
+zadd +zcard +zrange +zrangebyscore +zrevrangebyscore +zrem +zremrangebyscore +zremrangebyrank +zscore \
+xadd +xtrim +xread +xrevrange +xinfo|stream \
+multi +exec +evalsha +script|load +wait \
+publish +subscribe +unsubscribe \
+cluster|slots +cluster|nodes +cluster|info +asking";

#[cfg(test)]
mod tests {
    use super::REDIS_ACL_RULES;
    use std::path::Path;

    /// Every `name` in `text` that follows one of `openers` and is closed by `close`.
    fn names_after(text: &str, openers: &[&str], close: char) -> Vec<String> {
        let mut found = Vec::new();
        for opener in openers {
            for (at, _) in text.match_indices(opener) {
                let rest = &text[at + opener.len()..];
                if let Some(end) = rest.find(close) {
                    found.push(rest[..end].to_ascii_lowercase());
                }
            }
        }
        found
    }

    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, out);
            } else {
                out.push(path);
            }
        }
    }

    /// Every command in koo's Redis code (`cmd("X")`, `.cmd("X")`, a
    /// transaction, a script) and Lua scripts (`redis.call('X'`) is granted
    /// by the documented rules, so that a new command cannot ship without
    /// its ACL entry; and nothing dangerous is granted.
    #[test]
    fn rules_grant_every_command_koo_sends() {
        let granted: Vec<&str> = REDIS_ACL_RULES
            .split_whitespace()
            .filter_map(|r| r.strip_prefix('+'))
            .collect();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/redis");
        let mut paths = Vec::new();
        files(&root, &mut paths);
        let mut commands = Vec::new();
        for path in paths.iter().filter(|p| !p.ends_with("acl.rs")) {
            let text = std::fs::read_to_string(path).unwrap();
            commands.extend(names_after(&text, &["cmd(\""], '"'));
            commands.extend(names_after(&text, &["redis.call('", "redis.pcall('"], '\''));
            // What the crate sends for koo: a transaction, scripts by digest.
            if text.contains(".atomic()") {
                commands.extend(["multi".into(), "exec".into()]);
            }
            if text.contains("Script::new") {
                commands.extend(["evalsha".into(), "script|load".into()]);
            }
        }
        assert!(commands.len() > 30, "the scan found {commands:?}");
        // What the redis-rs Cluster client sends by itself.
        commands.extend(["cluster|slots".into(), "asking".into(), "ping".into()]);
        for command in commands {
            let ok = granted.iter().any(|g| {
                *g == command
                    || g.starts_with(&format!("{command}|"))
                    || command.split('|').next() == Some(*g)
            });
            assert!(
                ok,
                "koo sends {command} but REDIS_ACL_RULES does not grant it"
            );
        }
        for forbidden in [
            "flushall", "flushdb", "keys", "config", "debug", "eval", "@all",
        ] {
            assert!(
                !granted
                    .iter()
                    .any(|g| g.split('|').next() == Some(forbidden)),
                "{forbidden} must not be granted"
            );
        }
    }
}
