//! Requests a browser sends on behalf of another site: refused.
//!
//! Why: with no keys file koo is open to whoever reaches it, and on
//! loopback (the default) that was meant to be the machine's own
//! processes. A browser on that machine reaches it too, for any page it
//! opens: CORS stops such a page *reading* a reply, not *sending* a
//! request. A form or a `no-cors` fetch POSTs to the REST gateway (fields
//! in the query string, any content type) and clears a cache or submits a
//! task; and a page that rebinds its own name to 127.0.0.1 (DNS rebinding)
//! is same-origin to koo and reads everything. Two checks, the ones
//! browsers make possible (the same as Go's `CrossOriginProtection` and
//! the allowed-hosts list of development servers):
//!
//! - **Cross-site writes.** A request other than GET, HEAD or OPTIONS that
//!   a browser marks as from another origin (`Origin` not this host, or
//!   `Sec-Fetch-Site: cross-site`/`same-site`) is refused unless
//!   `KOO_CORS_ORIGINS` allows that origin (or `*`). Clients that are not
//!   browsers send neither header and are not affected.
//! - **Host names.** A listener bound to a loopback address answers only
//!   HTTP/1 requests addressed to an IP address, `localhost` or a
//!   `*.localhost` name, or a name `KOO_ALLOWED_HOSTS` lists (a proxy's
//!   public name; `*`: any). A rebound name is none of these. A listener
//!   bound to another address is reachable by name on purpose: it is
//!   checked the same way only when `KOO_ALLOWED_HOSTS` names its names
//!   (a container's, whose published port a browser on the host reaches),
//!   and needs a keys file anyway (koo warns at start when it has none).
//!
//! A refused gRPC or grpc-web call gets PERMISSION_DENIED, anything else
//! 403, each saying why; nothing is logged per request (a page can send
//! them at will).

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures::future::Either;
use http::header::{CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};

/// Headers a browser and a proxy send, named once (a name given as `&str`
/// is parsed on every lookup, and `refusal` runs on every call).
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

use super::cors::CorsOrigins;

/// The host names a loopback listener answers besides IP addresses and
/// `localhost` (`KOO_ALLOWED_HOSTS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedHosts {
    /// IP addresses and `localhost` names only (the default).
    #[default]
    Local,
    /// `*`: any name (the loopback check is off).
    Any,
    /// These names too (lower case, without ports).
    List(Vec<String>),
}

impl AllowedHosts {
    /// Parses `KOO_ALLOWED_HOSTS`: empty, `*`, or names separated by commas
    /// (no scheme, no port).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::Local);
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let mut names = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let ok = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !ok {
                return Err(format!(
                    "KOO_ALLOWED_HOSTS: {} is not a host name (names only: no scheme, port or path)",
                    crate::quote::quote(name)
                ));
            }
            names.push(name.trim_end_matches('.').to_ascii_lowercase());
        }
        Ok(Self::List(names))
    }
}

/// The checks of one listener.
#[derive(Debug, Clone)]
pub struct SiteGuard {
    /// Whether the listener is bound to a loopback address.
    loopback: bool,
    hosts: AllowedHosts,
    cors: CorsOrigins,
}

impl SiteGuard {
    pub fn new(listen: std::net::SocketAddr, hosts: AllowedHosts, cors: CorsOrigins) -> Self {
        Self {
            loopback: listen.ip().is_loopback(),
            hosts,
            cors,
        }
    }

    /// Why a request is refused, or `None`.
    ///
    /// The host is checked on HTTP/1 only: a browser speaks HTTP/2 to koo
    /// only under TLS, where a rebound name fails the certificate check,
    /// and gRPC clients may name any authority.
    pub fn refusal(
        &self,
        version: Version,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Option<String> {
        let host = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        let checked = match self.hosts {
            AllowedHosts::Any => false,
            AllowedHosts::Local => self.loopback,
            AllowedHosts::List(_) => true,
        };
        // (no Host at all: not a browser, which always sends one)
        if checked && version < Version::HTTP_2 && !host.is_empty() && !self.local_host(host) {
            return Some(format!(
                "koo answers requests to an IP address, localhost or a name in KOO_ALLOWED_HOSTS, not to {} (a name another site may have pointed here: DNS rebinding); list a proxy's or a service's name in KOO_ALLOWED_HOSTS",
                crate::quote::quote(host)
            ));
        }
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
            || self.cors == CorsOrigins::Any
        {
            return None;
        }
        match headers.get(ORIGIN) {
            Some(origin) => {
                let same = origin
                    .to_str()
                    .ok()
                    .and_then(|o| o.split_once("://"))
                    .is_some_and(|(_, authority)| {
                        same_authority(authority, host)
                            || forwarded_hosts(headers).any(|h| same_authority(authority, h))
                    });
                (!same && !self.listed(origin)).then(|| {
                    format!(
                        "koo: a browser request from another site ({}) is refused; allow that origin in KOO_CORS_ORIGINS",
                        crate::quote::quote(origin.to_str().unwrap_or("?"))
                    )
                })
            }
            None => {
                let site = headers
                    .get(SEC_FETCH_SITE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                matches!(site, "cross-site" | "same-site").then(|| {
                    format!("koo: a browser request from another site (Sec-Fetch-Site: {site}) is refused; allow its origin in KOO_CORS_ORIGINS")
                })
            }
        }
    }

    /// Whether `host` (with its port, as sent) may be answered on loopback.
    fn local_host(&self, host: &str) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
        {
            return true;
        }
        match &self.hosts {
            AllowedHosts::Any => true,
            AllowedHosts::Local => false,
            AllowedHosts::List(names) => names.iter().any(|n| n == name),
        }
    }

    fn listed(&self, origin: &HeaderValue) -> bool {
        matches!(&self.cors, CorsOrigins::List(list) if list.iter().any(|o| o == origin))
    }
}

/// The name of a `Host` value: without its port, an IPv6 address without
/// its brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// The hosts a proxy in front says the client asked for
/// (`X-Forwarded-Host`, `Forwarded: host=`): a proxy that rewrites `Host`
/// (nginx's and Apache's default) keeps the page's own origin there. A
/// page cannot set them on a request to another site without a preflight,
/// which CORS refuses.
fn forwarded_hosts(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    let x = headers
        .get_all(X_FORWARDED_HOST)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    let std = headers
        .get_all(FORWARDED)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim_matches('"'))
        });
    x.chain(std)
}

/// Whether an origin's `host[:port]` names the same host and port as the
/// request's `Host` (a default port may be left out of either).
fn same_authority(origin: &str, host: &str) -> bool {
    let strip = |a: &str| {
        a.to_ascii_lowercase()
            .trim_end_matches(":80")
            .trim_end_matches(":443")
            .to_owned()
    };
    !host.is_empty() && strip(origin) == strip(host)
}

/// A body a refusal can be written in (the listeners' two body types).
pub trait RefusalBody {
    fn text(text: String) -> Self;
}

impl RefusalBody for tonic::body::Body {
    fn text(text: String) -> Self {
        tonic::body::Body::new(text)
    }
}

impl RefusalBody for axum::body::Body {
    fn text(text: String) -> Self {
        axum::body::Body::from(text)
    }
}

/// The refusal: PERMISSION_DENIED for a gRPC or grpc-web call, else 403.
fn refused<B: RefusalBody + Default>(grpc: bool, why: String) -> Response<B> {
    if grpc {
        let status = tonic::Status::permission_denied(why).into_http::<tonic::body::Body>();
        let (parts, _) = status.into_parts();
        return Response::from_parts(parts, B::default());
    }
    let mut r = Response::new(B::text(format!("{why}\n")));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The layer of a listener's [`SiteGuard`].
#[derive(Debug, Clone)]
pub struct SiteLayer(pub SiteGuard);

impl<S> tower::Layer<S> for SiteLayer {
    type Service = SiteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SiteService {
            guard: self.0.clone(),
            inner,
        }
    }
}

/// See [`SiteLayer`].
#[derive(Debug, Clone)]
pub struct SiteService<S> {
    guard: SiteGuard,
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for SiteService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody + Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<ResBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.guard.refusal(
            request.version(),
            request.method(),
            request.uri(),
            request.headers(),
        ) {
            None => Either::Left(self.inner.call(request)),
            Some(why) => {
                let grpc = request
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/grpc"));
                Either::Right(ready(Ok(refused(grpc, why))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(listen: &str, hosts: AllowedHosts, cors: CorsOrigins) -> SiteGuard {
        SiteGuard::new(listen.parse().unwrap(), hosts, cors)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn check(g: &SiteGuard, method: Method, pairs: &[(&'static str, &str)]) -> Option<String> {
        g.refusal(
            Version::HTTP_11,
            &method,
            &"/api/v1/cache/clear".parse().unwrap(),
            &headers(pairs),
        )
    }

    /// On loopback, IP addresses and localhost names are answered, other
    /// names only when listed; elsewhere any name.
    #[test]
    fn loopback_answers_local_names_only() {
        let g = guard("127.0.0.1:50052", AllowedHosts::Local, CorsOrigins::None);
        for host in [
            "127.0.0.1:50052",
            "localhost:50052",
            "[::1]:50052",
            "app.localhost",
            "10.0.0.5",
        ] {
            assert_eq!(check(&g, Method::GET, &[("host", host)]), None, "{host}");
        }
        let e = check(&g, Method::GET, &[("host", "evil.example:50052")]).unwrap();
        assert!(
            e.contains("DNS rebinding") && e.contains("evil.example"),
            "{e}"
        );
        // no Host at all (HTTP/1.0 health checkers): not a browser
        assert_eq!(check(&g, Method::GET, &[]), None);
        // HTTP/2 (a gRPC client's own authority; a browser only under TLS)
        let h2 = "http://koo:50051/grpc.health.v1.Health/Check"
            .parse()
            .unwrap();
        let none = HeaderMap::new();
        assert_eq!(g.refusal(Version::HTTP_2, &Method::POST, &h2, &none), None);
        let listed = guard(
            "127.0.0.1:50052",
            AllowedHosts::parse("koo.example.com").unwrap(),
            CorsOrigins::None,
        );
        assert_eq!(
            check(&listed, Method::GET, &[("host", "KOO.example.com:443")]),
            None
        );
        assert!(check(&listed, Method::GET, &[("host", "other.example.com")]).is_some());
        let any = guard("127.0.0.1:50052", AllowedHosts::Any, CorsOrigins::None);
        assert_eq!(check(&any, Method::GET, &[("host", "evil.example")]), None);
        let exposed = guard("0.0.0.0:50052", AllowedHosts::Local, CorsOrigins::None);
        assert_eq!(
            check(&exposed, Method::GET, &[("host", "koo.svc:50052")]),
            None
        );
        // anywhere, once names are listed (a container's published port)
        let names = AllowedHosts::parse("koo, prom_target.").unwrap();
        let named = guard("0.0.0.0:50052", names, CorsOrigins::None);
        for host in ["koo:50052", "prom_target", "127.0.0.1:50052"] {
            assert_eq!(
                check(&named, Method::GET, &[("host", host)]),
                None,
                "{host}"
            );
        }
        assert!(check(&named, Method::GET, &[("host", "evil.example")]).is_some());
    }

    /// A write a browser marks as cross-site is refused unless its origin
    /// is allowed; same-origin writes and clients without the headers pass.
    #[test]
    fn cross_site_writes_are_refused() {
        let g = guard("127.0.0.1:50052", AllowedHosts::Local, CorsOrigins::None);
        let host = ("host", "127.0.0.1:50052");
        assert_eq!(check(&g, Method::POST, &[host]), None, "curl");
        assert_eq!(
            check(
                &g,
                Method::POST,
                &[host, ("origin", "http://127.0.0.1:50052")]
            ),
            None,
            "the dashboard"
        );
        let e = check(
            &g,
            Method::POST,
            &[host, ("origin", "https://evil.example")],
        )
        .unwrap();
        assert!(
            e.contains("evil.example") && e.contains("KOO_CORS_ORIGINS"),
            "{e}"
        );
        assert!(check(&g, Method::POST, &[host, ("origin", "null")]).is_some());
        assert!(
            check(
                &g,
                Method::DELETE,
                &[host, ("sec-fetch-site", "cross-site")]
            )
            .is_some()
        );
        assert_eq!(
            check(&g, Method::POST, &[host, ("sec-fetch-site", "same-origin")]),
            None
        );
        assert_eq!(
            check(&g, Method::GET, &[host, ("origin", "https://evil.example")]),
            None,
            "reads: CORS keeps the reply from the page"
        );
        let allowed = guard(
            "127.0.0.1:50052",
            AllowedHosts::Local,
            CorsOrigins::parse("https://app.example.com").unwrap(),
        );
        assert_eq!(
            check(
                &allowed,
                Method::POST,
                &[host, ("origin", "https://app.example.com")]
            ),
            None
        );
        assert!(
            check(
                &allowed,
                Method::POST,
                &[host, ("origin", "https://evil.example")]
            )
            .is_some()
        );
        let any = guard("127.0.0.1:50052", AllowedHosts::Local, CorsOrigins::Any);
        assert_eq!(
            check(
                &any,
                Method::POST,
                &[host, ("origin", "https://evil.example")]
            ),
            None
        );
        // behind a proxy that rewrote Host, the page's origin is the forwarded host
        let page = ("origin", "https://koo.example.com");
        assert!(check(&g, Method::POST, &[host, page]).is_some());
        let xfh = ("x-forwarded-host", "koo.example.com");
        assert_eq!(check(&g, Method::POST, &[host, page, xfh]), None);
        let fwd = (
            "forwarded",
            "for=10.0.0.1;host=\"koo.example.com\";proto=https",
        );
        assert_eq!(check(&g, Method::POST, &[host, page, fwd]), None);
        let other = ("x-forwarded-host", "other.example.com");
        assert!(check(&g, Method::POST, &[host, page, other]).is_some());
    }

    #[test]
    fn allowed_hosts_parse() {
        assert_eq!(AllowedHosts::parse(" ").unwrap(), AllowedHosts::Local);
        assert_eq!(AllowedHosts::parse("*").unwrap(), AllowedHosts::Any);
        assert_eq!(
            AllowedHosts::parse("A.example, b.example").unwrap(),
            AllowedHosts::List(vec!["a.example".into(), "b.example".into()])
        );
        let e = AllowedHosts::parse("https://a.example").unwrap_err();
        assert!(e.starts_with("KOO_ALLOWED_HOSTS:"), "{e}");
    }
}
