//! The server's TLS: its certificate and key, and the CA that client
//! certificates must chain to (mTLS), each re-read when its files change.
//!
//! The certificate lives in a slot that a [`ResolvesServerCert`] reads at
//! each handshake, so a rotated certificate (cert-manager, Vault) reaches the
//! next connection while open connections keep the one they negotiated. The
//! client CA is part of the verifier, which rustls fixes per
//! [`ServerConfig`]; a new CA therefore builds a new config (sharing the
//! certificate slot) that the next handshake takes. A new pair or CA that
//! does not load is logged and the previous one kept: a half-written
//! rotation must not take koo down. At start-up, the same errors are fatal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// `KOO_TLS_*`: where the certificate, key and client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CAs that sign client certificates; set, a client
    /// certificate is required.
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// Why a certificate, key or CA could not be used; each names its setting
/// (`KOO_TLS_CERT`, `KOO_TLS_KEY`, `KOO_TLS_CLIENT_CA`).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("{variable}: cannot read {path}: {source}")]
    Read {
        /// The setting naming the file.
        variable: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable PEM of the kind expected.
    #[error("{variable}: {path}: {reason}")]
    Parse {
        /// The setting naming the file.
        variable: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refuses the pair or the CA (a key that does not match its
    /// certificate, say).
    #[error("{variable}: {what}: {reason}")]
    Rejected {
        /// The settings naming the files.
        variable: &'static str,
        /// Which files.
        what: String,
        /// rustls' reason.
        reason: String,
    },
}

/// The settings, as [`TlsError`] names them.
const CERT: &str = "KOO_TLS_CERT";
const KEY: &str = "KOO_TLS_KEY";
const CLIENT_CA: &str = "KOO_TLS_CLIENT_CA";

/// The ring provider: the one crypto provider of the binary (redis' rustls
/// and tonic's use the process default, which `main` installs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider())
}

/// Installs ring as the process default provider, once; later calls (tests
/// starting several servers) do nothing.
pub fn install_default_provider() {
    let _ = ring_provider().install_default();
}

/// rustls 0.23.48 deprecates ring's provider because it lacks post-quantum
/// key exchange (aws-lc-rs has it); koo stays on ring, the provider tonic's
/// `tls-ring` and redis' rustls are built with, so the binary has one.
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate handed to the next handshake. A std lock: held only to
/// clone an `Arc`, never across an await.
#[derive(Debug)]
struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The server's TLS configuration, reloadable. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    settings: TlsSettings,
    certs: Arc<CertSlot>,
    /// The configs the next handshake uses, for gRPC (ALPN `h2`) and for
    /// the HTTP listener (`h2` and `http/1.1`), replaced together when the
    /// client CA changes. A std lock, as above.
    config: Arc<RwLock<Configs>>,
    /// Whether this handle serves the HTTP listener's ALPN.
    http1: bool,
}

/// The gRPC and HTTP configs of one certificate and client CA.
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

impl Configs {
    fn build(certs: &Arc<CertSlot>, verifier: Option<Arc<dyn ClientCertVerifier>>) -> Self {
        Self {
            grpc: build_config(certs.clone(), verifier.clone(), &[b"h2"]),
            http: build_config(certs.clone(), verifier, &[b"h2", b"http/1.1"]),
        }
    }
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Tls {
    /// Loads the files; any error stops start-up.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let pair = load_pair(&settings.cert, &settings.key)?;
        warn_if_expiring(&settings.cert, &pair, now_secs());
        let certs = Arc::new(CertSlot(RwLock::new(Arc::new(pair))));
        let verifier = settings
            .client_ca
            .as_deref()
            .map(load_verifier)
            .transpose()?;
        let config = Configs::build(&certs, verifier);
        Ok(Self {
            settings,
            certs,
            config: Arc::new(RwLock::new(config)),
            http1: false,
        })
    }

    /// The same certificate and client CA (and their reloads) for the HTTP
    /// listener, whose clients (Prometheus, curl, browsers) may speak only
    /// HTTP/1.1: ALPN offers `http/1.1` besides `h2`.
    pub fn for_http(&self) -> Self {
        Self {
            http1: true,
            ..self.clone()
        }
    }

    /// Whether client certificates are required.
    pub fn mutual(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let configs = self.config.read().unwrap_or_else(|e| e.into_inner());
        let config = if self.http1 {
            &configs.http
        } else {
            &configs.grpc
        };
        tokio_rustls::TlsAcceptor::from(config.clone())
    }

    /// Polls the files until `stop`, applying changes (see the module doc).
    pub fn spawn_reloads(
        &self,
        background: &mut tokio::task::JoinSet<()>,
        stop: &CancellationToken,
    ) {
        let every = self.settings.reload_interval;
        let this = self.clone();
        background.spawn(crate::reload::watch(
            "TLS certificate",
            vec![self.settings.cert.clone(), self.settings.key.clone()],
            every,
            stop.clone(),
            Arc::new(move || this.reload_pair()),
        ));
        let this = self.clone();
        let stopped = stop.clone();
        background.spawn(async move {
            // a certificate nobody rotates expires while koo runs: said
            // again twice a day, from two weeks before
            let mut every = tokio::time::interval(EXPIRY_CHECK_EVERY);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = every.tick() => {}
                }
                let pair = this
                    .certs
                    .0
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                warn_if_expiring(&this.settings.cert, &pair, now_secs());
            }
        });
        if let Some(ca) = self.settings.client_ca.clone() {
            let this = self.clone();
            background.spawn(crate::reload::watch(
                "TLS client CA",
                vec![ca],
                every,
                stop.clone(),
                Arc::new(move || this.reload_client_ca()),
            ));
        }
    }

    fn reload_pair(&self) {
        match load_pair(&self.settings.cert, &self.settings.key) {
            Ok(pair) => {
                warn_if_expiring(&self.settings.cert, &pair, now_secs());
                *self.certs.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded: new connections get it");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificate not reloaded: keeping the previous one")
            }
        }
    }

    fn reload_client_ca(&self) {
        let Some(ca) = &self.settings.client_ca else {
            return;
        };
        match load_verifier(ca) {
            Ok(verifier) => {
                let configs = Configs::build(&self.certs, Some(verifier));
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = configs;
                tracing::info!(ca = %ca.display(), "TLS client CA reloaded: new connections are verified against it");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS client CA not reloaded: keeping the previous one")
            }
        }
    }
}

/// TLS 1.2 and 1.3, the ALPN protocols `alpn`, the slot's certificate, and
/// client certificates required when there is a verifier.
fn build_config(
    certs: Arc<CertSlot>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    alpn: &[&[u8]],
) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// How often a running koo looks at its certificate's expiry again.
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(12 * 3600);
/// How far ahead of this host's clock a new certificate's start may be
/// without a notice (the issuer's clock, a little ahead).
const CLOCK_SKEW: i64 = 300;
/// From how long before its expiry a certificate is warned about.
const EXPIRY_WARNING: i64 = 14 * 24 * 3600;

fn now_secs() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// How the leaf certificate of `pair` stands at `now` (Unix seconds): the
/// line to log when clients would refuse it or soon will; `None` when it is
/// valid for longer than [`EXPIRY_WARNING`] (or cannot be parsed: rustls
/// accepted it, clients judge it).
fn expiry_notice(pair: &CertifiedKey, now: i64) -> Option<(tracing::Level, String)> {
    let leaf = pair.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let validity = cert.validity();
    let (from, until) = (validity.not_before, validity.not_after);
    let days = |secs: i64| match secs.unsigned_abs().div_ceil(86_400) {
        1 => "1 day".to_owned(),
        n => format!("{n} days"),
    };
    // a certificate issued a moment ago on a clock a little ahead
    if now + CLOCK_SKEW < from.timestamp() {
        Some((
            tracing::Level::ERROR,
            format!("is not valid yet (from {from}): clients refuse it until then"),
        ))
    } else if now >= until.timestamp() {
        Some((
            tracing::Level::ERROR,
            format!(
                "expired on {until} ({} ago): clients refuse it; rotate it (koo reloads it)",
                days(now - until.timestamp())
            ),
        ))
    } else if until.timestamp() - now <= EXPIRY_WARNING {
        Some((
            tracing::Level::WARN,
            format!(
                "expires on {until} (in {}): rotate it (koo reloads it)",
                days(until.timestamp() - now)
            ),
        ))
    } else {
        None
    }
}

/// Logs [`expiry_notice`], naming the file.
fn warn_if_expiring(path: &Path, pair: &CertifiedKey, now: i64) {
    let Some((level, notice)) = expiry_notice(pair, now) else {
        return;
    };
    let path = path.display();
    if level == tracing::Level::ERROR {
        tracing::error!("TLS certificate {path} (KOO_TLS_CERT) {notice}");
    } else {
        tracing::warn!("TLS certificate {path} (KOO_TLS_CERT) {notice}");
    }
}

fn read(variable: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        variable,
        path: path.to_owned(),
        source,
    })
}

fn parse_err(variable: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Parse {
        variable,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The certificate chain and its key, checked to match.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(CERT, cert)?;
    let key_der = PrivateKeyDer::from_pem_slice(&read(KEY, key)?)
        .map_err(|e| parse_err(KEY, key, format!("no usable PEM private key ({e})")))?;
    CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Rejected {
        variable: "KOO_TLS_CERT/KOO_TLS_KEY",
        what: format!("{} with {}", cert.display(), key.display()),
        reason: e.to_string(),
    })
}

fn load_certs(
    variable: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(variable, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err(variable, path, format!("bad PEM certificate ({e})")))?;
    if certs.is_empty() {
        return Err(parse_err(variable, path, "no PEM certificate"));
    }
    Ok(certs)
}

/// A verifier requiring a client certificate chained to the CAs of `path`
/// (and valid now: expired certificates are refused).
fn load_verifier(path: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let rejected = |e: &dyn std::fmt::Display| TlsError::Rejected {
        variable: CLIENT_CA,
        what: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    for cert in load_certs(CLIENT_CA, path)? {
        roots.add(cert).map_err(|e| rejected(&e))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| rejected(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair valid from `from` to `until` (days of 2030).
    fn pair(from: u8, until: u8) -> CertifiedKey {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2030, 1, from);
        params.not_after = rcgen::date_time_ymd(2030, 1, until);
        let cert = params.self_signed(&key).unwrap();
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        CertifiedKey::from_der(vec![cert.der().clone()], key_der, &provider()).unwrap()
    }

    #[test]
    fn a_certificate_is_warned_about_before_and_after_it_expires() {
        // the 15th of January 2030
        let now = rcgen::date_time_ymd(2030, 1, 15).unix_timestamp();
        let notice = |from, until| expiry_notice(&pair(from, until), now);
        assert_eq!(notice(1, 31), None);
        let (level, soon) = notice(1, 18).unwrap();
        assert_eq!(level, tracing::Level::WARN);
        assert!(soon.contains("in 3 days"), "{soon}");
        let (level, gone) = notice(1, 13).unwrap();
        assert_eq!(level, tracing::Level::ERROR);
        assert!(gone.contains("2 days ago"), "{gone}");
        let (level, early) = notice(16, 31).unwrap();
        assert_eq!(level, tracing::Level::ERROR);
        assert!(early.contains("not valid yet"), "{early}");
    }

    #[test]
    fn each_error_names_its_setting() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let settings = |cert, key, client_ca| TlsSettings {
            cert,
            key,
            client_ca,
            reload_interval: Duration::from_secs(5),
        };
        let (cert, key) = (
            write("c.pem", &cert.pem()),
            write("k.pem", &key.serialize_pem()),
        );
        let junk = write("junk.pem", "not a certificate");
        let missing = dir.path().join("missing.pem");
        let error = |s| Tls::load(s).map(|_| ()).unwrap_err().to_string();
        let cases = [
            (settings(junk.clone(), key.clone(), None), "KOO_TLS_CERT: "),
            (
                settings(cert.clone(), missing, None),
                "KOO_TLS_KEY: cannot read",
            ),
            (settings(cert.clone(), junk.clone(), None), "KOO_TLS_KEY: "),
            (settings(cert, key, Some(junk)), "KOO_TLS_CLIENT_CA: "),
        ];
        for (settings, start) in cases {
            let said = error(settings);
            assert!(said.starts_with(start), "{said}");
        }
    }
}
