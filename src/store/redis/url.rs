//! Redis URLs as koo shows them: every log line and error that names a
//! Redis goes through [`redact`], so that an ACL user's password
//! (`redis://user:password@host`, or `?pass=` on a Unix socket URL) never
//! reaches a log. The user name stays: it is not a secret, and it says which
//! ACL user koo connects as.

/// The URL with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if matches!(name, "pass" | "password" | "sentinel_password") => {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

/// Refuses a user name or password that holds a raw `/` (as base64
/// passwords do), `?` or `#`: the URL's parsers end the host part there, so
/// the rest of the password would be read as a path, a query or a host and
/// quoted in their messages. The message quotes the redacted URL only.
pub fn check_userinfo(url: &str) -> Result<(), String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Ok(());
    };
    let Some((userinfo, _)) = rest.rsplit_once('@') else {
        return Ok(());
    };
    let Some(i) = userinfo.find(['/', '?', '#']) else {
        return Ok(());
    };
    // `...?k=v@...`: the `@` is in a query parameter, not in a password
    if userinfo[i..]
        .split_once('?')
        .is_some_and(|(_, query)| query.contains('='))
    {
        return Ok(());
    }
    let raw = userinfo.as_bytes()[i] as char;
    let code = match raw {
        '/' => "%2F",
        '?' => "%3F",
        _ => "%23",
    };
    Err(format!(
        "{}: the user name or password holds a raw {raw:?}, which ends the host part of a URL; percent-encode it as {code}",
        redact(url)
    ))
}

/// Whether the URL asks for TLS (`rediss://`, and the Cluster and
/// Sentinel forms `rediss+cluster://`, `rediss+sentinel://`; `valkeys` alike).
pub fn is_tls(url: &str) -> bool {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    let base = scheme.split_once('+').map_or(scheme, |(b, _)| b);
    matches!(base, "rediss" | "valkeys")
        && matches!(
            scheme.split_once('+'),
            None | Some((_, "cluster" | "sentinel"))
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw `/`, `?` or `#` in a password is refused before any parser
    /// reads part of it as a path, a query or a host (and quotes it).
    #[test]
    fn raw_delimiters_in_passwords() {
        for (url, secrets) in [
            (
                "redis://koo:hunter2/topsecret@127.0.0.1:1/0",
                ["hunter2", "topsecret"],
            ),
            ("redis+sentinel://:pw1/pw2@s:26379/m", ["pw1", "pw2"]),
            ("redis+cluster://u:pw3?pw4@h:1", ["pw3", "pw4"]),
            ("redis://:pw5#pw6@h:1/0", ["pw5", "pw6"]),
        ] {
            let e = check_userinfo(url).unwrap_err();
            assert!(e.contains("percent-encode"), "{e}");
            for secret in secrets {
                assert!(!e.contains(secret), "{e}");
            }
        }
        for url in [
            "redis://koo:hunter2%2Ftop@127.0.0.1:1/0",
            "redis://h:6379/0",
            "redis+sentinel://s:26379/m?sentinel_password=p@ss",
            "redis+sentinel://s:26379/m/1?sentinel_password=p@ss",
            "rediss://u:pw@h:6380/0#insecure",
        ] {
            assert_eq!(check_userinfo(url), Ok(()), "{url}");
        }
    }

    /// Passwords never reach the logs, wherever the URL carries them; user
    /// names, hosts and databases stay readable.
    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://u:secret@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(redact("rediss://koo:s3@cr@t@h/0"), "rediss://koo:***@h/0");
        assert_eq!(redact("redis://:secret@h/1"), "redis://:***@h/1");
        assert_eq!(redact("redis://h:6379/2"), "redis://h:6379/2");
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=1&user=koo&pass=secret"),
            "redis+unix:///run/redis.sock?db=1&user=koo&pass=***"
        );
        assert!(!redact("redis://u:secret@h/0?password=secret").contains("secret"));
        assert_eq!(
            redact("redis+sentinel://:pw@s:26379/m?db=1&sentinel_password=secret"),
            "redis+sentinel://:***@s:26379/m?db=1&sentinel_password=***"
        );
        assert_eq!(
            redact("redis+cluster://u:pw@a:1,b:2/"),
            "redis+cluster://u:***@a:1,b:2/"
        );
    }

    /// TLS follows the scheme, for one server, a Cluster and Sentinels.
    #[test]
    fn tls_schemes() {
        for url in [
            "rediss://h:1",
            "valkeys://h:1",
            "rediss+cluster://h:1",
            "rediss+sentinel://h:1/m",
        ] {
            assert!(is_tls(url), "{url}");
        }
        for url in [
            "redis://h:1",
            "redis+cluster://h:1",
            "redis+sentinel://h:1/m",
            "redis+unix:///s",
            "rediss+unix:///s",
        ] {
            assert!(!is_tls(url), "{url}");
        }
    }
}
