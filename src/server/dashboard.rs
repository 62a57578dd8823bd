//! The web dashboard's three files (`web/dist`, built from the TypeScript
//! under `web/` and committed; `scripts/test` rebuilds them and fails when
//! they differ), embedded in the binary so that `koo serve` needs nothing
//! beside it and works offline.
//!
//! The files hold no data: the page calls koo over grpc-web on the same
//! origin, and those calls pass the call layers (authentication, roles,
//! audit, load shedding) like any other, so serving the files needs no
//! credentials. Their names carry no hash, so they are served with
//! `Cache-Control: no-cache` and a strong ETag: a browser revalidates and
//! gets 304 until koo is upgraded. Each is gzipped once, on first request,
//! for clients that accept it. The page's Content-Security-Policy allows
//! its own origin only (no inline script, no eval, no framing).

use std::io::Write as _;
use std::sync::LazyLock;

use axum::Router;
use axum::http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, REFERRER_POLICY, VARY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What the page may load and call: its own origin only.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

/// Bytes computed once, on first use.
type Once<T> = LazyLock<T, fn() -> T>;

/// One embedded file, with its validator and its gzipped bytes.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    /// The body's validator; the gzipped body's is another (`-gz`), as a
    /// strong validator names one representation.
    etag: HeaderValue,
    etag_gz: HeaderValue,
    gzipped: Once<Option<Vec<u8>>>,
}

macro_rules! asset {
    ($file:literal, $type:literal) => {
        LazyLock::new(|| {
            const BODY: &[u8] = include_bytes!(concat!("../../web/dist/", $file));
            Asset {
                body: BODY,
                content_type: $type,
                etag: etag(BODY, ""),
                etag_gz: etag(BODY, "-gz"),
                gzipped: LazyLock::new(|| gzip(BODY)),
            }
        })
    };
}

static INDEX: LazyLock<Asset> = asset!("index.html", "text/html; charset=utf-8");
static SCRIPT: LazyLock<Asset> = asset!("app.js", "text/javascript; charset=utf-8");
static STYLE: LazyLock<Asset> = asset!("app.css", "text/css; charset=utf-8");

/// The dashboard's routes: the page at `/` (and `/index.html`) and its
/// script and style sheet.
pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|h: HeaderMap| async move { serve(&INDEX, &h) }))
        .route(
            "/index.html",
            get(|h: HeaderMap| async move { serve(&INDEX, &h) }),
        )
        .route(
            "/app.js",
            get(|h: HeaderMap| async move { serve(&SCRIPT, &h) }),
        )
        .route(
            "/app.css",
            get(|h: HeaderMap| async move { serve(&STYLE, &h) }),
        )
}

/// `asset` for a request with `headers`: 304 when the browser's copy is
/// current, gzipped when it takes gzip. The bodies are `'static` (embedded,
/// or gzipped once): served without a copy per request.
fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let gzipped = asset.gzipped.as_deref().filter(|_| takes_gzip(headers));
    let etag = if gzipped.is_some() {
        &asset.etag_gz
    } else {
        &asset.etag
    };
    let mut response = if fresh(headers, etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match gzipped {
            Some(gz) => (
                [(CONTENT_ENCODING, HeaderValue::from_static("gzip"))],
                bytes::Bytes::from_static(gz),
            )
                .into_response(),
            None => asset.body.into_response(),
        }
    };
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(ETAG, etag.clone());
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn fresh(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Some(wanted) = headers.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ours = etag.to_str().unwrap_or_default();
    wanted
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == ours)
}

/// Whether `Accept-Encoding` takes gzip (`gzip` or `*`, without `q=0`).
fn takes_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// A strong validator: the first 16 bytes of the body's SHA-256, in hex,
/// then `suffix` (the coding's).
fn etag(body: &[u8], suffix: &str) -> HeaderValue {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let hex: String = digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    HeaderValue::from_str(&format!("\"{hex}{suffix}\"")).expect("hex is a valid header value")
}

/// `body` gzipped at the best level (once per process), or `None` when
/// that saves nothing.
fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).ok()?;
    let gz = encoder.finish().ok()?;
    (gz.len() < body.len()).then_some(gz)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: axum::http::HeaderName, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    /// gzip when named or `*`, unless its quality is 0.
    #[test]
    fn gzip_is_taken_when_accepted() {
        assert!(takes_gzip(&headers(ACCEPT_ENCODING, "gzip, deflate, br")));
        assert!(takes_gzip(&headers(
            ACCEPT_ENCODING,
            "br;q=1.0, GZIP;q=0.5"
        )));
        assert!(takes_gzip(&headers(ACCEPT_ENCODING, "*")));
        assert!(!takes_gzip(&headers(ACCEPT_ENCODING, "gzip;q=0, br")));
        assert!(!takes_gzip(&headers(ACCEPT_ENCODING, "identity")));
        assert!(!takes_gzip(&HeaderMap::new()));
    }

    /// A matching (or weak-matching, or `*`) If-None-Match is fresh;
    /// another tag is not.
    #[test]
    fn if_none_match_compares_tags() {
        let tag = etag(b"x", "");
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, tag.clone());
        assert!(fresh(&h, &tag));
        let weak =
            HeaderValue::from_str(&format!("\"other\", W/{}", tag.to_str().unwrap())).unwrap();
        h.insert(IF_NONE_MATCH, weak);
        assert!(fresh(&h, &tag));
        assert!(fresh(&headers(IF_NONE_MATCH, "*"), &tag));
        assert!(!fresh(&headers(IF_NONE_MATCH, "\"other\""), &tag));
        assert!(!fresh(&HeaderMap::new(), &tag));
    }

    /// Compressing a repetitive body saves; the tags of two bodies differ.
    #[test]
    fn gzip_and_etags() {
        let body = b"koo ".repeat(1000);
        let gz = gzip(&body).expect("a repetitive body compresses");
        assert!(gz.len() < body.len() / 10);
        assert_eq!(gzip(b""), None);
        assert_ne!(etag(b"a", ""), etag(b"b", ""));
        assert_ne!(etag(b"a", ""), etag(b"a", "-gz"));
        assert_eq!(etag(b"a", ""), etag(b"a", ""));
    }
}
