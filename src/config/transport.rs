//! The listener's TLS flags and the plaintext health listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args};

use super::{ConfigError, parse_positive_duration};
use crate::transport::cors::CorsOrigins;
use crate::transport::site::AllowedHosts;
use crate::transport::tls::TlsSettings;

/// `koo serve`'s TLS and health-listener flags.
#[derive(Debug, Args)]
pub struct TransportArgs {
    /// PEM certificate chain to serve gRPC over TLS (with KOO_TLS_KEY); re-read when it changes.
    #[arg(long, env = "KOO_TLS_CERT", value_name = "KOO_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of KOO_TLS_CERT; re-read when it changes.
    #[arg(long, env = "KOO_TLS_KEY", value_name = "KOO_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of CAs: set, every client must present a certificate they signed (mTLS), and
    /// its SAN URI, DNS name or CN becomes the caller's identity; re-read when it changes.
    #[arg(long, env = "KOO_TLS_CLIENT_CA", value_name = "KOO_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes.
    #[arg(long, env = "KOO_TLS_RELOAD_INTERVAL", value_name = "KOO_TLS_RELOAD_INTERVAL",
          default_value = "5s", value_parser = parse_positive_duration)]
    pub tls_reload_interval: Duration,
    /// Also serve grpc.health.v1 alone, in plaintext, on this address (for probes that cannot
    /// speak TLS, such as the kubelet's gRPC probe).
    #[arg(long, env = "KOO_HEALTH_LISTEN", value_name = "KOO_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve HTTP (Prometheus metrics at /metrics) on this address, with the same TLS as gRPC;
    /// `off` turns it off.
    #[arg(long, env = "KOO_HTTP_LISTEN", value_name = "KOO_HTTP_LISTEN",
          default_value = "127.0.0.1:50052", value_parser = parse_http_listen)]
    pub http_listen: HttpListen,
    /// Web pages on other origins that may call koo from a browser (grpc-web on both listeners,
    /// REST on the HTTP one): origins separated by commas (`https://app.example.com`), or `*` for
    /// any; unset, no CORS headers (pages koo serves itself only).
    #[arg(long, env = "KOO_CORS_ORIGINS", value_name = "KOO_CORS_ORIGINS", default_value = "",
          hide_default_value = true, value_parser = CorsOrigins::parse)]
    pub cors_origins: CorsOrigins,
    /// Host names a listener bound to loopback answers besides IP addresses and `localhost`
    /// (a proxy's public name), separated by commas; `*`: any. Others are refused, so that a web
    /// page cannot rebind its own name to 127.0.0.1 (DNS rebinding) and call koo.
    #[arg(long, env = "KOO_ALLOWED_HOSTS", value_name = "KOO_ALLOWED_HOSTS", default_value = "",
          hide_default_value = true, value_parser = AllowedHosts::parse)]
    pub allowed_hosts: AllowedHosts,
    /// The web dashboard at `/` of the HTTP listener: `on` or `off` (the page and its two files
    /// answer 404; grpc-web, REST and /metrics stay). The page holds no data: every figure it
    /// shows comes from calls that pass authentication like any other.
    #[arg(long, env = "KOO_DASHBOARD", value_name = "KOO_DASHBOARD", default_value = "on",
          action = ArgAction::Set, value_parser = parse_dashboard)]
    pub dashboard: bool,
}

/// `KOO_DASHBOARD`: `on` (true) or `off` (false), in any case.
pub(super) fn parse_dashboard(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!(
            "KOO_DASHBOARD: {:?} is neither `on` nor `off`",
            crate::quote::clip(s, 64)
        )),
    }
}

/// `KOO_HTTP_LISTEN`: an address, or `off` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

/// An address (`127.0.0.1:50052`, `[::]:0`) or `off`.
pub(super) fn parse_http_listen(s: &str) -> Result<HttpListen, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(HttpListen(None));
    }
    s.trim()
        .parse()
        .map(|a| HttpListen(Some(a)))
        .map_err(|_| format!("{s:?} is neither an address such as 127.0.0.1:50052 nor `off`"))
}

impl TransportArgs {
    /// The TLS settings, if TLS is on: certificate and key come together.
    pub fn tls(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let empty = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        match (empty(&self.tls_cert), empty(&self.tls_key)) {
            (Some(cert), Some(key)) => Ok(Some(TlsSettings {
                cert,
                key,
                client_ca: empty(&self.tls_client_ca),
                reload_interval: self.tls_reload_interval,
            })),
            (None, None) if empty(&self.tls_client_ca).is_some() => Err(ConfigError {
                variable: "KOO_TLS_CLIENT_CA",
                reason: "client certificates need TLS: set KOO_TLS_CERT and KOO_TLS_KEY too"
                    .to_owned(),
            }),
            (None, None) => Ok(None),
            (Some(_), None) | (None, Some(_)) => Err(ConfigError {
                variable: "KOO_TLS_CERT/KOO_TLS_KEY",
                reason: "TLS needs both KOO_TLS_CERT and KOO_TLS_KEY; only one is set".to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cert: Option<&str>, key: Option<&str>, ca: Option<&str>) -> TransportArgs {
        TransportArgs {
            tls_cert: cert.map(PathBuf::from),
            tls_key: key.map(PathBuf::from),
            tls_client_ca: ca.map(PathBuf::from),
            tls_reload_interval: Duration::from_secs(5),
            health_listen: None,
            http_listen: HttpListen(None),
            cors_origins: CorsOrigins::None,
            allowed_hosts: AllowedHosts::Local,
            dashboard: true,
        }
    }

    /// `off` turns the HTTP listener off; an address is taken as it is;
    /// anything else is refused with what was expected.
    #[test]
    fn http_listen_is_an_address_or_off() {
        assert_eq!(parse_http_listen("off"), Ok(HttpListen(None)));
        assert_eq!(parse_http_listen("OFF"), Ok(HttpListen(None)));
        assert_eq!(
            parse_http_listen("0.0.0.0:9090"),
            Ok(HttpListen(Some(SocketAddr::from(([0, 0, 0, 0], 9090)))))
        );
        let e = parse_http_listen("localhost").unwrap_err();
        assert!(e.contains("off"), "{e}");
    }

    /// `KOO_DASHBOARD` is `on` or `off`; anything else is refused with a
    /// bounded quote of it.
    #[test]
    fn dashboard_is_on_or_off() {
        assert_eq!(parse_dashboard("on"), Ok(true));
        assert_eq!(parse_dashboard(" OFF "), Ok(false));
        let e = parse_dashboard(&"yes".repeat(100)).unwrap_err();
        assert!(e.contains("`on`") && e.len() < 160, "{e}");
    }

    /// No TLS by default; certificate and key come together (one alone is
    /// an error naming both), and a client CA needs them.
    #[test]
    fn certificate_and_key_together() {
        assert_eq!(args(None, None, None).tls().unwrap(), None);
        let tls = args(Some("c.pem"), Some("k.pem"), Some("ca.pem"))
            .tls()
            .unwrap()
            .unwrap();
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        for (cert, key) in [(Some("c.pem"), None), (None, Some("k.pem"))] {
            let e = args(cert, key, None).tls().unwrap_err();
            assert!(e.to_string().contains("KOO_TLS_CERT"), "{e}");
            assert!(e.to_string().contains("KOO_TLS_KEY"), "{e}");
        }
        let e = args(None, None, Some("ca.pem")).tls().unwrap_err();
        assert_eq!(e.variable, "KOO_TLS_CLIENT_CA");
    }
}
