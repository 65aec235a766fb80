//! Rotation: when a new certificate is due (`rotateAfter`, or a new value of the rotate
//! annotation), issuing it while the current one stays valid for the overlap, and revoking the
//! previous one once the overlap has passed. One rotation at a time.

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use super::{ActiveCert, CertContext, certificate, issue, mirror};
use crate::{
    api::{Thing, ThingStatus, thing::CredentialsSpec},
    credentials::codec::CertificateState,
    failpoints::step,
    provider::{Notice, aws::error::AwsError},
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
    if state.previous_cert_id.is_some() {
        // One rotation at a time: the previous certificate is still in its overlap.
        return None;
    }
    if let Some(t) = token
        && state.rotation_token.as_deref() != Some(t)
    {
        return Some(format!("annotation {ROTATE_ANNOTATION}={t}"));
    }
    let every = spec.rotate_after_duration()?;
    let due = spec.rotation_due_at(state.issued_at?)?;
    (now >= due).then(|| {
        format!(
            "certificate older than {}",
            humantime::format_duration(every)
        )
    })
}

/// Issues a new certificate; the current one becomes `previous` and stays valid for `overlap`.
pub async fn rotate(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    status: &mut ThingStatus,
    overlap: std::time::Duration,
    reason: &str,
    notices: &mut Vec<Notice>,
) -> Result<ActiveCert, AwsError> {
    let old = state.cert_id.clone();
    state.previous_cert_id = old.clone();
    state.previous_revoke_at =
        Some(Utc::now() + chrono::Duration::from_std(overlap).unwrap_or_default());
    if !ctx.cloud_issued {
        // The new key replaces the old in the same write that records the old id as previous.
        state.key_pem = None;
        state.cert_pem = None;
        state.cert_id = None;
    }
    step!("aws-before-rotate");
    let active = if ctx.cloud_issued {
        issue::issue_cloud(ctx, state).await?
    } else {
        issue::issue(ctx, state, status).await?
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
    certificate::remove(ctx.clients, &prev, None).await?;
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
