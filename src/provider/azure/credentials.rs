//! The device's X.509 identity and its Secret. The key and a self-signed certificate are made in
//! the operator and written to the device Secret *before* the hub hears of the thumbprint, so a
//! crash can never leave a registered thumbprint whose key is lost; a Secret that already holds a
//! matching certificate and key is kept (reconciles are idempotent). The Secret also holds what a
//! device needs to connect: host name, device id, the hub's root CAs.

use chrono::Utc;
use sha2::{Digest, Sha256};

use super::error::AzureError;
use crate::{
    credentials::{
        DeviceSecret, SecretData,
        codec::{CertificateState, DeviceFacts, text},
        pki,
    },
    failpoints::step,
};

/// Extra keys of an Azure device Secret (next to `tls.crt`, `tls.key`, `ca.crt`, `endpoint`).
pub mod keys {
    /// The hub's host name, `<hub>.azure-devices.net`.
    pub const HOST_NAME: &str = "hostName";
    /// The device id in the hub (also in `thingName` and `clientId`).
    pub const DEVICE_ID: &str = "deviceId";
}

/// SHA-256 thumbprint of a PEM certificate, upper-case hex, as IoT Hub shows it.
pub fn thumbprint(cert_pem: &str) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    Some(hex::encode_upper(Sha256::digest(&pem.contents)))
}

/// The device's certificate as the Secret holds it.
pub struct DeviceCertificate {
    pub thumbprint: String,
    pub state: CertificateState,
}

impl std::fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// The whole Secret for `state`.
fn secret_data(state: &CertificateState, facts: &DeviceFacts, host_name: &str) -> SecretData {
    let mut data = state.to_data(facts);
    data.insert(keys::HOST_NAME.into(), host_name.as_bytes().to_vec());
    data.insert(keys::DEVICE_ID.into(), facts.thing_name.as_bytes().to_vec());
    data
}

/// The certificate in the Secret when it holds a usable pair (certificate and the key that
/// belongs to it).
fn usable(data: &SecretData) -> Option<DeviceCertificate> {
    let state = CertificateState::from_data(data);
    let (cert, key) = (state.cert_pem.as_deref()?, state.key_pem.as_deref()?);
    if !pki::key_matches_certificate(key, cert).unwrap_or(false) {
        return None;
    }
    Some(DeviceCertificate {
        thumbprint: thumbprint(cert)?,
        state,
    })
}

/// The thumbprint of the certificate this Thing's Secret holds, if any (ownership proof at
/// cleanup; a missing or foreign Secret proves nothing).
pub async fn secret_thumbprint(secret: &DeviceSecret) -> Option<String> {
    let data = secret.read().await.ok()??;
    usable(&data).map(|c| c.thumbprint)
}

/// The device's certificate: the one in the Secret when it is usable, else a new one written to
/// the Secret first. The Secret's facts are rewritten when they drifted. Returns the certificate
/// and whether it was issued now.
pub async fn ensure(
    secret: &DeviceSecret,
    facts: &DeviceFacts,
    host_name: &str,
    validity_days: i64,
    rotation_token: Option<String>,
) -> Result<(DeviceCertificate, bool), AzureError> {
    let data = secret.read().await?.unwrap_or_default();
    if let Some(cert) = usable(&data) {
        let want = secret_data(&cert.state, facts, host_name);
        if want != data {
            secret.write(want).await?;
        }
        return Ok((cert, false));
    }
    let device_id = &facts.thing_name;
    let generated = pki::generate_self_signed(device_id, validity_days).map_err(AzureError::Key)?;
    let state = CertificateState {
        cert_id: thumbprint(&generated.certificate_pem),
        cert_pem: Some(generated.certificate_pem),
        key_pem: Some(generated.private_key_pem),
        issued_at: Some(Utc::now()),
        // A rotate annotation present at the first issuance asks for nothing yet.
        rotation_token,
        ..CertificateState::default()
    };
    secret.write(secret_data(&state, facts, host_name)).await?;
    step!("azure-after-secret-written");
    let thumbprint = state.cert_id.clone().unwrap_or_default();
    tracing::info!(%thumbprint, "device certificate issued; key kept in the device Secret");
    Ok((DeviceCertificate { thumbprint, state }, true))
}

/// Rotation, first half: a new key and certificate replace the current ones in the Secret, and
/// the current thumbprint is kept as `previous` until `overlap` has passed (the hub registers both
/// meanwhile: primary and secondary thumbprint). The Secret is written before the hub hears of
/// the new thumbprint, so a crash in between only repeats the registration.
pub async fn rotate(
    secret: &DeviceSecret,
    facts: &DeviceFacts,
    host_name: &str,
    validity_days: i64,
    current: &DeviceCertificate,
    overlap: std::time::Duration,
    rotation_token: Option<String>,
) -> Result<DeviceCertificate, AzureError> {
    let generated =
        pki::generate_self_signed(&facts.thing_name, validity_days).map_err(AzureError::Key)?;
    let now = Utc::now();
    let state = CertificateState {
        cert_id: thumbprint(&generated.certificate_pem),
        cert_pem: Some(generated.certificate_pem),
        key_pem: Some(generated.private_key_pem),
        issued_at: Some(now),
        previous_cert_id: Some(current.thumbprint.clone()),
        previous_revoke_at: Some(now + chrono::Duration::from_std(overlap).unwrap_or_default()),
        rotation_token,
        ..CertificateState::default()
    };
    secret.write(secret_data(&state, facts, host_name)).await?;
    step!("azure-after-rotate-secret");
    Ok(DeviceCertificate {
        thumbprint: state.cert_id.clone().unwrap_or_default(),
        state,
    })
}

/// Whether the previous certificate's overlap is over at `now`.
pub fn overlap_over(cert: &DeviceCertificate, now: chrono::DateTime<Utc>) -> bool {
    cert.state.previous_cert_id.is_some() && cert.state.previous_revoke_at.is_none_or(|t| t <= now)
}

/// The thumbprints the hub should hold at `now`: the current one, and the previous one while
/// its overlap lasts.
pub fn wanted_thumbprints(
    cert: &DeviceCertificate,
    now: chrono::DateTime<Utc>,
) -> (String, Option<String>) {
    let previous = (!overlap_over(cert, now))
        .then(|| cert.state.previous_cert_id.clone())
        .flatten();
    (cert.thumbprint.clone(), previous)
}

/// Rotation, second half (after the hub dropped the previous thumbprint): the Secret forgets it.
pub async fn finish_overlap(
    secret: &DeviceSecret,
    facts: &DeviceFacts,
    host_name: &str,
    cert: &mut DeviceCertificate,
) -> Result<(), AzureError> {
    cert.state.previous_cert_id = None;
    cert.state.previous_revoke_at = None;
    secret
        .write(secret_data(&cert.state, facts, host_name))
        .await?;
    Ok(())
}

/// The device id recorded in the Secret (tests and tools read it; here for symmetry).
pub fn device_id_of(data: &SecretData) -> Option<String> {
    text(data, keys::DEVICE_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_usable_only_when_key_and_certificate_belong_together() {
        let a = pki::generate_self_signed("dev", 1).unwrap();
        let b = pki::generate_self_signed("dev", 1).unwrap();
        let facts = DeviceFacts {
            endpoint: "h:8883".into(),
            thing_name: "dev".into(),
            client_id: "dev".into(),
            ca: None,
        };
        let state = |cert: &str, key: &str| CertificateState {
            cert_pem: Some(cert.into()),
            key_pem: Some(key.into()),
            ..CertificateState::default()
        };
        let good = secret_data(&state(&a.certificate_pem, &a.private_key_pem), &facts, "h");
        let cert = usable(&good).unwrap();
        assert_eq!(cert.thumbprint.len(), 64);
        assert_eq!(
            Some(cert.thumbprint.clone()),
            thumbprint(&a.certificate_pem)
        );
        assert_eq!(device_id_of(&good).as_deref(), Some("dev"));
        assert!(!format!("{cert:?}").contains("PRIVATE"));
        let mixed = secret_data(&state(&a.certificate_pem, &b.private_key_pem), &facts, "h");
        assert!(usable(&mixed).is_none());
    }
}
