//! The sweep of certificates a crash left unrecorded: a CreateKeysAndCertificate whose answer
//! was lost leaves a certificate only AWS knows. Its time window is in the Secret; once the
//! window is older than the grace period, certificates created in it that no thing uses are
//! deleted.

use chrono::{DateTime, Utc};

use super::{CertContext, certificate};
use crate::{
    credentials::codec::CertificateState,
    provider::aws::{
        client::Family,
        error::{AwsError, CallError},
    },
};

/// Deletes certificates created in a recorded orphan window that no thing uses, once the window
/// is older than the grace period (so another Thing's certificate, created in the same window
/// and about to be attached, is not mistaken for ours). Returns whether a sweep is still due.
pub async fn sweep(ctx: &CertContext<'_>, state: &mut CertificateState) -> Result<bool, AwsError> {
    let Some((start, end)) = state.orphan_window else {
        return Ok(false);
    };
    if Utc::now() < end + ctx.orphan_grace {
        return Ok(true);
    }
    let c = ctx.clients;
    let keep: Vec<&String> = [state.cert_id.as_ref(), state.previous_cert_id.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let mut marker: Option<String> = None;
    let mut candidates = Vec::new();
    loop {
        let page = c
            .call(Family::Certificate, "ListCertificates", || {
                c.iot
                    .list_certificates()
                    .page_size(250)
                    .set_marker(marker.clone())
                    .send()
            })
            .await
            .map_err(|e| e.into_error("ListCertificates"))?;
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
        let things = c
            .call(Family::ThingRead, "ListPrincipalThings", || {
                c.iot.list_principal_things().principal(&arn).send()
            })
            .await;
        let unused = match things {
            Ok(out) => out.things().is_empty(),
            Err(CallError::NotFound) => false,
            Err(e) => return Err(e.into_error("ListPrincipalThings")),
        };
        if unused {
            tracing::warn!(thing = ctx.thing_name, certificate = %id, "deleting a certificate whose issuance was interrupted");
            certificate::remove(c, &id, Some(&arn)).await?;
        }
    }
    state.orphan_window = None;
    ctx.save(state).await?;
    Ok(false)
}

/// When the recorded window may be swept (for the requeue), while a sweep is pending.
pub fn sweep_due_at(ctx: &CertContext<'_>, state: &CertificateState) -> Option<DateTime<Utc>> {
    state.orphan_window.map(|(_, end)| end + ctx.orphan_grace)
}
