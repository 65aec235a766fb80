//! Device certificates: issuance (in-cluster key or CloudIssued) and repair ([`issue`]),
//! rotation with an overlap ([`rotation`]), the sweep of certificates a crash left unrecorded
//! ([`orphans`]), and the calls on one certificate they share ([`certificate`]).
//!
//! The device Secret is the source of truth for which certificate is the device's: it is
//! written before any call that creates a certificate (InCluster: the key and certificate;
//! CloudIssued: a marker with the time of the call), so after a crash at any point the next
//! reconcile knows what may exist in AWS. Its layout is `credentials::codec`'s
//! [`CertificateState`].

pub mod certificate;
pub mod issue;
pub mod orphans;
pub mod rotation;

use super::{client::AwsClients, error::AwsError};
use crate::{
    api::{ThingStatus, thing::CredentialStatus},
    credentials::{
        DeviceSecret,
        codec::{CertificateState, DeviceFacts},
        pki,
    },
};

/// What every certificate flow of one device works with.
pub struct CertContext<'a> {
    pub clients: &'a AwsClients,
    /// The device Secret: the flows' journal.
    pub secret: &'a DeviceSecret,
    /// Written into the Secret with the credentials.
    pub facts: DeviceFacts,
    pub cloud_issued: bool,
    pub thing_name: &'a str,
    pub policy_name: &'a str,
    pub key_validity_days: i64,
    pub orphan_grace: chrono::Duration,
    /// The longest a key-creating call can run after its marker (start budget plus attempt
    /// timeout): an interrupted call's orphan window ends there.
    pub call_bound: chrono::Duration,
    /// The rotate annotation's current value: a first issuance counts as handling it.
    pub rotation_token: Option<String>,
}

impl CertContext<'_> {
    /// The journal as the Secret holds it (empty when there is no Secret yet).
    pub async fn load(&self) -> Result<CertificateState, AwsError> {
        Ok(self
            .secret
            .read()
            .await?
            .map(|d| CertificateState::from_data(&d))
            .unwrap_or_default())
    }

    /// Writes the Secret (the operator's journal: a write always precedes the AWS call it
    /// protects).
    pub async fn save(&self, state: &CertificateState) -> Result<(), AwsError> {
        Ok(self.secret.write(state.to_data(&self.facts)).await?)
    }
}

/// The certificate the device uses now.
#[derive(Clone, Debug)]
pub struct ActiveCert {
    pub id: String,
    pub arn: String,
}

/// The certificates the status records that the device Secret does not hold: the Secret the
/// status describes was renamed or deleted, so those certificates belong to nobody's Secret and
/// must not stay usable. The Secret is the journal (written before every AWS call that makes a
/// certificate), so a certificate the Thing is using or rotating away from is always in it.
pub fn stale_certificates(status: &ThingStatus, state: &CertificateState) -> Vec<String> {
    let in_secret = |id: &String| {
        state.cert_id.as_ref() == Some(id)
            || state.previous_cert_id.as_ref() == Some(id)
            || state.next_cert_id.as_ref() == Some(id)
    };
    let recorded = [
        status
            .device
            .as_ref()
            .and_then(|d| d.certificate_id.clone()),
        status
            .credentials
            .as_ref()
            .and_then(|c| c.previous_certificate_id.clone()),
    ];
    let mut stale: Vec<String> = recorded
        .into_iter()
        .flatten()
        .filter(|id| !in_secret(id))
        .collect();
    stale.dedup();
    stale
}

/// Drops a revoked certificate from status.
pub fn forget_certificate(status: &mut ThingStatus, id: &str) {
    if let Some(d) = status.device.as_mut()
        && d.certificate_id.as_deref() == Some(id)
    {
        d.certificate_id = None;
        d.certificate_arn = None;
    }
    if let Some(c) = status.credentials.as_mut()
        && c.previous_certificate_id.as_deref() == Some(id)
    {
        c.previous_certificate_id = None;
        c.previous_revoke_at = None;
    }
}

/// Mirrors the Secret's identifiers into status (never its key).
pub fn mirror(status: &mut ThingStatus, state: &CertificateState, active: Option<&ActiveCert>) {
    let device = status.device.get_or_insert_with(Default::default);
    if let Some(a) = active {
        device.certificate_id = Some(a.id.clone());
        device.certificate_arn = Some(a.arn.clone());
    } else if state.cert_id.is_some() {
        device.certificate_id = state.cert_id.clone();
    }
    let not_after = state
        .cert_pem
        .as_deref()
        .and_then(|p| pki::inspect_certificate(p).ok())
        .and_then(|i| i.not_after);
    let creds = CredentialStatus {
        issued_at: state.issued_at,
        not_after,
        previous_certificate_id: state.previous_cert_id.clone(),
        previous_revoke_at: state.previous_revoke_at,
    };
    if creds != CredentialStatus::default() {
        status.credentials = Some(creds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::thing::{CredentialStatus, DeviceStatus};

    fn status(current: Option<&str>, previous: Option<&str>) -> ThingStatus {
        ThingStatus {
            device: Some(DeviceStatus {
                certificate_id: current.map(String::from),
                ..DeviceStatus::default()
            }),
            credentials: Some(CredentialStatus {
                previous_certificate_id: previous.map(String::from),
                ..CredentialStatus::default()
            }),
            ..ThingStatus::default()
        }
    }

    fn secret(current: Option<&str>, previous: Option<&str>) -> CertificateState {
        CertificateState {
            cert_id: current.map(String::from),
            previous_cert_id: previous.map(String::from),
            ..CertificateState::default()
        }
    }

    #[test]
    fn certificates_missing_from_the_secret_are_stale() {
        // A new (renamed or recreated) Secret: everything the status recorded goes.
        assert_eq!(
            stale_certificates(&status(Some("a"), Some("p")), &secret(None, None)),
            vec!["a".to_string(), "p".to_string()]
        );
        // The Secret holds them (also mid-rotation, the old one as previous): nothing is stale.
        assert!(stale_certificates(&status(Some("a"), None), &secret(Some("a"), None)).is_empty());
        assert!(
            stale_certificates(&status(Some("a"), None), &secret(Some("b"), Some("a"))).is_empty()
        );
        // Nothing recorded: nothing to revoke.
        assert!(stale_certificates(&ThingStatus::default(), &secret(None, None)).is_empty());

        let mut s = status(Some("a"), Some("p"));
        forget_certificate(&mut s, "a");
        forget_certificate(&mut s, "p");
        assert!(stale_certificates(&s, &secret(None, None)).is_empty());
    }
}
