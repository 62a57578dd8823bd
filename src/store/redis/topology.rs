//! Which Redis deployment a URL names: one server (`redis://`, `rediss://`,
//! `redis+unix://`, `valkey://`...), a Redis Cluster
//! (`redis+cluster://` / `rediss+cluster://` with one or more seed nodes), or
//! a primary found through Sentinels (`redis+sentinel://` /
//! `rediss+sentinel://` with the Sentinels and the primary's name).
//!
//! The cluster and sentinel forms are koo's own (the redis crate parses only
//! single-server URLs): they are rewritten here into the per-node URLs the
//! crate understands, so that credentials, TLS and TCP settings keep the one
//! code path of a single server.

use super::redact;

/// A parsed `REDIS_URL` / `TASK_BROKER_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server: the URL as given.
    Single(String),
    /// A Redis Cluster: one `redis[s]://[user:pw@]host:port` URL per seed node
    /// (the client discovers the others).
    Cluster { nodes: Vec<String>, tls: bool },
    /// A primary named `master` watched by Sentinels: one
    /// `redis[s]://host:port` URL per Sentinel; the primary's credentials
    /// and database.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        db: i64,
        username: Option<String>,
        password: Option<String>,
        tls: bool,
    },
}

impl Topology {
    /// Parses `url`; the error names what is wrong (never the password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let (scheme, rest) = match url.split_once("://") {
            Some(parts) => parts,
            None => return Ok(Self::Single(url.to_owned())),
        };
        let (tls, kind) = match scheme {
            "redis+cluster" | "valkey+cluster" => (false, Kind::Cluster),
            "rediss+cluster" | "valkeys+cluster" => (true, Kind::Cluster),
            "redis+sentinel" | "valkey+sentinel" => (false, Kind::Sentinel),
            "rediss+sentinel" | "valkeys+sentinel" => (true, Kind::Sentinel),
            _ => return Ok(Self::Single(url.to_owned())),
        };
        let shown = redact(url);
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (non_empty(user), non_empty(pw)),
                None => (non_empty(u), None),
            },
        };
        let hosts = hosts
            .split(',')
            .map(|h| check_host(h, &shown))
            .collect::<Result<Vec<_>, _>>()?;
        let node_scheme = if tls { "rediss" } else { "redis" };
        let mut db = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("db", n)) => db = Some(parse_db(n, &shown)?),
                _ => {
                    return Err(format!(
                        "{shown}: unknown parameter {:?} (only db=N is understood)",
                        pair.split('=').next().unwrap_or(pair)
                    ));
                }
            }
        }
        match kind {
            Kind::Cluster => {
                if !path.is_empty() && path != "0" {
                    return Err(format!(
                        "{shown}: a Redis Cluster has only database 0 (the path must be empty or /0)"
                    ));
                }
                if db.is_some_and(|d| d != 0) {
                    return Err(format!("{shown}: a Redis Cluster has only database 0"));
                }
                let auth = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
                let nodes = hosts
                    .iter()
                    .map(|h| format!("{node_scheme}://{auth}{h}"))
                    .collect();
                Ok(Self::Cluster { nodes, tls })
            }
            Kind::Sentinel => {
                let mut parts = path.split('/').filter(|p| !p.is_empty());
                let master = parts.next().ok_or_else(|| {
                    format!("{shown}: name the primary after the hosts (redis+sentinel://HOST:PORT/MASTER_NAME)")
                })?;
                if let Some(n) = parts.next() {
                    if db.is_some() {
                        return Err(format!("{shown}: the database is given twice"));
                    }
                    db = Some(parse_db(n, &shown)?);
                }
                if parts.next().is_some() {
                    return Err(format!(
                        "{shown}: the path is MASTER_NAME or MASTER_NAME/DB, nothing more"
                    ));
                }
                let sentinels = hosts
                    .iter()
                    .map(|h| format!("{node_scheme}://{h}"))
                    .collect();
                Ok(Self::Sentinel {
                    sentinels,
                    master: master.to_owned(),
                    db: db.unwrap_or(0),
                    username,
                    password,
                    tls,
                })
            }
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

enum Kind {
    Cluster,
    Sentinel,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// `host:port` (a bracketed IPv6 address allowed); the port is required,
/// so that a typo cannot silently aim at 6379.
fn check_host(h: &str, shown: &str) -> Result<String, String> {
    let port = h.rsplit_once(':');
    match port {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(h.to_owned())
        }
        _ => Err(format!(
            "{shown}: {:?} is not HOST:PORT (every node needs its port)",
            h.chars().take(64).collect::<String>()
        )),
    }
}

fn parse_db(n: &str, shown: &str) -> Result<i64, String> {
    n.parse::<i64>()
        .ok()
        .filter(|d| (0..=10_000).contains(d))
        .ok_or_else(|| format!("{shown}: database {n:?} is not a number from 0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_urls_pass_through() {
        for url in [
            "redis://h:1/2",
            "rediss://u:p@h:1",
            "redis+unix:///s.sock",
            "h:1",
        ] {
            assert_eq!(Topology::parse(url), Ok(Topology::Single(url.into())));
        }
    }

    #[test]
    fn cluster_urls_become_node_urls() {
        let t = Topology::parse("redis+cluster://u:pw@a:7000,b:7001/").unwrap();
        assert_eq!(
            t,
            Topology::Cluster {
                nodes: vec!["redis://u:pw@a:7000".into(), "redis://u:pw@b:7001".into()],
                tls: false
            }
        );
        let t = Topology::parse("rediss+cluster://[::1]:7000").unwrap();
        assert_eq!(
            t,
            Topology::Cluster {
                nodes: vec!["rediss://[::1]:7000".into()],
                tls: true
            }
        );
    }

    #[test]
    fn cluster_refuses_other_databases_and_missing_ports() {
        let e = Topology::parse("redis+cluster://a:7000/3").unwrap_err();
        assert!(e.contains("only database 0"), "{e}");
        let e = Topology::parse("redis+cluster://u:secret@a:7000,b").unwrap_err();
        assert!(e.contains("\"b\" is not HOST:PORT"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = Topology::parse("redis+cluster://a:7000?timeout=3").unwrap_err();
        assert!(e.contains("unknown parameter \"timeout\""), "{e}");
    }

    #[test]
    fn sentinel_urls_name_the_primary_and_database() {
        let t = Topology::parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2").unwrap();
        assert_eq!(
            t,
            Topology::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26380".into()],
                master: "mymaster".into(),
                db: 2,
                username: None,
                password: Some("pw".into()),
                tls: false,
            }
        );
        let t = Topology::parse("rediss+sentinel://s1:26379/m?db=5").unwrap();
        assert!(
            matches!(
                t,
                Topology::Sentinel {
                    db: 5,
                    tls: true,
                    ..
                }
            ),
            "{t:?}"
        );
        let e = Topology::parse("redis+sentinel://s1:26379/").unwrap_err();
        assert!(e.contains("name the primary"), "{e}");
        let e = Topology::parse("redis+sentinel://s1:26379/m/1?db=2").unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }
}
