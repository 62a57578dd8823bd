//! The decision for one call: which RPC, who calls (a bearer key, else the
//! mTLS peer's identity), and whether their role allows it. Pure: the tower
//! plumbing around it is `super::layer`.
//!
//! Three modes. Open (no keys file): every call passes, as `anonymous`, or
//! as its verified client certificate's identity with the admin role (mTLS
//! without a keys file trusts every certificate its CA signed).
//! `KOO_WORKER_TOKEN` alone: as open, except that WorkerService needs that
//! token (koo's behaviour before keys files). Keys file: every call but
//! health (and public reflection) needs a known key or principal whose role
//! allows it; the worker token is one more worker key.

use std::sync::Arc;

use super::methods::{self, Access, HEALTH_SERVICE, Method, WORKER_SERVICE};
use super::{AuthError, Caller, Keyring, Role, keys::Keys};
use crate::transport::Peer;

/// `KOO_REFLECTION`: whether server reflection is served, and to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Reflection {
    /// Served; with a keys file, to any key's holder (reader and above, or
    /// worker).
    #[default]
    On,
    /// Served to anyone, keys file or not.
    Public,
    /// Not served (UNIMPLEMENTED).
    Off,
}

/// Who may call what.
#[derive(Debug, Clone)]
enum Mode {
    Open,
    WorkerToken(Arc<Keys>),
    Keys(Keyring),
}

/// The auth decision, shared by every connection.
#[derive(Debug, Clone)]
pub struct Gate {
    mode: Mode,
    reflection: Reflection,
}

/// A call let through.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Who calls.
    pub caller: Caller,
    /// The RPC's row.
    pub method: &'static Method,
}

const HOW_KEY: &str = "`authorization: Bearer <key>` metadata (a key made by `koo auth new-key` whose digest is in KOO_AUTH_FILE)";
const HOW_KEY_OR_CERT: &str = "`authorization: Bearer <key>` metadata (a key made by `koo auth new-key` whose digest is in KOO_AUTH_FILE) or a client certificate that a [[principal]] names";
const HOW_TOKEN: &str = "`authorization: Bearer <KOO_WORKER_TOKEN>` metadata";

impl Gate {
    /// The gate of a server with `keys` (a keys file, the worker token
    /// included), or else only `worker_token`, or else neither (open).
    pub fn new(keys: Option<Keyring>, worker_token: Option<&str>, reflection: Reflection) -> Self {
        let mode = match (keys, worker_token) {
            (Some(ring), _) => Mode::Keys(ring),
            (None, Some(token)) => Mode::WorkerToken(Arc::new(Keys::worker_token(token))),
            (None, None) => Mode::Open,
        };
        Self { mode, reflection }
    }

    /// Whether reflection is served at all.
    pub fn serves_reflection(&self) -> bool {
        self.reflection != Reflection::Off
    }

    /// Decides the call to `path` with these headers and extensions (where
    /// the transport put the [`Peer`]).
    pub fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Admitted, AuthError> {
        let method = methods::find(path).ok_or_else(|| {
            AuthError::Unimplemented(format!(
                "unknown method {}",
                crate::quote::quote(path.trim_start_matches('/'))
            ))
        })?;
        let access = self.access(method)?;
        let admitted = |caller| Ok(Admitted { caller, method });
        if access == Access::Open || path.starts_with(HEALTH_SERVICE) {
            return admitted(Caller::anonymous());
        }
        let identity = extensions.get::<Peer>().and_then(|p| p.identity.clone());
        let name = || path.trim_start_matches('/').to_owned();
        match &self.mode {
            Mode::Open => admitted(trusted(identity)),
            Mode::WorkerToken(_) if !path.starts_with(WORKER_SERVICE) => {
                admitted(trusted(identity))
            }
            Mode::WorkerToken(keys) => {
                let key = bearer(headers)?.ok_or_else(|| AuthError::NoCredentials {
                    method: name(),
                    how: HOW_TOKEN,
                })?;
                admitted(keys.by_key(key).ok_or(AuthError::WrongWorkerToken)?)
            }
            Mode::Keys(ring) => {
                let caller = identify(&ring.keys(), headers, identity, name)?;
                let role = caller.role.unwrap_or(Role::Reader);
                if !access.allows(role) {
                    return Err(AuthError::Denied {
                        method: name(),
                        needed: access.label(),
                        principal: caller.principal.clone(),
                        role: role.as_str(),
                    });
                }
                admitted(caller)
            }
        }
    }

    /// What `method` needs here (reflection per `KOO_REFLECTION`).
    fn access(&self, method: &Method) -> Result<Access, AuthError> {
        Ok(match (method.access, self.reflection) {
            (Access::Reflection, Reflection::Off) => {
                return Err(AuthError::Unimplemented(
                    "server reflection is off (KOO_REFLECTION=off)".to_owned(),
                ));
            }
            (Access::Reflection, Reflection::Public) => Access::Open,
            // any key: a worker may read the schema of what it calls
            (Access::Reflection, Reflection::On) => Access::ReaderOrWorker,
            (access, _) => access,
        })
    }
}

/// The caller named by the bearer key, else by the client certificate,
/// among `keys`.
fn identify(
    keys: &Keys,
    headers: &http::HeaderMap,
    identity: Option<Arc<str>>,
    method: impl FnOnce() -> String,
) -> Result<Caller, AuthError> {
    match (bearer(headers)?, identity) {
        (Some(key), _) => keys.by_key(key).ok_or(AuthError::UnknownKey),
        (None, Some(id)) => keys
            .by_principal(&id)
            .ok_or_else(|| AuthError::UnknownPrincipal {
                identity: crate::quote::quote(&id).to_string(),
            }),
        (None, None) => Err(AuthError::NoCredentials {
            method: method(),
            how: if keys.len().1 > 0 {
                HOW_KEY_OR_CERT
            } else {
                HOW_KEY
            },
        }),
    }
}

/// The caller of an open server: its verified client certificate's identity
/// as an admin, or anonymous.
fn trusted(identity: Option<Arc<str>>) -> Caller {
    match identity {
        Some(id) => Caller {
            principal: id,
            role: Some(Role::Admin),
            ..Caller::anonymous()
        },
        None => Caller::anonymous(),
    }
}

/// The key of `authorization: Bearer <key>` (`None`: no such header). Two
/// headers are refused, whatever they hold: the first one won before, so a
/// bad key followed by a good one was refused and the other way round let
/// in.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(AuthError::Repeated);
    }
    let value = value.to_str().map_err(|_| AuthError::Malformed)?;
    match value.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty() => {
            Ok(Some(key.trim()))
        }
        _ => Err(AuthError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn gate(reflection: Reflection) -> Gate {
        let text = format!(
            "[[key]]\nname = \"r\"\nrole = \"reader\"\nsha256 = \"{}\"\n\n[[principal]]\nname = \"spiffe://prod/api\"\nrole = \"writer\"\n",
            hex::encode(super::super::keys::digest(b"reader-key"))
        );
        let keys = Keys::parse(Path::new("k"), &text, None).unwrap();
        Gate::new(Some(Keyring::new(keys)), None, reflection)
    }

    fn peer(identity: &str) -> http::Extensions {
        let mut ext = http::Extensions::new();
        ext.insert(Peer {
            identity: Some(identity.into()),
            ..Peer::default()
        });
        ext
    }

    const SET: &str = "/koo.cache.v1.CacheService/Set";
    const CLEAR: &str = "/koo.cache.v1.CacheService/ClearLevel";

    /// An mTLS peer without a bearer key is its [[principal]]: a writer may
    /// Set but not ClearLevel; an unknown certificate is UNAUTHENTICATED;
    /// without a keys file, any verified certificate is an admin.
    #[test]
    fn principals_from_peer_identity() {
        let g = gate(Reflection::On);
        let none = http::HeaderMap::new();
        let ok = g.admit(SET, &none, &peer("spiffe://prod/api")).unwrap();
        assert_eq!(&*ok.caller.principal, "spiffe://prod/api");
        assert_eq!(ok.caller.role, Some(Role::Writer));
        let err = g
            .admit(CLEAR, &none, &peer("spiffe://prod/api"))
            .unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::Denied {
                    needed: "admin",
                    role: "writer",
                    ..
                }
            ),
            "{err}"
        );
        let err = g.admit(SET, &none, &peer("spiffe://evil")).unwrap_err();
        assert!(matches!(err, AuthError::UnknownPrincipal { .. }), "{err}");
        let open = Gate::new(None, None, Reflection::On);
        let ok = open.admit(CLEAR, &none, &peer("spiffe://any")).unwrap();
        assert_eq!(ok.caller.role, Some(Role::Admin));
    }

    /// A bearer key wins over the certificate; malformed headers, unknown
    /// paths and switched-off reflection are refused.
    #[test]
    fn bearer_and_paths() {
        let g = gate(Reflection::Off);
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer reader-key".parse().unwrap());
        let ok = g
            .admit(
                "/koo.cache.v1.CacheService/Get",
                &h,
                &peer("spiffe://prod/api"),
            )
            .unwrap();
        assert_eq!(&*ok.caller.principal, "r");
        h.insert("authorization", "Basic reader-key".parse().unwrap());
        let err = g.admit(
            "/koo.cache.v1.CacheService/Get",
            &h,
            &http::Extensions::new(),
        );
        assert!(matches!(err, Err(AuthError::Malformed)));
        let mut twice = http::HeaderMap::new();
        twice.append("authorization", "Bearer reader-key".parse().unwrap());
        twice.append("authorization", "Bearer other-key".parse().unwrap());
        let err = g.admit(
            "/koo.cache.v1.CacheService/Get",
            &twice,
            &http::Extensions::new(),
        );
        assert!(matches!(err, Err(AuthError::Repeated)), "{err:?}");
        let err = g.admit("/x.Y/Z", &h, &http::Extensions::new()).unwrap_err();
        assert!(matches!(err, AuthError::Unimplemented(_)));
        let reflect = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        let err = g.admit(reflect, &h, &http::Extensions::new()).unwrap_err();
        assert!(err.to_string().contains("KOO_REFLECTION=off"), "{err}");
        let public = gate(Reflection::Public);
        assert!(
            public
                .admit(reflect, &http::HeaderMap::new(), &http::Extensions::new())
                .is_ok()
        );
    }
}
