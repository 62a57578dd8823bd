//! The dashboard's server side: its three embedded files on the HTTP
//! listener (headers, validators, gzip, `KOO_DASHBOARD=off`) and
//! AuthService.GetCaller, which the page asks to learn the caller's role,
//! over gRPC and over grpc-web. The page itself is tested in a real
//! Chromium by `web/test/` (scripts/test's dashboard stage).

use std::io::Read as _;

use crate::common;

use bytes::Bytes;
use common::auth::{ADMIN, KeysFile, READER, WORKER, WRITER, all_roles, bearer, start};
use common::rest::serve_http;
use common::serve_refused;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use koo::pb::auth::v1::auth_service_client::AuthServiceClient;
use koo::pb::auth::v1::{GetCallerRequest, GetCallerResponse, Role};
use tonic::Code;
use tower::Layer as _;

/// `GET http://{addr}{path}` with `headers`: the response, its body read.
async fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> http::Response<Bytes> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut request = http::Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Empty::new()).unwrap())
        .await
        .expect("the HTTP listener answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    http::Response::from_parts(parts, body)
}

fn header<'a>(response: &'a http::Response<Bytes>, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The committed file of `web/dist` that koo embeds.
fn dist(file: &str) -> Vec<u8> {
    std::fs::read(format!("{}/web/dist/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// `/`, `/index.html`, `/app.js` and `/app.css` are the committed files of
/// web/dist, with their types, a policy that allows the page's own origin
/// only, and a validator that answers 304; gzipped when asked (and it
/// saves), the same bytes once inflated. Served without credentials on a
/// server that requires them: the files hold no data. Other paths are 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_served_with_their_headers() {
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, http) = serve_http(&[("KOO_AUTH_FILE", path.to_str().unwrap())]);
    for (path, file, kind) in [
        ("/", "index.html", "text/html"),
        ("/index.html", "index.html", "text/html"),
        ("/app.js", "app.js", "text/javascript"),
        ("/app.css", "app.css", "text/css"),
    ] {
        let plain = get(&http, path, &[]).await;
        assert_eq!(plain.status(), 200, "{path}");
        assert!(header(&plain, "content-type").starts_with(kind), "{path}");
        assert_eq!(plain.body().as_ref(), dist(file).as_slice(), "{path}");
        let csp = header(&plain, "content-security-policy");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(header(&plain, "x-content-type-options"), "nosniff");
        assert_eq!(header(&plain, "cache-control"), "no-cache");
        assert_eq!(header(&plain, "content-encoding"), "");

        let etag = header(&plain, "etag").to_owned();
        assert!(etag.starts_with('"') && etag.len() == 34, "{path}: {etag}");
        assert_eq!(header(&plain, "vary"), "accept-encoding");
        let again = get(&http, path, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), 304, "{path}");
        assert!(again.body().is_empty(), "{path}");
        let other = get(&http, path, &[("if-none-match", "\"stale\"")]).await;
        assert_eq!(other.status(), 200, "{path}");

        // the three files compress: gzipped when asked, with a validator
        // of their own
        let zipped = get(&http, path, &[("accept-encoding", "gzip, br")]).await;
        assert_eq!(zipped.status(), 200, "{path}");
        assert_eq!(header(&zipped, "content-encoding"), "gzip", "{path}");
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(zipped.body().as_ref())
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, dist(file), "{path}");
        assert!(zipped.body().len() < inflated.len(), "{path}");
        let etag_gz = header(&zipped, "etag").to_owned();
        assert_ne!(etag_gz, etag, "{path}");
        let again = get(
            &http,
            path,
            &[("accept-encoding", "gzip"), ("if-none-match", &etag_gz)],
        )
        .await;
        assert_eq!(again.status(), 304, "{path}");
    }
    assert_eq!(get(&http, "/no-such-page", &[]).await.status(), 404);
    // the data the page shows is not open: /metrics still needs a key
    assert_eq!(get(&http, "/metrics", &[]).await.status(), 401);
}

/// `KOO_DASHBOARD=off`: the page and its files are 404, /metrics stays;
/// a value other than on/off stops koo naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_off_and_bad_values() {
    let (_koo, http) = serve_http(&[("KOO_DASHBOARD", "off")]);
    for path in ["/", "/index.html", "/app.js", "/app.css"] {
        assert_eq!(get(&http, path, &[]).await.status(), 404, "{path}");
    }
    assert_eq!(get(&http, "/metrics", &[]).await.status(), 200);
    let stderr = serve_refused("KOO_DASHBOARD", "sometimes");
    assert!(stderr.contains("neither `on` nor `off`"), "{stderr}");
}

async fn caller(
    server: &common::TestServer,
    key: Option<&str>,
) -> Result<GetCallerResponse, tonic::Status> {
    AuthServiceClient::with_interceptor(server.channel.clone(), bearer(key))
        .get_caller(GetCallerRequest {})
        .await
        .map(tonic::Response::into_inner)
}

/// Each key's principal and role; no key or an unknown one is
/// UNAUTHENTICATED (so a client can test a key with it); an open koo says
/// anonymous, admin, no credentials required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_caller_names_principal_and_role() {
    let keys = KeysFile::new(&all_roles());
    let koo = start(&keys.path(), |_| {}).await;
    for (key, principal, role) in [
        (READER, "ci-reader", Role::Reader),
        (WRITER, "ci-writer", Role::Writer),
        (ADMIN, "ci-admin", Role::Admin),
        (WORKER, "ci-worker", Role::Worker),
    ] {
        let me = caller(&koo.server, Some(key)).await.unwrap();
        assert_eq!(me.principal, principal);
        assert_eq!(me.role(), role, "{principal}");
        assert!(me.auth_required);
        assert_eq!(me.server_version, env!("CARGO_PKG_VERSION"));
    }
    for key in [None, Some("koo_not-a-key")] {
        let refused = caller(&koo.server, key).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{key:?}");
    }
    koo.server.shutdown().await;

    let open = common::tasks::start_on_with(common::tasks::Backend::Memory, 0, |s| {
        s.schedule.enabled = false;
    })
    .await;
    let me = caller(&open.server, None).await.unwrap();
    assert_eq!(
        (me.principal.as_str(), me.role(), me.auth_required),
        ("anonymous", Role::Admin, false)
    );
    open.server.shutdown().await;
}

/// What the page does: GetCaller over grpc-web on the HTTP listener, with
/// a reader's key and without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_caller_over_grpc_web() {
    let keys = KeysFile::new(&all_roles());
    let path = keys.path();
    let (_koo, http) = serve_http(&[("KOO_AUTH_FILE", path.to_str().unwrap())]);
    let web = tonic_web::GrpcWebClientLayer::new()
        .layer(Client::builder(TokioExecutor::new()).build_http());
    let origin: http::Uri = format!("http://{http}").parse().unwrap();
    let mut client = AuthServiceClient::with_origin(web, origin);
    let mut request = tonic::Request::new(GetCallerRequest {});
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {READER}").parse().unwrap());
    let me = client.get_caller(request).await.unwrap().into_inner();
    assert_eq!(
        (me.principal.as_str(), me.role()),
        ("ci-reader", Role::Reader)
    );
    let refused = client.get_caller(GetCallerRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}
