//! Device certificates: issuance (in-cluster key or CloudIssued), repair, rotation with an
//! overlap, revocation, and the sweep of certificates a crash left unrecorded.
//!
//! The device Secret is the source of truth for which certificate is the device's: it is
//! written before any call that creates a certificate (InCluster: the key and certificate;
//! CloudIssued: a marker with the time of the call), so after a crash at any point the next
//! reconcile knows what may exist in AWS.

use crate::failpoints::step;
use std::collections::BTreeMap;

use aws_sdk_iot::types::CertificateStatus;
use chrono::{DateTime, Utc};

use super::client::{AwsClients, CallError, Family};
use crate::{
    api::{ThingStatus, thing::CredentialStatus},
    credentials::{DeviceSecret, keys, pki},
    provider::{BackendFailure, Notice},
};

/// Operator bookkeeping kept in the Secret next to the credentials (identifiers and times only).
pub mod data_keys {
    pub const ISSUED_AT: &str = "issuedAt";
    pub const PREVIOUS_CERTIFICATE_ID: &str = "previousCertificateId";
    pub const PREVIOUS_REVOKE_AT: &str = "previousRevokeAt";
    /// Set just before CreateKeysAndCertificate, cleared by the write that stores its key.
    pub const PENDING_SINCE: &str = "pendingCertificateSince";
    /// `start/end` of a CreateKeysAndCertificate call whose answer was lost.
    pub const ORPHAN_WINDOW: &str = "orphanWindow";
    /// The last handled value of the rotate annotation.
    pub const ROTATION_TOKEN: &str = "rotationToken";
}

/// Annotation asking for a rotation now: any new value triggers one.
pub const ROTATE_ANNOTATION: &str = "iot.thing-operator.dev/rotate";

/// Creation times of AWS and of this operator's clock may differ a little.
const CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(10);

/// Everything the Secret holds. `Debug` leaves the key out.
#[derive(Clone, Default, PartialEq)]
pub struct SecretState {
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    pub cert_id: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub previous_cert_id: Option<String>,
    pub previous_revoke_at: Option<DateTime<Utc>>,
    pub pending_since: Option<DateTime<Utc>>,
    pub orphan_window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    pub rotation_token: Option<String>,
}

impl std::fmt::Debug for SecretState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretState")
            .field("has_key", &self.key_pem.is_some())
            .field("cert_id", &self.cert_id)
            .field("previous_cert_id", &self.previous_cert_id)
            .field("pending_since", &self.pending_since)
            .field("orphan_window", &self.orphan_window)
            .finish_non_exhaustive()
    }
}

fn time(data: &BTreeMap<String, Vec<u8>>, key: &str) -> Option<DateTime<Utc>> {
    DeviceSecret::text(data, key)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl SecretState {
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Self {
        let text = |k| DeviceSecret::text(data, k).filter(|s| !s.is_empty());
        let orphan_window = text(data_keys::ORPHAN_WINDOW).and_then(|w| {
            let (a, b) = w.split_once('/')?;
            let a = DateTime::parse_from_rfc3339(a).ok()?.with_timezone(&Utc);
            let b = DateTime::parse_from_rfc3339(b).ok()?.with_timezone(&Utc);
            Some((a, b))
        });
        SecretState {
            cert_pem: text(keys::CERTIFICATE),
            key_pem: text(keys::PRIVATE_KEY),
            cert_id: text(keys::CERTIFICATE_ID),
            issued_at: time(data, data_keys::ISSUED_AT),
            previous_cert_id: text(data_keys::PREVIOUS_CERTIFICATE_ID),
            previous_revoke_at: time(data, data_keys::PREVIOUS_REVOKE_AT),
            pending_since: time(data, data_keys::PENDING_SINCE),
            orphan_window,
            rotation_token: text(data_keys::ROTATION_TOKEN),
        }
    }

    pub fn has_credentials(&self) -> bool {
        self.cert_pem.is_some() && self.key_pem.is_some()
    }
}

/// Non-secret device facts written with the credentials.
#[derive(Clone, Debug)]
pub struct SecretCommon {
    pub ca_bundle: String,
    pub endpoint: String,
    pub thing_name: String,
    pub client_id: String,
}

fn to_data(state: &SecretState, common: &SecretCommon) -> BTreeMap<String, Vec<u8>> {
    let mut d = BTreeMap::new();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            d.insert(k.to_string(), v.into_bytes());
        }
    };
    put(keys::CERTIFICATE, state.cert_pem.clone());
    put(keys::PRIVATE_KEY, state.key_pem.clone());
    put(keys::CERTIFICATE_ID, state.cert_id.clone());
    put(keys::CA, Some(common.ca_bundle.clone()));
    put(keys::ENDPOINT, Some(common.endpoint.clone()));
    put(keys::THING_NAME, Some(common.thing_name.clone()));
    put(keys::CLIENT_ID, Some(common.client_id.clone()));
    put(
        data_keys::ISSUED_AT,
        state.issued_at.map(|t| t.to_rfc3339()),
    );
    put(
        data_keys::PREVIOUS_CERTIFICATE_ID,
        state.previous_cert_id.clone(),
    );
    put(
        data_keys::PREVIOUS_REVOKE_AT,
        state.previous_revoke_at.map(|t| t.to_rfc3339()),
    );
    put(
        data_keys::PENDING_SINCE,
        state.pending_since.map(|t| t.to_rfc3339()),
    );
    put(
        data_keys::ORPHAN_WINDOW,
        state
            .orphan_window
            .map(|(a, b)| format!("{}/{}", a.to_rfc3339(), b.to_rfc3339())),
    );
    put(data_keys::ROTATION_TOKEN, state.rotation_token.clone());
    d
}

/// What the credential flows need.
pub struct CredCtx<'a> {
    pub c: &'a AwsClients,
    pub secret: &'a DeviceSecret,
    pub common: SecretCommon,
    pub cloud_issued: bool,
    pub thing_name: &'a str,
    pub policy_name: &'a str,
    pub key_validity_days: i64,
    pub orphan_grace: chrono::Duration,
    /// The rotate annotation's current value: a first issuance counts as handling it.
    pub rotation_token: Option<String>,
}

impl CredCtx<'_> {
    pub async fn load(&self) -> Result<SecretState, BackendFailure> {
        Ok(self
            .secret
            .read()
            .await?
            .map(|d| SecretState::from_data(&d))
            .unwrap_or_default())
    }

    /// Writes the Secret when its content differs from what was read (the Secret is the
    /// operator's journal: a write always precedes the AWS call it protects).
    pub async fn save(&self, state: &SecretState) -> Result<(), BackendFailure> {
        self.secret.write(to_data(state, &self.common)).await
    }
}

/// The certificate the device uses now.
#[derive(Clone, Debug)]
pub struct ActiveCert {
    pub id: String,
    pub arn: String,
}

/// Mirrors the Secret's identifiers into status (never its key).
pub fn mirror(status: &mut ThingStatus, state: &SecretState, active: Option<&ActiveCert>) {
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

/// Makes the Secret hold a key and an ACTIVE, registered certificate. Repairs a certificate
/// that was deleted or deactivated outside the operator.
pub async fn ensure_credentials(
    x: &CredCtx<'_>,
    state: &mut SecretState,
    status: &mut ThingStatus,
    was_ready: bool,
    notices: &mut Vec<Notice>,
) -> Result<ActiveCert, BackendFailure> {
    recover_interrupted_issue(x, state).await?;
    for _ in 0..3 {
        if !state.has_credentials() {
            let active = issue(x, state, status).await?;
            return Ok(active);
        }
        let Some(id) = state.cert_id.clone() else {
            if x.cloud_issued {
                // A CloudIssued key without its id cannot be matched to anything in AWS.
                state.key_pem = None;
                continue;
            }
            let active = register(x, state).await?;
            mirror(status, state, Some(&active));
            return Ok(active);
        };
        let described =
            x.c.call(Family::Certificate, "DescribeCertificate", || {
                x.c.iot.describe_certificate().certificate_id(&id).send()
            })
            .await;
        match described {
            Ok(out) => {
                let desc = out.certificate_description();
                let arn = desc
                    .and_then(|d| d.certificate_arn())
                    .unwrap_or_default()
                    .to_string();
                let active = ActiveCert {
                    id: id.clone(),
                    arn,
                };
                match desc.and_then(|d| d.status()) {
                    Some(CertificateStatus::Active) => {
                        mirror(status, state, Some(&active));
                        return Ok(active);
                    }
                    Some(CertificateStatus::Inactive) => {
                        set_status(x.c, &id, CertificateStatus::Active).await?;
                        notices.push(Notice::warning(
                            "DriftRepaired",
                            format!(
                                "certificate {id} was deactivated outside the operator; reactivated"
                            ),
                        ));
                        mirror(status, state, Some(&active));
                        return Ok(active);
                    }
                    other => {
                        // Revoked (or pending transfer): only a new certificate helps.
                        notices.push(Notice::warning(
                            "DriftRepaired",
                            format!(
                                "certificate {id} is {}; issuing a new one",
                                other.map(|s| s.as_str()).unwrap_or("unusable")
                            ),
                        ));
                        state.key_pem = None;
                        state.cert_id = None;
                    }
                }
            }
            Err(CallError::NotFound) => {
                if was_ready {
                    notices.push(Notice::warning(
                        "DriftRepaired",
                        format!("certificate {id} was deleted outside the operator; replacing it"),
                    ));
                }
                if x.cloud_issued {
                    state.key_pem = None;
                    state.cert_id = None;
                } else {
                    // Same certificate, same id: registering it again restores it.
                    state.cert_id = None;
                }
            }
            Err(e) => return Err(e.into_provider("DescribeCertificate")),
        }
    }
    Err(BackendFailure::Service {
        backend: super::client::BACKEND,
        operation: "EnsureCertificate",
        code: "NotConverged".into(),
        message: "certificate did not settle in three attempts".into(),
        retryable: true,
    })
}

/// A CloudIssued call whose answer was never stored (crash, or a failed Secret write): its
/// window is remembered for the orphan sweep, and a rotation it was part of starts over.
async fn recover_interrupted_issue(
    x: &CredCtx<'_>,
    state: &mut SecretState,
) -> Result<(), BackendFailure> {
    let Some(since) = state.pending_since else {
        return Ok(());
    };
    let start = state
        .orphan_window
        .map(|(a, _)| a.min(since - CLOCK_SKEW))
        .unwrap_or(since - CLOCK_SKEW);
    state.orphan_window = Some((start, Utc::now() + CLOCK_SKEW));
    state.pending_since = None;
    if state.previous_cert_id.is_some() && state.previous_cert_id == state.cert_id {
        state.previous_cert_id = None;
        state.previous_revoke_at = None;
    }
    tracing::warn!(
        thing = x.thing_name,
        "a certificate issuance was interrupted; its certificate will be swept"
    );
    x.save(state).await
}

/// Issues a new certificate by the configured source, recording it before and after.
async fn issue(
    x: &CredCtx<'_>,
    state: &mut SecretState,
    status: &mut ThingStatus,
) -> Result<ActiveCert, BackendFailure> {
    if x.cloud_issued {
        let active = issue_cloud(x, state).await?;
        mirror(status, state, Some(&active));
        return Ok(active);
    }
    let generated = pki::generate_self_signed(x.thing_name, x.key_validity_days)
        .map_err(|e| BackendFailure::Rejected(format!("certificate generation failed: {e}")))?;
    state.cert_pem = Some(generated.certificate_pem);
    state.key_pem = Some(generated.private_key_pem);
    state.cert_id = None;
    state.issued_at = Some(Utc::now());
    state.rotation_token = x.rotation_token.clone();
    // The key exists only in memory until this write succeeds: nothing is registered before.
    x.save(state).await?;
    mirror(status, state, None);
    step!("aws-after-write-key");
    let active = register(x, state).await?;
    mirror(status, state, Some(&active));
    Ok(active)
}

/// RegisterCertificateWithoutCA, idempotent: the id derives from the certificate, and AWS
/// names the existing one when it was registered before.
async fn register(x: &CredCtx<'_>, state: &mut SecretState) -> Result<ActiveCert, BackendFailure> {
    let pem = state.cert_pem.clone().unwrap_or_default();
    step!("aws-before-register-certificate");
    let res =
        x.c.call(Family::Certificate, "RegisterCertificateWithoutCA", || {
            x.c.iot
                .register_certificate_without_ca()
                .certificate_pem(&pem)
                .status(CertificateStatus::Active)
                .send()
        })
        .await;
    step!("aws-after-register-certificate");
    let (id, arn) = match res {
        Ok(out) => (
            out.certificate_id().map(str::to_string),
            out.certificate_arn().map(str::to_string),
        ),
        Err(CallError::AlreadyExists {
            resource_id,
            resource_arn,
        }) => (resource_id, resource_arn),
        Err(e) => return Err(e.into_provider("RegisterCertificateWithoutCA")),
    };
    let Some(id) = id else {
        return Err(BackendFailure::Service {
            backend: super::client::BACKEND,
            operation: "RegisterCertificateWithoutCA",
            code: "MissingCertificateId".into(),
            message: "no certificate id in the answer".into(),
            retryable: true,
        });
    };
    // A certificate registered earlier may have been deactivated since.
    let desc =
        x.c.call(Family::Certificate, "DescribeCertificate", || {
            x.c.iot.describe_certificate().certificate_id(&id).send()
        })
        .await
        .map_err(|e| e.into_provider("DescribeCertificate"))?;
    let d = desc.certificate_description();
    if d.and_then(|d| d.status()) != Some(&CertificateStatus::Active) {
        set_status(x.c, &id, CertificateStatus::Active).await?;
    }
    let arn = arn
        .or_else(|| d.and_then(|d| d.certificate_arn()).map(str::to_string))
        .unwrap_or_default();
    state.cert_id = Some(id.clone());
    x.save(state).await?;
    Ok(ActiveCert { id, arn })
}

/// The id of `pem` in AWS, learnt by registering it INACTIVE: AWS answers with the existing
/// certificate's id, or registers it (inactive, so never usable) for the caller to delete.
pub async fn registered_id(c: &AwsClients, pem: &str) -> Result<Option<String>, BackendFailure> {
    let res = c
        .call(Family::Certificate, "RegisterCertificateWithoutCA", || {
            c.iot
                .register_certificate_without_ca()
                .certificate_pem(pem)
                .status(CertificateStatus::Inactive)
                .send()
        })
        .await;
    match res {
        Ok(out) => Ok(out.certificate_id().map(str::to_string)),
        Err(CallError::AlreadyExists { resource_id, .. }) => Ok(resource_id),
        Err(e) => Err(e.into_provider("RegisterCertificateWithoutCA")),
    }
}

/// CreateKeysAndCertificate. The marker written first lets a later run find the certificate
/// if this process dies before the key is stored.
async fn issue_cloud(
    x: &CredCtx<'_>,
    state: &mut SecretState,
) -> Result<ActiveCert, BackendFailure> {
    state.pending_since = Some(Utc::now());
    x.save(state).await?;
    step!("aws-before-create-keys");
    let out =
        x.c.call_once(Family::Certificate, "CreateKeysAndCertificate", || {
            x.c.iot
                .create_keys_and_certificate()
                .set_as_active(true)
                .send()
        })
        .await
        .map_err(|e| e.into_provider("CreateKeysAndCertificate"))?;
    step!("aws-after-create-keys");
    let id = out.certificate_id().unwrap_or_default().to_string();
    let arn = out.certificate_arn().unwrap_or_default().to_string();
    state.cert_pem = out.certificate_pem().map(str::to_string);
    state.key_pem = out
        .key_pair()
        .and_then(|k| k.private_key())
        .map(str::to_string);
    state.cert_id = Some(id.clone());
    state.issued_at = Some(Utc::now());
    state.rotation_token = x.rotation_token.clone();
    state.pending_since = None;
    x.save(state).await?;
    step!("aws-after-store-cloud-key");
    Ok(ActiveCert { id, arn })
}

async fn set_status(c: &AwsClients, id: &str, s: CertificateStatus) -> Result<(), BackendFailure> {
    c.call(Family::Certificate, "UpdateCertificate", || {
        c.iot
            .update_certificate()
            .certificate_id(id)
            .new_status(s.clone())
            .send()
    })
    .await
    .map(|_| ())
    .map_err(|e| e.into_provider("UpdateCertificate"))
}

/// Why a rotation is due now, if it is.
pub fn rotation_due(
    state: &SecretState,
    rotate_after: Option<std::time::Duration>,
    token: Option<&str>,
) -> Option<String> {
    if state.previous_cert_id.is_some() {
        // One rotation at a time: the previous certificate is still in its overlap.
        return None;
    }
    if let Some(t) = token
        && state.rotation_token.as_deref() != Some(t)
    {
        return Some(format!("annotation {ROTATE_ANNOTATION}={t}"));
    }
    let every = rotate_after?;
    let after = chrono::Duration::from_std(every).ok()?;
    let issued = state.issued_at?;
    (Utc::now() >= issued + after).then(|| {
        format!(
            "certificate older than {}",
            humantime::format_duration(every)
        )
    })
}

/// When the next rotation falls due (for the requeue).
pub fn next_rotation(
    state: &SecretState,
    rotate_after: Option<std::time::Duration>,
) -> Option<DateTime<Utc>> {
    let after = chrono::Duration::from_std(rotate_after?).ok()?;
    Some(state.issued_at? + after)
}

/// Issues a new certificate; the current one becomes `previous` and stays valid for `overlap`.
pub async fn rotate(
    x: &CredCtx<'_>,
    state: &mut SecretState,
    status: &mut ThingStatus,
    overlap: std::time::Duration,
    reason: &str,
    notices: &mut Vec<Notice>,
) -> Result<ActiveCert, BackendFailure> {
    let old = state.cert_id.clone();
    state.previous_cert_id = old.clone();
    state.previous_revoke_at =
        Some(Utc::now() + chrono::Duration::from_std(overlap).unwrap_or_default());
    if !x.cloud_issued {
        // The new key replaces the old in the same write that records the old id as previous.
        state.key_pem = None;
        state.cert_pem = None;
        state.cert_id = None;
    }
    step!("aws-before-rotate");
    let active = if x.cloud_issued {
        issue_cloud(x, state).await?
    } else {
        issue(x, state, status).await?
    };
    step!("aws-after-rotate");
    mirror(status, state, Some(&active));
    notices.push(Notice::normal(
        "CertificateRotated",
        format!(
            "{reason}: certificate {} replaces {}; the old one is revoked after the overlap",
            active.id,
            old.as_deref().unwrap_or("none")
        ),
    ));
    Ok(active)
}

/// Revokes the previous certificate once its overlap has passed.
pub async fn finish_overlap(
    x: &CredCtx<'_>,
    state: &mut SecretState,
    status: &mut ThingStatus,
    notices: &mut Vec<Notice>,
) -> Result<(), BackendFailure> {
    let (Some(prev), Some(at)) = (state.previous_cert_id.clone(), state.previous_revoke_at) else {
        return Ok(());
    };
    if Utc::now() < at || Some(&prev) == state.cert_id.as_ref() {
        return Ok(());
    }
    remove_certificate(x.c, &prev, None).await?;
    state.previous_cert_id = None;
    state.previous_revoke_at = None;
    x.save(state).await?;
    mirror(status, state, None);
    if let Some(c) = status.credentials.as_mut() {
        c.previous_certificate_id = None;
        c.previous_revoke_at = None;
    }
    notices.push(Notice::normal(
        "PreviousCertificateRevoked",
        format!("certificate {prev} revoked and deleted"),
    ));
    Ok(())
}

fn tolerate_gone(r: Result<(), CallError>, op: &'static str) -> Result<(), BackendFailure> {
    match r {
        Ok(()) | Err(CallError::NotFound) => Ok(()),
        Err(e) => Err(e.into_provider(op)),
    }
}

/// Detaches every policy and the thing, deactivates and deletes one certificate; whatever is
/// already gone is skipped. `arn` saves a DescribeCertificate when known.
pub async fn remove_certificate(
    c: &AwsClients,
    id: &str,
    arn: Option<&str>,
) -> Result<(), BackendFailure> {
    let arn = match arn {
        Some(a) => a.to_string(),
        None => match c
            .call(Family::Certificate, "DescribeCertificate", || {
                c.iot.describe_certificate().certificate_id(id).send()
            })
            .await
        {
            Ok(out) => out
                .certificate_description()
                .and_then(|d| d.certificate_arn())
                .unwrap_or_default()
                .to_string(),
            Err(CallError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into_provider("DescribeCertificate")),
        },
    };
    let policies = match c
        .call(Family::Policy, "ListAttachedPolicies", || {
            c.iot.list_attached_policies().target(&arn).send()
        })
        .await
    {
        Ok(out) => out
            .policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_string))
            .collect(),
        Err(CallError::NotFound) => Vec::new(),
        Err(e) => return Err(e.into_provider("ListAttachedPolicies")),
    };
    for p in policies {
        step!("aws-before-detach-policy");
        let r = c
            .call(Family::Policy, "DetachPolicy", || {
                c.iot.detach_policy().policy_name(&p).target(&arn).send()
            })
            .await
            .map(|_| ());
        tolerate_gone(r, "DetachPolicy")?;
    }
    let things = match c
        .call(Family::ThingRead, "ListPrincipalThings", || {
            c.iot.list_principal_things().principal(&arn).send()
        })
        .await
    {
        Ok(out) => out.things().to_vec(),
        Err(CallError::NotFound) => Vec::new(),
        Err(e) => return Err(e.into_provider("ListPrincipalThings")),
    };
    for t in &things {
        step!("aws-before-detach-principal");
        let r = c
            .call(Family::ThingWrite, "DetachThingPrincipal", || {
                c.iot
                    .detach_thing_principal()
                    .thing_name(t)
                    .principal(&arn)
                    .send()
            })
            .await
            .map(|_| ());
        tolerate_gone(r, "DetachThingPrincipal")?;
    }
    step!("aws-before-deactivate-certificate");
    let r = c
        .call(Family::Certificate, "UpdateCertificate", || {
            c.iot
                .update_certificate()
                .certificate_id(id)
                .new_status(CertificateStatus::Inactive)
                .send()
        })
        .await
        .map(|_| ());
    tolerate_gone(r, "UpdateCertificate")?;
    step!("aws-before-delete-certificate");
    let r = c
        .call(Family::Certificate, "DeleteCertificate", || {
            c.iot
                .delete_certificate()
                .certificate_id(id)
                .force_delete(false)
                .send()
        })
        .await
        .map(|_| ());
    tolerate_gone(r, "DeleteCertificate")?;
    step!("aws-after-delete-certificate");
    Ok(())
}

/// Deletes certificates created in a recorded orphan window that no thing uses, once the window
/// is older than the grace period (so another Thing's certificate, created in the same window
/// and about to be attached, is not mistaken for ours). Returns whether a sweep is still due.
pub async fn sweep_orphans(
    x: &CredCtx<'_>,
    state: &mut SecretState,
) -> Result<bool, BackendFailure> {
    let Some((start, end)) = state.orphan_window else {
        return Ok(false);
    };
    if Utc::now() < end + x.orphan_grace {
        return Ok(true);
    }
    let keep: Vec<&String> = [state.cert_id.as_ref(), state.previous_cert_id.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let mut marker: Option<String> = None;
    let mut candidates = Vec::new();
    loop {
        let page =
            x.c.call(Family::Certificate, "ListCertificates", || {
                x.c.iot
                    .list_certificates()
                    .page_size(250)
                    .set_marker(marker.clone())
                    .send()
            })
            .await
            .map_err(|e| e.into_provider("ListCertificates"))?;
        for cert in page.certificates() {
            let created = cert
                .creation_date()
                .and_then(|d| DateTime::from_timestamp(d.secs(), d.subsec_nanos()));
            let (Some(id), Some(arn), Some(created)) =
                (cert.certificate_id(), cert.certificate_arn(), created)
            else {
                continue;
            };
            if created >= start && created <= end && !keep.iter().any(|k| k.as_str() == id) {
                candidates.push((id.to_string(), arn.to_string()));
            }
        }
        match page.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    for (id, arn) in candidates {
        let things =
            x.c.call(Family::ThingRead, "ListPrincipalThings", || {
                x.c.iot.list_principal_things().principal(&arn).send()
            })
            .await;
        let unused = match things {
            Ok(out) => out.things().is_empty(),
            Err(CallError::NotFound) => false,
            Err(e) => return Err(e.into_provider("ListPrincipalThings")),
        };
        if unused {
            tracing::warn!(thing = x.thing_name, certificate = %id, "deleting a certificate whose issuance was interrupted");
            remove_certificate(x.c, &id, Some(&arn)).await?;
        }
    }
    state.orphan_window = None;
    x.save(state).await?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_state_round_trips_and_hides_the_key() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let s = SecretState {
            cert_pem: Some("CERT".into()),
            key_pem: Some("KEY-MATERIAL".into()),
            cert_id: Some("abc".into()),
            issued_at: Some(t),
            previous_cert_id: Some("old".into()),
            previous_revoke_at: Some(t),
            pending_since: None,
            orphan_window: Some((t, t)),
            rotation_token: Some("1".into()),
        };
        let common = SecretCommon {
            ca_bundle: "CA".into(),
            endpoint: "e:8883".into(),
            thing_name: "n".into(),
            client_id: "n".into(),
        };
        let data = to_data(&s, &common);
        assert_eq!(SecretState::from_data(&data), s);
        assert!(!format!("{s:?}").contains("KEY-MATERIAL"));
    }

    #[test]
    fn rotation_waits_for_the_overlap_and_honours_the_annotation() {
        let mut s = SecretState {
            issued_at: Some(Utc::now() - chrono::Duration::hours(2)),
            ..Default::default()
        };
        let hour = Some(std::time::Duration::from_secs(3600));
        assert!(rotation_due(&s, hour, None).is_some());
        assert!(rotation_due(&s, None, None).is_none());
        assert!(rotation_due(&s, None, Some("x")).is_some());
        s.rotation_token = Some("x".into());
        assert!(rotation_due(&s, None, Some("x")).is_none());
        s.previous_cert_id = Some("old".into());
        assert!(rotation_due(&s, hour, Some("y")).is_none());
    }
}
