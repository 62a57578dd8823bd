//! The start-up warning for a koo anyone on the network can drive: a
//! non-loopback listener with neither TLS nor authentication. koo still
//! starts (a private network may be trusted), but says so loudly.

use std::net::SocketAddr;

/// Whether serving on `listen` exposes an unauthenticated, plaintext API
/// beyond this host.
pub fn is_exposed(listen: SocketAddr, tls: bool, auth: bool) -> bool {
    !listen.ip().is_loopback() && !tls && !auth
}

/// Logs the warning when [`is_exposed`]; `setting` names the listener
/// (`KOO_LISTEN`, or `KOO_HTTP_LISTEN`, whose REST and grpc-web routes
/// reach every service just as the gRPC port does).
pub fn warn_if_exposed(setting: &str, listen: SocketAddr, tls: bool, auth: bool) {
    if is_exposed(listen, tls, auth) {
        tracing::warn!(
            %listen,
            setting,
            "SECURITY: koo listens on a non-loopback address ({setting}) in PLAINTEXT and WITHOUT \
             AUTHENTICATION: anyone who reaches this port can clear the cache, cancel every task \
             and run any task. Set KOO_TLS_CERT/KOO_TLS_KEY (and KOO_TLS_CLIENT_CA) and \
             KOO_AUTH_FILE, or listen on 127.0.0.1"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::is_exposed;

    /// Loopback is never exposed; any other address is, unless TLS or
    /// authentication is configured.
    #[test]
    fn exposure_decision() {
        let any: std::net::SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lan: std::net::SocketAddr = "10.1.2.3:50051".parse().unwrap();
        let v6_any: std::net::SocketAddr = "[::]:50051".parse().unwrap();
        for local in ["127.0.0.1:50051", "[::1]:50051", "127.0.0.2:1"] {
            assert!(!is_exposed(local.parse().unwrap(), false, false), "{local}");
        }
        for addr in [any, lan, v6_any] {
            assert!(is_exposed(addr, false, false), "{addr}");
            assert!(!is_exposed(addr, true, false), "{addr} with TLS");
            assert!(!is_exposed(addr, false, true), "{addr} with auth");
        }
    }
}
