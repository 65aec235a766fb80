//! Issuance and repair: makes the Secret hold a key and an ACTIVE, registered certificate,
//! whether the key is made here (InCluster) or by AWS (CloudIssued), and whatever happened to
//! the certificate outside the operator.

use aws_sdk_iot::types::CertificateStatus;
use chrono::Utc;

use super::{ActiveCert, CertContext, certificate, mirror, orphans::CALL_START_BUDGET};
use crate::{
    api::ThingStatus,
    credentials::{codec::CertificateState, pki},
    failpoints::step,
    provider::{
        Notice,
        aws::{
            client::Family,
            error::{AwsError, CallError},
        },
    },
};

/// Makes the Secret hold a key and an ACTIVE, registered certificate. Repairs a certificate
/// that was deleted or deactivated outside the operator.
pub async fn ensure_credentials(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    status: &mut ThingStatus,
    was_ready: bool,
    notices: &mut Vec<Notice>,
) -> Result<ActiveCert, AwsError> {
    recover_interrupted_issue(ctx, state).await?;
    let c = ctx.clients;
    for _ in 0..3 {
        if !state.has_credentials() {
            let active = issue(ctx, state, status).await?;
            return Ok(active);
        }
        let Some(id) = state.cert_id.clone() else {
            if ctx.cloud_issued {
                // A CloudIssued key without its id cannot be matched to anything in AWS.
                state.key_pem = None;
                continue;
            }
            let active = register(ctx, state).await?;
            mirror(status, state, Some(&active));
            return Ok(active);
        };
        let described = c
            .call(Family::Certificate, "DescribeCertificate", || {
                c.iot.describe_certificate().certificate_id(&id).send()
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
                        certificate::set_status(c, &id, CertificateStatus::Active).await?;
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
                if ctx.cloud_issued {
                    state.key_pem = None;
                    state.cert_id = None;
                } else {
                    // Same certificate, same id: registering it again restores it.
                    state.cert_id = None;
                }
            }
            Err(e) => return Err(e.into_error("DescribeCertificate")),
        }
    }
    Err(AwsError::NotConverged)
}

/// A CloudIssued call whose answer was never stored (crash, or a failed Secret write): its
/// window is remembered for the orphan sweep, and a rotation it was part of starts over.
async fn recover_interrupted_issue(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
) -> Result<(), AwsError> {
    if !state.close_pending(ctx.call_bound, Utc::now()) {
        return Ok(());
    }
    if state.previous_cert_id.is_some() && state.previous_cert_id == state.cert_id {
        state.previous_cert_id = None;
        state.previous_revoke_at = None;
    }
    tracing::warn!(
        thing = ctx.thing_name,
        "a certificate issuance was interrupted; its certificate will be swept"
    );
    ctx.save(state).await
}

/// Issues a new certificate by the configured source, recording it before and after.
pub(super) async fn issue(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    status: &mut ThingStatus,
) -> Result<ActiveCert, AwsError> {
    if ctx.cloud_issued {
        let active = issue_cloud(ctx, state, Slot::Current).await?;
        mirror(status, state, Some(&active));
        return Ok(active);
    }
    let generated = pki::generate_self_signed(ctx.thing_name, ctx.key_validity_days)
        .map_err(AwsError::KeyGeneration)?;
    state.cert_pem = Some(generated.certificate_pem);
    state.key_pem = Some(generated.private_key_pem);
    state.cert_id = None;
    state.issued_at = Some(Utc::now());
    state.rotation_token = ctx.rotation_token.clone();
    // The key exists only in memory until this write succeeds: nothing is registered before.
    ctx.save(state).await?;
    mirror(status, state, None);
    step!("aws-after-write-key");
    let active = register(ctx, state).await?;
    mirror(status, state, Some(&active));
    Ok(active)
}

/// Registers the Secret's in-cluster certificate and records its id.
async fn register(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
) -> Result<ActiveCert, AwsError> {
    let pem = state.cert_pem.clone().unwrap_or_default();
    let active = certificate::register(ctx.clients, &pem).await?;
    state.cert_id = Some(active.id.clone());
    ctx.save(state).await?;
    Ok(active)
}

/// Where a new certificate goes: the device's working credentials, or a rotation's next ones
/// (which replace the working ones only once active and attached).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Slot {
    Current,
    Next,
}

/// CreateKeysAndCertificate. The marker written first lets a later run find the certificate
/// if this process dies before the key is stored; the call is made only if it can start within
/// [`CALL_START_BUDGET`] of the marker, so the marker bounds the call's time window.
pub(super) async fn issue_cloud(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    slot: Slot,
) -> Result<ActiveCert, AwsError> {
    let c = ctx.clients;
    let start_by = std::time::Instant::now() + CALL_START_BUDGET;
    state.pending_since = Some(Utc::now());
    ctx.save(state).await?;
    step!("aws-before-create-keys");
    let res = c
        .call_once_by(
            Family::Certificate,
            "CreateKeysAndCertificate",
            start_by,
            || {
                c.iot
                    .create_keys_and_certificate()
                    .set_as_active(true)
                    .send()
            },
        )
        .await;
    let out = match res {
        Ok(out) => out,
        Err(e) => {
            // The call has ended: its window ends now. If this write fails too, the next
            // reconcile closes the marker with the call's bound instead.
            state.close_pending(ctx.call_bound, Utc::now());
            if let Err(save) = ctx.save(state).await {
                tracing::warn!(thing = ctx.thing_name, error = %save, "recording an interrupted issuance failed");
            }
            return Err(e.into_error("CreateKeysAndCertificate"));
        }
    };
    step!("aws-after-create-keys");
    let id = out.certificate_id().unwrap_or_default().to_string();
    let arn = out.certificate_arn().unwrap_or_default().to_string();
    let cert_pem = out.certificate_pem().map(str::to_string);
    let key_pem = out
        .key_pair()
        .and_then(|k| k.private_key())
        .map(str::to_string);
    match slot {
        Slot::Current => {
            state.cert_pem = cert_pem;
            state.key_pem = key_pem;
            state.cert_id = Some(id.clone());
            state.issued_at = Some(Utc::now());
            state.rotation_token = ctx.rotation_token.clone();
        }
        Slot::Next => {
            state.next_cert_pem = cert_pem;
            state.next_key_pem = key_pem;
            state.next_cert_id = Some(id.clone());
        }
    }
    state.pending_since = None;
    ctx.save(state).await?;
    step!("aws-after-store-cloud-key");
    Ok(ActiveCert { id, arn })
}
