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
    /// and database; the Sentinels' own credentials, if they require some
    /// (`?sentinel_username=` / `?sentinel_password=`: the user info of the
    /// URL is the primary's, as for every other form). Credentials are
    /// percent-decoded.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        db: i64,
        username: Option<String>,
        password: Option<String>,
        tls: bool,
        sentinel_username: Option<String>,
        sentinel_password: Option<String>,
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
        let Query {
            db,
            sentinel_username,
            sentinel_password,
        } = Query::parse(query, matches!(kind, Kind::Sentinel), &shown)?;
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
                let (master, db) = master_and_db(path, db, &shown)?;
                let sentinels = hosts
                    .iter()
                    .map(|h| format!("{node_scheme}://{h}"))
                    .collect();
                let decoded = |v: Option<String>| v.map(|v| decode(&v, &shown)).transpose();
                Ok(Self::Sentinel {
                    sentinels,
                    master: decode(master, &shown)?,
                    db,
                    username: decoded(username)?,
                    password: decoded(password)?,
                    tls,
                    sentinel_username,
                    sentinel_password,
                })
            }
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// Whether the URL asks for TLS (`rediss://`, `rediss+cluster://`,
    /// `rediss+sentinel://`...).
    pub fn is_tls(&self) -> bool {
        match self {
            Self::Single(url) => super::is_tls(url),
            Self::Cluster { tls, .. } | Self::Sentinel { tls, .. } => *tls,
        }
    }
}

enum Kind {
    Cluster,
    Sentinel,
}

/// The query parameters of a Cluster or Sentinel URL.
#[derive(Default)]
struct Query {
    db: Option<i64>,
    sentinel_username: Option<String>,
    sentinel_password: Option<String>,
}

impl Query {
    /// `db=N`, and for Sentinels their own credentials; anything else is
    /// refused by name (a misspelt parameter must not be ignored).
    fn parse(query: Option<&str>, sentinel: bool, shown: &str) -> Result<Self, String> {
        let mut q = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            // a parameter given twice would silently take its last value
            let name = pair.split('=').next().unwrap_or(pair);
            if seen.contains(&name) {
                return Err(format!("{shown}: parameter {name:?} is given twice"));
            }
            seen.push(name);
            match pair.split_once('=') {
                Some(("db", n)) => q.db = Some(parse_db(n, shown)?),
                Some(("sentinel_username", u)) if sentinel => {
                    q.sentinel_username = non_empty(&decode(u, shown)?);
                }
                Some(("sentinel_password", p)) if sentinel => {
                    q.sentinel_password = non_empty(&decode(p, shown)?);
                }
                _ => {
                    let known = if sentinel {
                        "db=N, sentinel_username=, sentinel_password="
                    } else {
                        "only db=N"
                    };
                    return Err(format!(
                        "{shown}: unknown parameter {:?} ({known} is understood)",
                        pair.split('=').next().unwrap_or(pair)
                    ));
                }
            }
        }
        Ok(q)
    }
}

/// The primary's name and the database from a Sentinel URL's path
/// (`MASTER` or `MASTER/DB`) and its `?db=` parameter, if any.
fn master_and_db<'a>(
    path: &'a str,
    db: Option<i64>,
    shown: &str,
) -> Result<(&'a str, i64), String> {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let master = parts.next().ok_or_else(|| {
        format!(
            "{shown}: name the primary after the hosts (redis+sentinel://HOST:PORT/MASTER_NAME)"
        )
    })?;
    let db = match (parts.next(), db) {
        (Some(_), Some(_)) => return Err(format!("{shown}: the database is given twice")),
        (Some(n), None) => parse_db(n, shown)?,
        (None, db) => db.unwrap_or(0),
    };
    if parts.next().is_some() {
        return Err(format!(
            "{shown}: the path is MASTER_NAME or MASTER_NAME/DB, nothing more"
        ));
    }
    Ok((master, db))
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

/// `%XX` escapes decoded (a password may hold `@`, `:` or `/`); the error
/// names the URL, never the value.
fn decode(s: &str, shown: &str) -> Result<String, String> {
    crate::percent::decode(s).ok_or_else(|| {
        format!("{shown}: a credential or name holds a malformed %-escape or is not UTF-8")
    })
}

pub(crate) fn parse_db(n: &str, shown: &str) -> Result<i64, String> {
    n.parse::<i64>()
        .ok()
        .filter(|d| (0..=10_000).contains(d))
        .ok_or_else(|| format!("{shown}: database {n:?} is not a number from 0 to 10000"))
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
                sentinel_username: None,
                sentinel_password: None,
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
        // a parameter given twice is refused, never its last value taken
        for url in [
            "redis+sentinel://s1:26379/m?db=3&db=5",
            "redis+sentinel://s1:26379/m?sentinel_password=a&sentinel_password=b",
            "redis+cluster://n1:7000/?db=0&db=0",
        ] {
            let e = Topology::parse(url).unwrap_err();
            assert!(e.contains("given twice"), "{url}: {e}");
            assert!(!e.contains("a&"), "{url}: a password shown: {e}");
        }
    }

    /// The Sentinels' own credentials come as query parameters (the user
    /// info is the primary's); every credential is percent-decoded; errors
    /// never show a password.
    #[test]
    fn sentinel_credentials_are_parameters_and_decoded() {
        let t = Topology::parse(
            "redis+sentinel://koo:p%40ss@s1:26379/m?sentinel_username=sen&sentinel_password=s%3Acret&db=3",
        )
        .unwrap();
        let Topology::Sentinel {
            username,
            password,
            sentinel_username,
            sentinel_password,
            db,
            ..
        } = t
        else {
            panic!("{t:?}")
        };
        assert_eq!(username.as_deref(), Some("koo"));
        assert_eq!(password.as_deref(), Some("p@ss"));
        assert_eq!(sentinel_username.as_deref(), Some("sen"));
        assert_eq!(sentinel_password.as_deref(), Some("s:cret"));
        assert_eq!(db, 3);
        let e = Topology::parse("redis+sentinel://:secret@s1:26379/m?sentinel_password=%zz")
            .unwrap_err();
        assert!(e.contains("%-escape"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        // a Cluster has no Sentinels
        let e = Topology::parse("redis+cluster://a:7000?sentinel_password=x").unwrap_err();
        assert!(e.contains("unknown parameter \"sentinel_password\""), "{e}");
        let e = Topology::parse("redis+sentinel://s1:26379/m?retries=3").unwrap_err();
        assert!(e.contains("sentinel_password="), "{e}");
    }
}
