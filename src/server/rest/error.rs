//! REST errors: an HTTP status from the gRPC code (grpc-gateway's table)
//! and a `google.rpc.Status` as JSON (`{"code", "message", "details"}`),
//! whether the RPC refused the call or the request never became one.

use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use tonic::Code;

use super::transcode::to_json;

/// The `google.rpc.Status` message, whose descriptor is in the pool.
const RPC_STATUS: &str = "google.rpc.Status";

/// A request that ends in an error.
#[derive(Debug, Clone)]
pub(crate) struct RestError {
    /// The HTTP status.
    pub http: StatusCode,
    /// The gRPC code.
    pub code: Code,
    /// What went wrong.
    pub message: String,
    /// The encoded `google.rpc.Status` of a refusal with details (empty
    /// otherwise).
    pub details: bytes::Bytes,
}

impl RestError {
    /// 400, INVALID_ARGUMENT: a request that does not make a message.
    pub(crate) fn bad_request(message: String) -> Self {
        Self::from_code(Code::InvalidArgument, message)
    }

    /// 413, RESOURCE_EXHAUSTED (what gRPC answers a message over its limit).
    pub(crate) fn too_large(limit: usize) -> Self {
        Self {
            http: StatusCode::PAYLOAD_TOO_LARGE,
            ..Self::from_code(
                Code::ResourceExhausted,
                format!("the request body is over {limit} bytes (KOO_MAX_MESSAGE_SIZE)"),
            )
        }
    }

    /// 404, NOT_FOUND: a path under `/api/` that no rule declares.
    pub(crate) fn not_found(message: String) -> Self {
        Self::from_code(Code::NotFound, message)
    }

    /// 500, INTERNAL: a reply koo could not read (a bug).
    pub(crate) fn internal(message: String) -> Self {
        Self::from_code(Code::Internal, message)
    }

    /// The error of a gRPC status.
    pub(crate) fn from_status(status: &tonic::Status) -> Self {
        Self {
            details: status.details().to_vec().into(),
            ..Self::from_code(status.code(), status.message().to_owned())
        }
    }

    fn from_code(code: Code, message: String) -> Self {
        Self {
            http: http_status(code),
            code,
            message,
            details: bytes::Bytes::new(),
        }
    }

    /// The JSON body: the status's details decoded with `pool` (which has
    /// the google.rpc types), else code and message alone.
    pub(crate) fn into_response(self, pool: &DescriptorPool) -> Response {
        let body = pool
            .get_message_by_name(RPC_STATUS)
            .and_then(|desc| {
                let mut status = DynamicMessage::decode(desc.clone(), self.details.clone())
                    .unwrap_or_else(|_| DynamicMessage::new(desc));
                // the trailer's code and message are authoritative
                status.set_field_by_name("code", Value::I32(self.code as i32));
                status.set_field_by_name("message", Value::String(self.message.clone()));
                to_json(&status).ok()
            })
            .unwrap_or_else(|| {
                serde_json::json!({
                    "code": self.code as i32,
                    "message": self.message,
                    "details": [],
                })
                .to_string()
                .into_bytes()
            });
        (self.http, [(CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// The HTTP status of a gRPC code: grpc-gateway's `HTTPStatusFromCode`.
pub(crate) fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        // nginx's "client closed request"
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal with details keeps them, as JSON with their `@type`.
    #[test]
    fn details_as_json() {
        let pool = super::super::pool().unwrap();
        let status = <tonic::Status as tonic_types::StatusExt>::with_error_details(
            Code::InvalidArgument,
            "bad",
            tonic_types::ErrorDetails::with_bad_request_violation("key", "is empty"),
        );
        let e = RestError::from_status(&status);
        assert_eq!(e.http, StatusCode::BAD_REQUEST);
        let response = e.into_response(&pool);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 3);
        assert_eq!(v["message"], "bad");
        assert_eq!(
            v["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(v["details"][0]["field_violations"][0]["field"], "key");
    }

    /// The table's corners.
    #[test]
    fn codes_to_statuses() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(http_status(Code::Cancelled).as_u16(), 499);
        assert_eq!(
            http_status(Code::DeadlineExceeded),
            StatusCode::GATEWAY_TIMEOUT
        );
    }
}
