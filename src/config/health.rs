//! `koo health`: the probe's flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse_positive_duration;

/// `koo health`: a probe for container health checks.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Address of the koo to ask (0.0.0.0 and [::] mean this host).
    #[arg(
        long,
        env = "KOO_LISTEN",
        value_name = "KOO_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: SocketAddr,
    /// Service to ask about; empty means the server as a whole.
    #[arg(long, default_value = "")]
    pub service: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// PEM CA that signed the server's certificate: set, the check uses TLS.
    #[arg(long, env = "KOO_HEALTH_TLS_CA", value_name = "KOO_HEALTH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires one (mTLS; with --tls-key).
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_CERT",
        value_name = "KOO_HEALTH_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_KEY",
        value_name = "KOO_HEALTH_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the server's certificate against (default: the address' host).
    #[arg(
        long,
        env = "KOO_HEALTH_TLS_SERVER_NAME",
        value_name = "KOO_HEALTH_TLS_SERVER_NAME"
    )]
    pub tls_server_name: Option<String>,
    /// API key sent as `authorization: Bearer <key>`.
    #[arg(
        long,
        env = "KOO_API_KEY",
        value_name = "KOO_API_KEY",
        hide_env_values = true
    )]
    pub key: Option<String>,
}
