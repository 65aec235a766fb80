//! Rotation: when a new certificate is due (`rotateAfter`, or a new value of the rotate
//! annotation), issuing it beside the working one, switching the Secret over once it is active
//! and attached, keeping the old one valid for the overlap, and revoking it once the overlap has
//! passed. One rotation at a time.

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use super::{
    ActiveCert, CertContext, certificate,
    issue::{self, Slot},
    mirror,
};
use crate::{
    api::{Thing, ThingStatus, thing::CredentialsSpec},
    credentials::{codec::CertificateState, pki},
    failpoints::step,
    provider::{
        Notice,
        aws::{client::Family, error::AwsError, provision},
    },
};

/// Annotation asking for a rotation now: any new value triggers one.
pub const ROTATE_ANNOTATION: &str = "iot.thing-operator.dev/rotate";

/// The rotate annotation's current value.
pub fn rotation_token(thing: &Thing) -> Option<String> {
    thing.annotations().get(ROTATE_ANNOTATION).cloned()
}

/// Why a rotation is due now, if it is.
pub fn rotation_due(
    state: &CertificateState,
    spec: &CredentialsSpec,
    token: Option<&str>,
    now: DateTime<Utc>,
) -> Option<String> {
    rotation_due_for(
        RotationJournal {
            what: "certificate",
            in_overlap: state.previous_cert_id.is_some(),
            issued_at: state.issued_at,
            handled_token: state.rotation_token.as_deref(),
        },
        spec,
        token,
        now,
    )
}

/// What a backend's Secret records about the credential it may rotate.
pub struct RotationJournal<'a> {
    /// The credential's name in messages ("certificate", "key").
    pub what: &'a str,
    /// A previous credential is still in its overlap.
    pub in_overlap: bool,
    pub issued_at: Option<DateTime<Utc>>,
    /// The last handled value of the rotate annotation.
    pub handled_token: Option<&'a str>,
}

/// Why a rotation of the credential `journal` describes is due now, if it is: a new value of the
/// rotate annotation, or `rotateAfter` passed; never while an overlap lasts (one at a time).
pub fn rotation_due_for(
    journal: RotationJournal<'_>,
    spec: &CredentialsSpec,
    token: Option<&str>,
    now: DateTime<Utc>,
) -> Option<String> {
    if journal.in_overlap {
        // One rotation at a time: the previous credential is still in its overlap.
        return None;
    }
    if let Some(t) = token
        && journal.handled_token != Some(t)
    {
        return Some(format!("annotation {ROTATE_ANNOTATION}={t}"));
    }
    let every = spec.rotate_after_duration()?;
    let due = spec.rotation_due_at(journal.issued_at?)?;
    (now >= due).then(|| {
        format!(
            "{} older than {}",
            journal.what,
            humantime::format_duration(every)
        )
    })
}

/// Whether a rotation was interrupted after its new certificate was recorded: it is finished
/// before anything else is decided.
pub fn in_progress(state: &CertificateState) -> bool {
    state.next_cert_pem.is_some() || state.next_cert_id.is_some()
}

/// Issues a new certificate into the Secret's `next` slot, registers and attaches it, and only
/// then makes it the working one: the device's key in `tls.key` keeps working until the new
/// certificate is active, so a device that restarts while registration fails still connects.
/// The old certificate becomes `previous` and stays valid for `overlap` from that moment.
/// Resumes an interrupted rotation from whatever the Secret recorded.
pub async fn rotate(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    status: &mut ThingStatus,
    overlap: std::time::Duration,
    reason: &str,
    notices: &mut Vec<Notice>,
) -> Result<ActiveCert, AwsError> {
    step!("aws-before-rotate");
    if !in_progress(state) {
        if ctx.cloud_issued {
            issue::issue_cloud(ctx, state, Slot::Next).await?;
        } else {
            let generated = pki::generate_self_signed(ctx.thing_name, ctx.key_validity_days)
                .map_err(AwsError::KeyGeneration)?;
            state.next_cert_pem = Some(generated.certificate_pem);
            state.next_key_pem = Some(generated.private_key_pem);
            state.next_cert_id = None;
            // Recorded before it is registered: a crash after registering finds it here.
            ctx.save(state).await?;
            step!("aws-after-write-key");
        }
    }
    let next = match (state.next_cert_id.clone(), state.next_cert_pem.clone()) {
        // CloudIssued, or registered before: the certificate exists, make sure it is active.
        (Some(id), _) if ctx.cloud_issued => {
            let arn = certificate_arn(ctx, &id).await?;
            ActiveCert { id, arn }
        }
        (_, Some(pem)) => {
            let active = certificate::register(ctx.clients, &pem).await?;
            if state.next_cert_id.as_ref() != Some(&active.id) {
                state.next_cert_id = Some(active.id.clone());
                ctx.save(state).await?;
            }
            active
        }
        // Nothing usable recorded (a next id without its PEM): start over next time.
        _ => {
            state.next_cert_pem = None;
            state.next_key_pem = None;
            state.next_cert_id = None;
            ctx.save(state).await?;
            return Err(AwsError::NotConverged);
        }
    };
    provision::ensure_attachments(
        ctx.clients,
        ctx.thing_name,
        ctx.policy_name,
        &next.arn,
        false,
        notices,
    )
    .await?;
    // One write makes the new certificate the working one and the old one `previous`.
    let old = state.cert_id.take();
    state.previous_cert_id = old.clone();
    state.previous_revoke_at =
        Some(Utc::now() + chrono::Duration::from_std(overlap).unwrap_or_default());
    state.cert_pem = state.next_cert_pem.take();
    state.key_pem = state.next_key_pem.take();
    state.cert_id = state.next_cert_id.take();
    state.issued_at = Some(Utc::now());
    state.rotation_token = ctx.rotation_token.clone();
    ctx.save(state).await?;
    step!("aws-after-rotate");
    mirror(status, state, Some(&next));
    notices.push(Notice::normal(
        "CertificateRotated",
        format!(
            "{reason}: certificate {} replaces {}; the old one is revoked after the overlap",
            next.id,
            old.as_deref().unwrap_or("none")
        ),
    ));
    Ok(next)
}

/// The ARN of a certificate known by id (a CloudIssued rotation resumed after a crash).
async fn certificate_arn(ctx: &CertContext<'_>, id: &str) -> Result<String, AwsError> {
    let c = ctx.clients;
    let out = c
        .call(Family::Certificate, "DescribeCertificate", || {
            c.iot.describe_certificate().certificate_id(id).send()
        })
        .await
        .map_err(|e| e.into_error("DescribeCertificate"))?;
    Ok(out
        .certificate_description()
        .and_then(|d| d.certificate_arn())
        .unwrap_or_default()
        .to_string())
}

/// Revokes the previous certificate once its overlap has passed.
pub async fn finish_overlap(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    status: &mut ThingStatus,
    notices: &mut Vec<Notice>,
) -> Result<(), AwsError> {
    let (Some(prev), Some(at)) = (state.previous_cert_id.clone(), state.previous_revoke_at) else {
        return Ok(());
    };
    if Utc::now() < at || Some(&prev) == state.cert_id.as_ref() {
        return Ok(());
    }
    certificate::remove(
        ctx.clients,
        &prev,
        None,
        Some(certificate::Attachments {
            thing_name: ctx.thing_name,
            policy_name: ctx.policy_name,
        }),
    )
    .await?;
    state.previous_cert_id = None;
    state.previous_revoke_at = None;
    ctx.save(state).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_waits_for_the_overlap_and_honours_the_annotation() {
        let now = Utc::now();
        let mut s = CertificateState {
            issued_at: Some(now - chrono::Duration::hours(2)),
            ..Default::default()
        };
        let every = |d: &str| CredentialsSpec {
            rotate_after: Some(d.into()),
            ..Default::default()
        };
        let never = CredentialsSpec::default();
        assert_eq!(
            rotation_due(&s, &every("1h"), None, now).as_deref(),
            Some("certificate older than 1h")
        );
        assert!(rotation_due(&s, &every("3h"), None, now).is_none());
        assert!(rotation_due(&s, &never, None, now).is_none());
        assert!(rotation_due(&s, &never, Some("x"), now).is_some());
        s.rotation_token = Some("x".into());
        assert!(rotation_due(&s, &never, Some("x"), now).is_none());
        s.previous_cert_id = Some("old".into());
        assert!(rotation_due(&s, &every("1h"), Some("y"), now).is_none());
    }
}
