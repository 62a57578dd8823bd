//! One REST request: the body (bounded), the request message, the gRPC call
//! in process through koo's layered service, and the reply as JSON.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequestParts as _, RawPathParams, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use prost_reflect::DescriptorPool;
use tower::ServiceExt as _;

use super::error::RestError;
use super::routes::Route;
use super::transcode;
use crate::auth::gate::Gate;
use crate::transport::conn::ConnInfo;

/// The headers a REST request hands on to its call: credentials, the
/// deadline and the caller's trace context, exactly as a gRPC client would
/// send them.
const PASSED_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "grpc-timeout",
    "traceparent",
    "tracestate",
];

/// What every request of one route needs.
#[derive(Clone)]
pub(super) struct Call {
    pub route: Arc<Route>,
    pub pool: Arc<DescriptorPool>,
    pub max_body: usize,
    /// Looked at before the body is read: see [`Call::message`].
    pub gate: Gate,
}

impl Call {
    /// Answers `request` with the RPC's reply, or an error as JSON.
    pub(super) async fn handle<S>(self, grpc: S, request: Request) -> Response
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + Send,
        S::Future: Send,
    {
        match self.answer(grpc, request).await {
            Ok(json) => {
                (StatusCode::OK, [(CONTENT_TYPE, "application/json")], json).into_response()
            }
            Err(e) => e.into_response(&self.pool),
        }
    }

    /// The call's request message. A caller the gate refuses gets an empty
    /// one: the call layers then refuse it as any call (audited, counted),
    /// and koo never reads or parses a body for someone it would refuse.
    async fn message(
        &self,
        parts: &http::request::Parts,
        path: &[(String, String)],
        body: axum::body::Body,
    ) -> Result<prost_reflect::DynamicMessage, RestError> {
        let mut peer = http::Extensions::new();
        if let Some(info) = parts.extensions.get::<ConnInfo>() {
            peer.insert(info.peer.clone());
        }
        let grpc_path = self.route.grpc_path.as_str();
        if self.gate.admit(grpc_path, &parts.headers, &peer).is_err() {
            return Ok(prost_reflect::DynamicMessage::new(
                self.route.method.input(),
            ));
        }
        let body = axum::body::to_bytes(body, self.max_body)
            .await
            .map_err(|e| {
                let e = e.into_inner();
                if e.is::<http_body_util::LengthLimitError>() {
                    RestError::too_large(self.max_body)
                } else {
                    RestError::bad_request(format!("reading the body: {e}"))
                }
            })?;
        transcode::request(&self.route, path, parts.uri.query(), &body)
    }

    async fn answer<S>(&self, grpc: S, request: Request) -> Result<Vec<u8>, RestError>
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + Send,
        S::Future: Send,
    {
        let (mut parts, body) = request.into_parts();
        let path: Vec<(String, String)> = RawPathParams::from_request_parts(&mut parts, &())
            .await
            .map_err(|e| RestError::bad_request(format!("the path: {e}")))?
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let message = self.message(&parts, &path, body).await?;
        let mut call = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.route.grpc_path.as_str())
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                transcode::grpc_frame(&message),
            )))
            .map_err(|e| RestError::internal(format!("building the call: {e}")))?;
        pass_headers(&parts.headers, call.headers_mut());
        // the connection's identity (its peer, under mTLS) and whatever
        // else the listener put there, for the layers
        *call.extensions_mut() = parts.extensions;
        let Ok(response) = grpc.oneshot(call).await;
        let (head, body) = response.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|status| RestError::from_status(&status))?;
        let mut headers = head.headers;
        if let Some(trailers) = collected.trailers() {
            headers.extend(trailers.clone());
        }
        if let Some(status) = tonic::Status::from_header_map(&headers)
            && status.code() != tonic::Code::Ok
        {
            return Err(RestError::from_status(&status));
        }
        let reply = reply(&self.route, collected.to_bytes())?;
        transcode::to_json(&reply)
            .map_err(|e| RestError::internal(format!("the reply as JSON: {e}")))
    }
}

/// The reply message of a successful call.
fn reply(route: &Route, body: Bytes) -> Result<prost_reflect::DynamicMessage, RestError> {
    transcode::reply_message(route.method.output(), body)
        .map_err(|e| RestError::internal(format!("{}: {e}", route.grpc_path)))
}

/// Copies the [`PASSED_HEADERS`] of `from` into `to`.
fn pass_headers(from: &HeaderMap, to: &mut HeaderMap<HeaderValue>) {
    for name in PASSED_HEADERS {
        for value in from.get_all(name) {
            to.append(name, value.clone());
        }
    }
}
