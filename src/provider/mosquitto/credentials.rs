//! A Mosquitto device's credentials: a generated password, kept only in the device Secret (the
//! broker learns it from there), and, when devices may use the mTLS listener, a client
//! certificate from the operator's CA whose key is generated here and only ever written into
//! the Secret. The layout of the Secret is `credentials::codec`'s [`LoginSecret`].

use chrono::{DateTime, Duration, Utc};
use rand::Rng;

use super::{MosquittoProvider, error::MosquittoError};
use crate::{
    api::ThingStatus,
    credentials::{
        SecretData,
        ca::OperatorCa,
        codec::{ClientCertificate, DeviceFacts, LoginSecret, certificate_pair},
        pki,
    },
    provider::DeviceRequest,
};

const PASSWORD_CHARS: usize = 32;
/// Validity of a device certificate; it is renewed in its last [`CERT_RENEW_DAYS`] days.
const CERT_VALIDITY_DAYS: i64 = 365;
const CERT_RENEW_DAYS: i64 = 30;

/// Whether a certificate valid until `not_after` may stay: it is not in its last
/// [`CERT_RENEW_DAYS`] days (an unreadable validity counts as expired) and `rotateAfter` has
/// not made it due.
fn keeps(
    not_after: Option<DateTime<Utc>>,
    rotation_due: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    let fresh = not_after.is_some_and(|na| na - now > Duration::days(CERT_RENEW_DAYS));
    let due = rotation_due.is_some_and(|due| now >= due);
    fresh && !due
}

fn generate_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(PASSWORD_CHARS)
        .map(char::from)
        .collect()
}

impl MosquittoProvider {
    /// Reads the device password from the Secret, or makes one and writes the Secret first:
    /// the broker only ever learns a password the Secret already holds. The Secret is written
    /// only when its content changes.
    pub(super) async fn ensure_secret(
        &self,
        req: &DeviceRequest<'_>,
        topic: &str,
        status: &mut ThingStatus,
    ) -> Result<String, MosquittoError> {
        let thing_name = &req.backend_name;
        let existing = req.secret.read().await?;
        let password = existing
            .as_ref()
            .and_then(|d| LoginSecret::password_of(d, thing_name))
            .unwrap_or_else(generate_password);
        let tls = match (&self.config.device_ca, &self.config.device_tls_endpoint) {
            (Some(ca), Some(endpoint)) => {
                let pair = self.ensure_certificate(req, existing.as_ref(), ca, status)?;
                Some((pair, ca, endpoint))
            }
            _ => None,
        };
        // The broker's CA when configured, else the device CA (one CA for both, as in the test
        // environment).
        let ca = self.ca_pem.clone().or_else(|| {
            tls.as_ref()
                .map(|(_, ca, _)| ca.certificate_pem().as_bytes().to_vec())
        });
        let facts = DeviceFacts {
            endpoint: self.config.device_endpoint.clone(),
            thing_name: thing_name.clone(),
            client_id: thing_name.clone(),
            ca,
        };
        let data = LoginSecret {
            facts: &facts,
            username: thing_name,
            password: &password,
            topic,
            client_certificate: tls
                .as_ref()
                .map(|((cert, key), _, endpoint)| ClientCertificate {
                    cert_pem: cert,
                    key_pem: key,
                    tls_endpoint: endpoint,
                }),
        }
        .to_data();
        if existing.as_ref() != Some(&data) {
            req.secret.write(data).await?;
        }
        Ok(password)
    }

    /// The device certificate and key to keep: the Secret's, while they match, are not near
    /// expiry and not older than `rotateAfter`; otherwise a new pair from the device CA.
    fn ensure_certificate(
        &self,
        req: &DeviceRequest<'_>,
        existing: Option<&SecretData>,
        ca: &OperatorCa,
        status: &mut ThingStatus,
    ) -> Result<(String, String), MosquittoError> {
        let now = Utc::now();
        let current = existing
            .and_then(certificate_pair)
            .filter(|(cert, key)| pki::key_matches_certificate(key, cert).unwrap_or(false));
        let issued_at = status.credentials.as_ref().and_then(|c| c.issued_at);
        if let Some((cert, key)) = current {
            let info = pki::inspect_certificate(&cert).ok();
            let not_after = info.as_ref().and_then(|i| i.not_after);
            let rotation_due =
                issued_at.and_then(|at| req.thing.spec.credentials.rotation_due_at(at));
            if keeps(not_after, rotation_due, now) {
                let creds = status.credentials.get_or_insert_with(Default::default);
                creds.not_after = not_after;
                if creds.issued_at.is_none() {
                    creds.issued_at = info.and_then(|i| i.not_before);
                }
                return Ok((cert, key));
            }
        }
        let issued = ca
            .issue_client(&req.backend_name, Duration::days(CERT_VALIDITY_DAYS), now)
            .map_err(MosquittoError::IssueCertificate)?;
        tracing::info!("device certificate issued");
        let creds = status.credentials.get_or_insert_with(Default::default);
        creds.issued_at = Some(now);
        creds.not_after = Some(issued.not_after);
        Ok((issued.certificate_pem, issued.private_key_pem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_stays_until_its_renewal_window_or_its_rotation() {
        let now = Utc::now();
        let days = |d| Some(now + Duration::days(d));
        // (not_after, rotation due, keeps)
        let cases = [
            (days(200), None, true),
            (days(31), None, true),
            (days(30), None, false),
            (days(-1), None, false),
            (None, None, false),
            (days(200), days(1), true),
            (days(200), Some(now), false),
            (days(200), days(-1), false),
        ];
        for (not_after, due, want) in cases {
            assert_eq!(keeps(not_after, due, now), want, "{not_after:?} {due:?}");
        }
        assert_eq!(generate_password().len(), PASSWORD_CHARS);
        assert_ne!(generate_password(), generate_password());
    }
}
