//! The tower layer around koo's whole router: every call is admitted or
//! refused by the [`Gate`] before any service sees it, its [`Caller`] is put
//! in the request's extensions, and admin calls get their audit line once
//! answered.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use super::audit::{self, AuditTarget};
use super::gate::Gate;
use super::methods::Kind;
use super::revocable::Revocable;
use super::{AuthError, Caller, Recheck, methods};
use crate::transport::Peer;

/// Authenticates and authorises every call.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    /// A layer deciding with `gate`.
    pub fn new(gate: Gate) -> Self {
        Self {
            gate: Arc::new(gate),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    gate: Arc<Gate>,
}

/// The gRPC code of a response: `grpc-status` in its headers (a refusal or
/// a handler's error), else OK so far (the trailers of a success).
fn code_of<B>(response: &http::Response<B>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32)
}

/// Who an audit line names for a refused call.
fn refused_principal(e: &AuthError) -> &str {
    match e {
        AuthError::Denied { principal, .. } | AuthError::OutOfScope { principal, .. } => principal,
        _ => "(unauthenticated)",
    }
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Auth<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let admitted = self
            .gate
            .admit(path, request.headers(), request.extensions());
        let admitted = match admitted {
            Ok(a) => a,
            Err(e) => {
                let status = tonic::Status::from(e.clone());
                if let Some(m) = methods::find(path).filter(|m| m.audited()) {
                    let code = format!("{:?}", status.code());
                    audit::log(refused_principal(&e), m.path, "", &code);
                }
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        // the service polled ready is the one called; a fresh clone waits
        // for the next call
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let caller: Caller = admitted.caller;
        let revocable = self.recheck(&mut request, admitted.method, &caller);
        if !admitted.method.audited() {
            request.extensions_mut().insert(caller);
            let answer = inner.call(request);
            return match revocable {
                None => Box::pin(answer),
                Some(r) => Box::pin(async move { Ok(watched(answer.await?, r)) }),
            };
        }
        let target = AuditTarget::default();
        request.extensions_mut().insert(target.clone());
        request.extensions_mut().insert(caller.clone());
        let method = admitted.method.path;
        let answer = inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            let code = match &response {
                Ok(r) => format!("{:?}", code_of(r)),
                Err(_) => "transport error".to_owned(),
            };
            audit::log(&caller.principal, method, target.get(), &code);
            Ok(match revocable {
                None => response?,
                Some(r) => watched(response?, r),
            })
        })
    }
}

impl<S> Auth<S> {
    /// A stream outlives the keys file it was admitted by, so a keyed
    /// caller's stream is checked again while it lasts ([`Recheck`]): a
    /// worker's `Work` session checks it itself (its tasks go back first),
    /// a reader's stream through its body (the returned `Recheck`).
    fn recheck<B>(
        &self,
        request: &mut http::Request<B>,
        method: &'static methods::Method,
        caller: &Caller,
    ) -> Option<Recheck> {
        let streams = method.path == methods::WORK || method.kind == Kind::ServerStreaming;
        if !streams || caller.role.is_none() {
            return None;
        }
        let recheck = Recheck::new(
            self.gate.clone(),
            method.path,
            request.headers(),
            request.extensions().get::<Peer>(),
        );
        if method.path == methods::WORK {
            request.extensions_mut().insert(recheck);
            return None;
        }
        Some(recheck)
    }
}

/// `response`'s body ended at the first check that refuses `recheck` (a
/// refusal or an error answered at once has nothing left to end).
fn watched(
    response: http::Response<tonic::body::Body>,
    recheck: Recheck,
) -> http::Response<tonic::body::Body> {
    if response.headers().contains_key("grpc-status") {
        return response;
    }
    response.map(|body| tonic::body::Body::new(Revocable::new(body, recheck)))
}
