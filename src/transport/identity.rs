//! A verified client certificate's identity: what mTLS makes the caller's
//! principal. The first SAN URI (a SPIFFE ID, say) names a workload most
//! precisely, then the first SAN DNS name, then the subject's CN for
//! certificates made before SANs were the rule.

use x509_parser::extensions::GeneralName;

/// The identity of a DER certificate; `None` when it names nothing usable
/// (or does not parse, which a verified certificate always does).
pub fn of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        let names = &san.value.general_names;
        let uri = names.iter().find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
        let dns = names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        });
        if let Some(name) = uri.or(dns) {
            return Some(name.to_owned());
        }
    }
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::of_certificate;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// A SPIFFE-style SAN URI wins over DNS names and the CN.
    #[test]
    fn san_uri_first() {
        let der = cert(
            vec![
                SanType::DnsName("api.internal".try_into().unwrap()),
                SanType::URI("spiffe://prod/api".try_into().unwrap()),
            ],
            Some("api-cn"),
        );
        assert_eq!(of_certificate(&der).as_deref(), Some("spiffe://prod/api"));
    }

    /// Without a URI, the first DNS name.
    #[test]
    fn then_dns_name() {
        let der = cert(
            vec![SanType::DnsName("worker.internal".try_into().unwrap())],
            Some("worker-cn"),
        );
        assert_eq!(of_certificate(&der).as_deref(), Some("worker.internal"));
    }

    /// Without SANs, the subject's common name; without one, nothing.
    #[test]
    fn then_common_name() {
        assert_eq!(
            of_certificate(&cert(vec![], Some("legacy-client"))).as_deref(),
            Some("legacy-client")
        );
        assert_eq!(of_certificate(&cert(vec![], None)), None);
        assert_eq!(of_certificate(b"not a certificate"), None);
    }
}
