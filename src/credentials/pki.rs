//! In-cluster key and certificate generation, and the few facts the operator reads back from a
//! certificate (validity, public key).
//!
//! The private key is generated here and only ever written into the device Secret: the backend
//! sees the certificate (public key) alone. Errors never carry key or certificate bytes.

use chrono::{DateTime, Datelike, Utc};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("generating a key pair: {0}")]
    Generate(String),
    #[error("building the certificate: {0}")]
    Certificate(String),
    #[error("the certificate is not valid PEM/X.509")]
    Parse,
}

/// A freshly generated key pair with its self-signed certificate, both PEM.
pub struct GeneratedCredentials {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub not_after: DateTime<Utc>,
}

impl std::fmt::Debug for GeneratedCredentials {
    // Never print the key, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCredentials")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Generates an ECDSA P-256 key (small, fast, accepted by AWS IoT and Mosquitto) and a
/// self-signed certificate for `common_name`, valid from yesterday (clock skew) for `validity_days`.
pub fn generate_self_signed(
    common_name: &str,
    validity_days: i64,
) -> Result<GeneratedCredentials, KeyError> {
    let key = KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = Utc::now();
    let start = now - chrono::Duration::days(1);
    let end = now + chrono::Duration::days(validity_days.max(1));
    // Whole days: rcgen takes calendar dates; month and day of a real date are in range.
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
    let cert = params
        .self_signed(&key)
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let not_after = end
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|d| d.and_utc())
        .unwrap_or(end);
    Ok(GeneratedCredentials {
        certificate_pem: cert.pem(),
        private_key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Facts read from a PEM certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateInfo {
    pub not_before: Option<DateTime<Utc>>,
    pub not_after: Option<DateTime<Utc>>,
    /// DER SubjectPublicKeyInfo, to match a certificate with its private key.
    pub public_key_der: Vec<u8>,
}

pub fn inspect_certificate(pem: &str) -> Result<CertificateInfo, KeyError> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| KeyError::Parse)?;
    let cert = parsed.parse_x509().map_err(|_| KeyError::Parse)?;
    let validity = cert.validity();
    Ok(CertificateInfo {
        not_before: DateTime::from_timestamp(validity.not_before.timestamp(), 0),
        not_after: DateTime::from_timestamp(validity.not_after.timestamp(), 0),
        public_key_der: cert.public_key().raw.to_vec(),
    })
}

/// The subject of a PEM certificate as text (`CN=...`), `None` when it does not parse.
pub fn certificate_subject(pem: &str) -> Option<String> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = parsed.parse_x509().ok()?;
    Some(cert.subject().to_string())
}

/// True when `key_pem` (PKCS#8, as generated here) is the private key of `cert_pem`.
pub fn key_matches_certificate(key_pem: &str, cert_pem: &str) -> Result<bool, KeyError> {
    use rcgen::PublicKeyData;
    let key = KeyPair::from_pem(key_pem).map_err(|_| KeyError::Parse)?;
    let info = inspect_certificate(cert_pem)?;
    Ok(key.subject_public_key_info() == info.public_key_der)
}

/// The PEM bundle of the root CAs whose subject contains any of `subjects`, from the Mozilla
/// root set compiled into the binary (nothing is downloaded at run time).
pub fn root_ca_bundle(subjects: &[&str]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for der in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let bytes: &[u8] = der.as_ref();
        let matches = subjects
            .iter()
            .any(|s| bytes.windows(s.len()).any(|w| w == s.as_bytes()));
        if !matches {
            continue;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_matches_its_certificate_and_not_another() {
        let a = generate_self_signed("ns_a", 365).unwrap();
        let b = generate_self_signed("ns_b", 365).unwrap();
        assert!(key_matches_certificate(&a.private_key_pem, &a.certificate_pem).unwrap());
        assert!(!key_matches_certificate(&a.private_key_pem, &b.certificate_pem).unwrap());
        let info = inspect_certificate(&a.certificate_pem).unwrap();
        assert_eq!(info.not_after, Some(a.not_after));
        assert!(info.not_before.unwrap() < Utc::now());
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn amazon_roots_are_bundled() {
        let bundle = root_ca_bundle(&["Amazon Root CA 1", "Amazon Root CA 3"]);
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    }
}
