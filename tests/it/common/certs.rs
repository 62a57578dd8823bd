//! Certificates for the TLS tests, made with rcgen: a CA, a server
//! certificate for 127.0.0.1 and localhost, client certificates (SAN URI),
//! and the bad ones a server must refuse (another CA's, an expired one).
//! [`CertDir`] writes them as PEM files, as an operator would mount them.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pair {
    /// The certificate's DER (what a TLS client sees).
    pub fn der(&self) -> Vec<u8> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(self.cert.as_bytes())
            .expect("PEM certificate")
            .to_vec()
    }
}

/// A certificate authority.
pub struct Ca {
    /// Its certificate, PEM.
    pub cert: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            cert,
            issuer: Issuer::new(params, key),
        }
    }

    fn sign(&self, mut params: CertificateParams, cn: &str) -> Pair {
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost, its CN `cn` (tells
    /// two apart after a rotation).
    pub fn server(&self, cn: &str) -> Pair {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, cn)
    }

    /// A client certificate whose identity is the SAN URI `uri`.
    pub fn client(&self, uri: &str) -> Pair {
        self.sign(client_params(uri), "koo-test-client")
    }

    /// A server certificate (as [`Ca::server`]) valid only in 2020.
    pub fn expired_server(&self) -> Pair {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(params, "koo-expired-server")
    }

    /// A client certificate valid only in 2020.
    pub fn expired_client(&self, uri: &str) -> Pair {
        let mut params = client_params(uri);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(params, "koo-expired-client")
    }
}

fn client_params(uri: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// PEM files in a temporary directory.
pub struct CertDir {
    dir: tempfile::TempDir,
}

impl CertDir {
    /// An empty directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The path of `name` in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` (atomically, by rename, as a secret mount
    /// swaps files) and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write PEM");
        std::fs::rename(&tmp, &path).expect("rename PEM");
        path
    }

    /// Writes a pair as `<name>.crt` and `<name>.key`; returns both paths.
    pub fn write_pair(&self, name: &str, pair: &Pair) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.crt"), &pair.cert),
            self.write(&format!("{name}.key"), &pair.key),
        )
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
