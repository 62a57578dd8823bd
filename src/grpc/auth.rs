//! AuthService: who koo takes the caller to be, so that the dashboard and
//! the command-line client offer only what the caller's role allows.

use tonic::{Request, Response, Status};

use crate::auth::{Caller, Role};
use crate::pb::auth::v1 as pb;
use crate::pb::auth::v1::auth_service_server::AuthService;

/// The AuthService handlers.
#[derive(Debug, Clone, Copy)]
pub struct AuthApi {
    /// Whether callers must prove who they are (KOO_AUTH_FILE, or client
    /// certificates).
    auth_required: bool,
}

impl AuthApi {
    /// The service of a koo that requires credentials (`auth_required`) or
    /// runs open.
    pub fn new(auth_required: bool) -> Self {
        Self { auth_required }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn get_caller(
        &self,
        request: Request<pb::GetCallerRequest>,
    ) -> Result<Response<pb::GetCallerResponse>, Status> {
        // the auth layer has already refused a caller without credentials
        // when they are required; the caller it admitted is in the
        // extensions. None there on a koo that requires credentials is a
        // route that skipped the layer: never answer "admin" for it.
        let caller = match request.extensions().get::<Caller>() {
            Some(caller) => caller.clone(),
            None if self.auth_required => {
                return Err(Status::unauthenticated(
                    "no authenticated caller for this call",
                ));
            }
            None => Caller::anonymous(),
        };
        Ok(Response::new(pb::GetCallerResponse {
            principal: caller.principal.to_string(),
            role: role(caller.role) as i32,
            auth_required: self.auth_required,
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }
}

/// The wire role of a caller's role; `None` (koo runs open, every call
/// allowed) is an admin's.
fn role(role: Option<Role>) -> pb::Role {
    match role {
        Some(Role::Reader) => pb::Role::Reader,
        Some(Role::Writer) => pb::Role::Writer,
        Some(Role::Admin) | None => pb::Role::Admin,
        Some(Role::Worker) => pb::Role::Worker,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call the auth layer did not see (no caller recorded) is refused on
    /// a koo that requires keys, and anonymous admin on an open one.
    #[tokio::test]
    async fn no_recorded_caller() {
        let refused = AuthApi::new(true)
            .get_caller(Request::new(pb::GetCallerRequest {}))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let open = AuthApi::new(false)
            .get_caller(Request::new(pb::GetCallerRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (open.principal.as_str(), open.role(), open.auth_required),
            ("anonymous", pb::Role::Admin, false)
        );
    }

    /// Every role maps to its own wire value; open is an admin's.
    #[test]
    fn roles_map_one_to_one() {
        assert_eq!(role(Some(Role::Reader)), pb::Role::Reader);
        assert_eq!(role(Some(Role::Writer)), pb::Role::Writer);
        assert_eq!(role(Some(Role::Admin)), pb::Role::Admin);
        assert_eq!(role(Some(Role::Worker)), pb::Role::Worker);
        assert_eq!(role(None), pb::Role::Admin);
    }
}
