//! `KOO_CORS_ORIGINS`: which web pages on other origins may call koo from a
//! browser (grpc-web on both listeners, REST on the HTTP listener).
//!
//! Unset, koo sends no CORS headers, so a browser lets only pages that koo
//! serves itself (same origin) call it: the safe default. Origins are
//! compared exactly (scheme, host and port), as browsers send them; `*`
//! lets any page call koo, which is safe only because koo's credentials
//! are a header (`authorization`) that a page must set itself, never a
//! cookie the browser would add on its own: `Access-Control-Allow-
//! Credentials` is never sent.
//!
//! tower-http's `CorsLayer` does the protocol (preflights, `Vary`, the
//! exposed headers): it is the layer tonic-web's documentation pairs with
//! grpc-web, and it answers a preflight before authentication, which a
//! preflight (which carries no credentials) must never reach.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The origins `KOO_CORS_ORIGINS` allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No CORS headers (the default): same-origin pages only.
    #[default]
    None,
    /// `*`: any origin.
    Any,
    /// These origins exactly (`https://app.example.com`, `http://localhost:3000`).
    List(Vec<HeaderValue>),
}

/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// What a grpc-web or REST call from a page may send: the content type, the
/// grpc-web client's own headers, the deadline, the API key, trace context.
const ALLOWED_HEADERS: [&str; 8] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
    "traceparent",
    "tracestate",
    "accept",
];

/// What a page's script may read of a reply: the call's status travels in
/// these headers when grpc-web answers without a body (trailers-only).
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

impl CorsOrigins {
    /// Parses `KOO_CORS_ORIGINS`: empty, `*`, or origins separated by commas.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::None);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let origins = s
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(origin)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::List(origins))
    }

    /// The layer, or `None` when no origin is allowed (no CORS headers).
    pub fn layer(&self) -> Option<CorsLayer> {
        let allow = match self {
            Self::None => return None,
            Self::Any => AllowOrigin::any(),
            Self::List(list) => AllowOrigin::list(list.iter().cloned()),
        };
        let names = |list: &[&'static str]| {
            list.iter()
                .map(|h| HeaderName::from_static(h))
                .collect::<Vec<_>>()
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::PATCH])
                .allow_headers(names(&ALLOWED_HEADERS))
                .expose_headers(names(&EXPOSED_HEADERS))
                .max_age(PREFLIGHT_MAX_AGE),
        )
    }
}

/// One origin: `scheme://host[:port]`, nothing after (browsers send no
/// path, and an origin with one would never match).
fn origin(s: &str) -> Result<HeaderValue, String> {
    let quoted = crate::quote::quote(s);
    let uri: http::Uri = s
        .parse()
        .map_err(|_| format!("{quoted} is not an origin such as https://app.example.com"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let bare = uri.path_and_query().is_none_or(|p| p.as_str() == "/") && !s.ends_with('/');
    if !scheme_ok || uri.host().is_none() || !bare {
        return Err(format!(
            "{quoted} is not an origin such as https://app.example.com (a scheme http or \
             https, a host, an optional port, and no path)"
        ));
    }
    HeaderValue::from_str(s).map_err(|_| format!("{quoted} is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_star_and_lists() {
        assert_eq!(CorsOrigins::parse(""), Ok(CorsOrigins::None));
        assert_eq!(CorsOrigins::parse(" * "), Ok(CorsOrigins::Any));
        assert_eq!(
            CorsOrigins::parse("https://a.example.com, http://localhost:3000"),
            Ok(CorsOrigins::List(vec![
                HeaderValue::from_static("https://a.example.com"),
                HeaderValue::from_static("http://localhost:3000"),
            ]))
        );
        assert!(CorsOrigins::None.layer().is_none());
        assert!(CorsOrigins::Any.layer().is_some());
    }

    #[test]
    fn what_is_not_an_origin_is_named() {
        for bad in [
            "example.com",
            "ftp://example.com",
            "https://example.com/",
            "https://example.com/app",
            "https://",
        ] {
            let e = CorsOrigins::parse(bad).unwrap_err();
            assert!(e.contains("is not an origin"), "{bad}: {e}");
            assert!(e.contains(bad.trim_end_matches('/')), "{bad}: {e}");
        }
    }
}
