//! The seed's REST API on the HTTP listener: each path is an RPC's
//! `google.api.http` rule in the protos (declared once, there), transcoded
//! at run time from the compiled descriptors, and sent as a real gRPC call
//! through the same layered service as the gRPC port's calls, so that
//! authentication, roles, metrics, load shedding and deadlines apply to a
//! REST call exactly as to any other.
//!
//! - [`routes`]: the route table, read from the descriptors.
//! - [`transcode`]: JSON, path and query to a request message; a reply to
//!   JSON (the proto3 JSON mapping).
//! - [`handler`]: one request: body limit, the in-process gRPC call, the
//!   reply.
//! - [`error`]: HTTP statuses from gRPC codes, errors as `google.rpc.Status`
//!   JSON.
//!
//! Streaming RPCs have no REST path.

mod error;
mod handler;
mod routes;
mod transcode;

pub(crate) use self::error::http_status;

use std::collections::BTreeMap;

use crate::auth::gate::Gate;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::routing::{MethodFilter, MethodRouter, on};
use prost_reflect::{DescriptorError, DescriptorPool};

/// koo's descriptors and the google.rpc types (for error details).
fn pool() -> Result<DescriptorPool, DescriptorError> {
    let mut pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET)?;
    pool.decode_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)?;
    Ok(pool)
}

/// The REST paths, answered by calls to `grpc` (koo's layered gRPC service);
/// request bodies over `max_body` bytes are refused with 413. `gate` is the
/// call layers' own: a request it refuses is not read (the call refuses it).
pub(crate) fn router<S>(grpc: S, max_body: usize, gate: Gate) -> Router
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    // the descriptors are compiled in and the rules checked by this
    // module's tests: a failure here is a build's bug
    let pool = Arc::new(pool().expect("koo's compiled descriptors decode"));
    let table = routes::routes(&pool)
        .expect("koo's google.api.http rules are servable (see the unit tests)");
    let mut paths: BTreeMap<String, MethodRouter> = BTreeMap::new();
    for route in table {
        let template = route.template.clone();
        let filter = MethodFilter::try_from(route.verb.clone())
            .expect("the route table holds get, put, post, delete and patch only");
        let call = handler::Call {
            route: Arc::new(route),
            pool: pool.clone(),
            max_body,
            gate: gate.clone(),
        };
        let grpc = grpc.clone();
        let handle = move |request: axum::extract::Request| {
            let call = call.clone();
            let grpc = grpc.clone();
            async move { call.handle(grpc, request).await }
        };
        let methods = paths.remove(&template).unwrap_or_default();
        paths.insert(template, methods.merge(on(filter, handle)));
    }
    let unknown = move |request: axum::extract::Request| async move {
        error::RestError::not_found(format!(
            "no REST path {} {}",
            request.method(),
            crate::quote::quote(request.uri().path())
        ))
        .into_response(&pool)
    };
    paths
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(&path, methods)
        })
        // a JSON 404 under /api/, in the errors' shape, rather than an empty one
        .route("/api/{*rest}", axum::routing::any(unknown))
}
