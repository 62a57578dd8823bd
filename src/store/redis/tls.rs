//! TLS material for `rediss://` connections: a CA to verify Redis with
//! (instead of the system roots) and a client certificate for a Redis that
//! requires one (`tls-auth-clients yes`).
//!
//! The PEM is read and checked once, at start-up, so that a missing file or
//! a bad PEM stops koo naming what is wrong instead of surfacing as a failed
//! connection later. The redis crate builds the rustls client from it with
//! the process's crypto provider (ring, the only one compiled in) and
//! verifies Redis's certificate and host name; koo never turns that off.

use std::fmt;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which part of the TLS material is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPart {
    /// The CA bundle.
    Ca,
    /// The client certificate chain.
    Cert,
    /// The client private key.
    Key,
}

/// TLS material that cannot be used; never quotes the PEM itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TlsError {
    /// The part at fault.
    pub part: TlsPart,
    /// What is wrong with it.
    pub reason: String,
}

/// A client certificate chain and its key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

/// Checked TLS material for every Redis connection koo makes.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA bundle (PEM); `None` trusts the system roots.
    ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, for Redis servers that require one.
    client: Option<ClientIdentity>,
}

impl fmt::Debug for RedisTls {
    /// Says what is set, never the material (the key is a secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Checks the PEM of a CA bundle and of a client certificate and key
    /// (both or neither).
    pub fn from_pem(
        ca_pem: Option<Vec<u8>>,
        cert_pem: Option<Vec<u8>>,
        key_pem: Option<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let err = |part, reason: String| TlsError { part, reason };
        if let Some(ca) = &ca_pem {
            let certs = certificates(ca).map_err(|e| err(TlsPart::Ca, e))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| err(TlsPart::Ca, format!("not a usable CA certificate: {e}")))?;
            }
        }
        let client = match (cert_pem, key_pem) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(err(
                    TlsPart::Key,
                    "must be set with the client certificate".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(err(TlsPart::Cert, "must be set with the client key".into()));
            }
            (Some(cert_pem), Some(key_pem)) => {
                certificates(&cert_pem).map_err(|e| err(TlsPart::Cert, e))?;
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    err(
                        TlsPart::Key,
                        format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) found: {e}"),
                    )
                })?;
                Some(ClientIdentity { cert_pem, key_pem })
            }
        };
        Ok(Self { ca_pem, client })
    }

    /// Whether anything is set (else the crate's defaults apply).
    pub fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.client.is_some()
    }

    /// The material in the redis crate's shape.
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client.as_ref().map(|c| redis::ClientTlsConfig {
                client_cert: c.cert_pem.clone(),
                client_key: c.key_pem.clone(),
            }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// Every certificate of a PEM bundle; at least one.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate in PEM form".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["koo".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }

    /// Good material is accepted; each bad part is named, and a certificate
    /// without its key (or the reverse) is refused.
    #[test]
    fn checks_each_part() {
        let (cert, key) = pair();
        let ok = RedisTls::from_pem(Some(cert.clone()), Some(cert.clone()), Some(key.clone()));
        assert!(ok.unwrap().is_set());
        assert!(!RedisTls::from_pem(None, None, None).unwrap().is_set());
        let part = |r: Result<RedisTls, TlsError>| r.unwrap_err().part;
        assert_eq!(
            part(RedisTls::from_pem(Some(b"junk".to_vec()), None, None)),
            TlsPart::Ca
        );
        assert_eq!(
            part(RedisTls::from_pem(None, Some(cert.clone()), None)),
            TlsPart::Key
        );
        assert_eq!(
            part(RedisTls::from_pem(None, None, Some(key.clone()))),
            TlsPart::Cert
        );
        assert_eq!(
            part(RedisTls::from_pem(None, Some(cert.clone()), Some(cert))),
            TlsPart::Key
        );
        assert_eq!(
            part(RedisTls::from_pem(None, Some(key.clone()), Some(key))),
            TlsPart::Cert
        );
    }

    /// Debug output never shows the key.
    #[test]
    fn debug_hides_material() {
        let (cert, key) = pair();
        let tls = RedisTls::from_pem(None, Some(cert), Some(key)).unwrap();
        let shown = format!("{tls:?}");
        assert!(!shown.contains("BEGIN"), "{shown}");
    }
}
