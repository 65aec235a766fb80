//! The operator's CA for device certificates (self-hosted brokers), kept in a Secret in the
//! operator's namespace: generated on first start when absent, or supplied by the user (a
//! `kubernetes.io/tls`-shaped Secret with `tls.crt` and `tls.key`).
//!
//! The CA key never leaves that Secret and this process; device keys are generated here and
//! only written into each device's Secret. Errors name the Secret, never key material.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, Utc};
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Api, Client, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::keys;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA Secret {namespace}/{name}: {message}")]
    Kube {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("CA Secret {namespace}/{name} is unusable: {message}")]
    Invalid {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// Validity of a generated CA.
const CA_VALIDITY_DAYS: i64 = 3650;

/// A device certificate and its freshly generated key (PEM).
pub struct IssuedCertificate {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub not_after: DateTime<Utc>,
}

pub struct OperatorCa {
    certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for OperatorCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("OperatorCa").finish_non_exhaustive()
    }
}

/// Certificates are dated by day (rcgen's date helper); returns the UTC midnight used.
fn day_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.date_naive().and_time(chrono::NaiveTime::MIN).and_utc()
}

fn set_validity(
    params: &mut CertificateParams,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> DateTime<Utc> {
    let (from, until) = (day_of(from), day_of(until));
    params.not_before = rcgen::date_time_ymd(from.year(), from.month() as u8, from.day() as u8);
    params.not_after = rcgen::date_time_ymd(until.year(), until.month() as u8, until.day() as u8);
    until
}

impl OperatorCa {
    /// A new self-signed CA (ECDSA P-256).
    pub fn generate(common_name: &str, now: DateTime<Utc>) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "thing-operator");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // From yesterday: clocks of devices and brokers are not all in step.
        set_validity(
            &mut params,
            now - Duration::days(1),
            now + Duration::days(CA_VALIDITY_DAYS),
        );
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        Ok(Self {
            certificate_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from PEM certificate and key (e.g. read from the Secret).
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self, String> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| "tls.key is not a usable private key".to_string())?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key)
            .map_err(|_| "tls.crt is not a usable CA certificate".to_string())?;
        Ok(Self {
            certificate_pem: certificate_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate, for devices' and brokers' trust stores.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// Issues a client certificate whose common name is `common_name` (Mosquitto's
    /// `use_identity_as_username` makes it the username).
    pub fn issue_client(
        &self,
        common_name: &str,
        validity: Duration,
        now: DateTime<Utc>,
    ) -> Result<IssuedCertificate, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError::Generate(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = set_validity(&mut params, now - Duration::days(1), now + validity);
        // A random serial: re-issuing for the same name must give a distinct certificate.
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        Ok(IssuedCertificate {
            certificate_pem: cert.pem(),
            private_key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Reads the CA from `namespace/name`, or generates one and stores it there. Two replicas
    /// racing both end up with the one that was created first (create, never overwrite).
    pub async fn load_or_create(
        client: Client,
        namespace: &str,
        name: &str,
    ) -> Result<Self, CaError> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let kube_err = |e: kube::Error| CaError::Kube {
            namespace: namespace.to_string(),
            name: name.to_string(),
            message: e.to_string(),
        };
        for _ in 0..2 {
            if let Some(secret) = api.get_opt(name).await.map_err(kube_err)? {
                return Self::from_secret(&secret, namespace, name);
            }
            let ca = Self::generate("thing-operator device CA", Utc::now())?;
            let data = BTreeMap::from([
                (
                    keys::CERTIFICATE.to_string(),
                    ByteString(ca.certificate_pem.clone().into_bytes()),
                ),
                (
                    keys::PRIVATE_KEY.to_string(),
                    ByteString(ca.issuer.key().serialize_pem().into_bytes()),
                ),
            ]);
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_string(),
                        "thing-operator".to_string(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Secret::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(namespace, name, "generated the device CA");
                    return Ok(ca);
                }
                // Another replica was faster: read theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(CaError::Invalid {
            namespace: namespace.to_string(),
            name: name.to_string(),
            message: "created concurrently but not readable".into(),
        })
    }

    fn from_secret(secret: &Secret, namespace: &str, name: &str) -> Result<Self, CaError> {
        let invalid = |message: String| CaError::Invalid {
            namespace: namespace.to_string(),
            name: name.to_string(),
            message,
        };
        let data = secret
            .data
            .as_ref()
            .ok_or_else(|| invalid("no data".into()))?;
        let text = |k: &str| {
            data.get(k)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or_else(|| invalid(format!("missing {k}")))
        };
        Self::from_pem(&text(keys::CERTIFICATE)?, &text(keys::PRIVATE_KEY)?).map_err(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_issues_client_certificates_it_can_reload() {
        let now = Utc::now();
        let ca = OperatorCa::generate("test CA", now).unwrap();
        let issued = ca.issue_client("ns_dev1", Duration::days(30), now).unwrap();
        assert!(
            issued
                .certificate_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(issued.private_key_pem.contains("PRIVATE KEY"));
        assert!((now + Duration::days(30) - issued.not_after).num_hours() < 24);
        let other = ca.issue_client("ns_dev1", Duration::days(30), now).unwrap();
        assert_ne!(issued.certificate_pem, other.certificate_pem);

        // Round trip through PEM (what the Secret holds) keeps the same CA.
        let reloaded =
            OperatorCa::from_pem(ca.certificate_pem(), &ca.issuer.key().serialize_pem()).unwrap();
        assert_eq!(reloaded.certificate_pem(), ca.certificate_pem());
        reloaded.issue_client("x", Duration::days(1), now).unwrap();
    }

    #[test]
    fn bad_pem_is_refused_without_echoing_it() {
        let err = OperatorCa::from_pem(
            "not a cert",
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----",
        )
        .unwrap_err();
        assert!(!err.contains("c2VjcmV0"));
        let ca = OperatorCa::generate("t", Utc::now()).unwrap();
        assert!(OperatorCa::from_pem("garbage", &ca.issuer.key().serialize_pem()).is_err());
        assert!(format!("{ca:?}").contains("OperatorCa"));
    }
}
