//! The start-up warnings for a koo reachable beyond its host without the
//! protection its settings suggest: a non-loopback listener with neither
//! TLS nor authentication (anyone on the network can drive it), or with
//! keys but no TLS (the keys cross the network readable). koo still starts
//! (a private network, or a proxy that terminates TLS, may be trusted), but
//! says so loudly.

use std::net::SocketAddr;

/// What a non-loopback listener lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Plaintext and no authentication: anyone who reaches it drives koo.
    Open,
    /// Authentication, but plaintext: bearer keys, task arguments and
    /// cached values can be read (and keys replayed) on the way.
    Plaintext,
}

/// What serving on `listen` exposes beyond this host, if anything.
pub fn exposure(listen: SocketAddr, tls: bool, auth: bool) -> Option<Exposure> {
    match (listen.ip().is_loopback(), tls, auth) {
        (true, _, _) | (false, true, _) => None,
        (false, false, false) => Some(Exposure::Open),
        (false, false, true) => Some(Exposure::Plaintext),
    }
}

/// Logs the warning for [`exposure`]; `setting` names the listener
/// (`KOO_LISTEN`, or `KOO_HTTP_LISTEN`, whose REST and grpc-web routes
/// reach every service just as the gRPC port does).
pub fn warn_if_exposed(setting: &str, listen: SocketAddr, tls: bool, auth: bool) {
    match exposure(listen, tls, auth) {
        Some(Exposure::Open) => tracing::warn!(
            %listen,
            setting,
            "SECURITY: koo listens on a non-loopback address ({setting}) in PLAINTEXT and WITHOUT \
             AUTHENTICATION: anyone who reaches this port can clear the cache, cancel every task \
             and run any task. Set KOO_TLS_CERT/KOO_TLS_KEY (and KOO_TLS_CLIENT_CA) and \
             KOO_AUTH_FILE, or listen on 127.0.0.1"
        ),
        Some(Exposure::Plaintext) => tracing::warn!(
            %listen,
            setting,
            "SECURITY: koo listens on a non-loopback address ({setting}) in PLAINTEXT: API keys \
             (KOO_AUTH_FILE), task arguments and cached values cross the network readable, and a \
             key seen on the way can be replayed. Set KOO_TLS_CERT/KOO_TLS_KEY; expected only \
             where a proxy or service mesh in front of koo terminates TLS"
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{Exposure, exposure};

    /// Loopback is never exposed; any other address is open without TLS
    /// and authentication, readable with authentication alone, and neither
    /// with TLS.
    #[test]
    fn exposure_decision() {
        let any: std::net::SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lan: std::net::SocketAddr = "10.1.2.3:50051".parse().unwrap();
        let v6_any: std::net::SocketAddr = "[::]:50051".parse().unwrap();
        for local in ["127.0.0.1:50051", "[::1]:50051", "127.0.0.2:1"] {
            assert_eq!(
                exposure(local.parse().unwrap(), false, false),
                None,
                "{local}"
            );
        }
        for addr in [any, lan, v6_any] {
            assert_eq!(exposure(addr, false, false), Some(Exposure::Open), "{addr}");
            assert_eq!(exposure(addr, true, false), None, "{addr} with TLS");
            assert_eq!(exposure(addr, true, true), None, "{addr} with both");
            assert_eq!(
                exposure(addr, false, true),
                Some(Exposure::Plaintext),
                "{addr} with auth alone"
            );
        }
    }
}
