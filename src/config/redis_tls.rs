//! The Redis TLS settings: one CA file and one optional client certificate
//! for every Redis koo talks to (the cache's, the tasks', and those of
//! `koo worker` and `koo scheduler`), read and checked at start-up so that
//! a missing file or a bad PEM stops koo naming the setting.

use std::path::{Path, PathBuf};

use clap::Args;

use super::ConfigError;
use crate::store::redis::{RedisTls, TlsPart};

/// TLS for `rediss://` URLs.
#[derive(Debug, Default, Args)]
pub struct RedisTlsArgs {
    /// CA bundle (PEM) that Redis's certificate must chain to, for
    /// `rediss://` URLs [default: the system's roots].
    #[arg(long, env = "KOO_REDIS_TLS_CA", value_name = "KOO_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM chain) for a Redis that requires one
    /// (`tls-auth-clients yes`); with KOO_REDIS_TLS_KEY.
    #[arg(long, env = "KOO_REDIS_TLS_CERT", value_name = "KOO_REDIS_TLS_CERT")]
    pub redis_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of KOO_REDIS_TLS_CERT.
    #[arg(long, env = "KOO_REDIS_TLS_KEY", value_name = "KOO_REDIS_TLS_KEY")]
    pub redis_tls_key: Option<PathBuf>,
}

impl RedisTlsArgs {
    /// The first of the settings given (not empty), to name it.
    pub fn first_set(&self) -> Option<&'static str> {
        [
            ("KOO_REDIS_TLS_CA", &self.redis_tls_ca),
            ("KOO_REDIS_TLS_CERT", &self.redis_tls_cert),
            ("KOO_REDIS_TLS_KEY", &self.redis_tls_key),
        ]
        .into_iter()
        .find(|(_, p)| p.as_deref().is_some_and(|p| !p.as_os_str().is_empty()))
        .map(|(name, _)| name)
    }

    /// Reads and checks the files; `None` when none is set.
    pub fn load(&self) -> Result<Option<RedisTls>, ConfigError> {
        let read = |variable: &'static str, path: &Option<PathBuf>| {
            path.as_deref()
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| read_file(variable, p))
                .transpose()
        };
        let ca = read("KOO_REDIS_TLS_CA", &self.redis_tls_ca)?;
        let cert = read("KOO_REDIS_TLS_CERT", &self.redis_tls_cert)?;
        let key = read("KOO_REDIS_TLS_KEY", &self.redis_tls_key)?;
        let tls = RedisTls::from_pem(ca, cert, key).map_err(|e| ConfigError {
            variable: match e.part {
                TlsPart::Ca => "KOO_REDIS_TLS_CA",
                TlsPart::Cert => "KOO_REDIS_TLS_CERT",
                TlsPart::Key => "KOO_REDIS_TLS_KEY",
            },
            reason: e.reason,
        })?;
        Ok(tls.is_set().then_some(tls))
    }
}

fn read_file(variable: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError {
        variable,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}
