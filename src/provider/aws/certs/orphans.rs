//! The sweep of certificates a crash left unrecorded: a CreateKeysAndCertificate whose answer
//! was lost leaves a certificate only AWS knows. The Secret records one window per such call,
//! bounded by the call itself (it must start within [`CALL_START_BUDGET`] of the mark and ends
//! within the attempt timeout), never by when the next reconcile happens to run.
//!
//! A certificate is deleted only when the operator can attribute it to the lost call: created
//! inside that call's window, issued by AWS (`CN=AWS IoT Certificate`, what
//! CreateKeysAndCertificate makes; a registered certificate is someone's own), attached to no
//! thing and no policy once the grace period has passed, and the only such certificate in the
//! window. Two candidates in one window (another tool issued one at the same moment) cannot be
//! told apart: both are left alone and an Event names them.

use chrono::{DateTime, Utc};

use super::{CertContext, certificate};
use crate::{
    credentials::codec::CertificateState,
    provider::{
        Notice,
        aws::{
            client::Family,
            error::{AwsError, CallError},
        },
    },
};

/// How long after its mark in the Secret a key-creating call may still start; one that cannot
/// start in time (the rate limiter held it) is not made.
pub const CALL_START_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// The subject AWS gives the certificates CreateKeysAndCertificate creates.
const AWS_ISSUED_SUBJECT: &str = "CN=AWS IoT Certificate";

/// What one window's sweep decides, given the certificates found in it.
#[derive(Debug, PartialEq)]
pub enum Verdict<'a> {
    Nothing,
    Delete(&'a str),
    /// More than one candidate: none can be attributed to the lost call.
    Ambiguous(Vec<&'a str>),
}

/// The decision for one window, pure: `candidates` are the certificate ids created in it that
/// AWS issued and nothing uses.
pub fn verdict<'a>(candidates: &[&'a str]) -> Verdict<'a> {
    match candidates {
        [] => Verdict::Nothing,
        [one] => Verdict::Delete(one),
        many => Verdict::Ambiguous(many.to_vec()),
    }
}

/// Sweeps every recorded window older than the grace period (so another Thing's certificate,
/// created in the same window and about to be attached, is not mistaken for ours). Returns
/// whether a sweep is still due.
pub async fn sweep(
    ctx: &CertContext<'_>,
    state: &mut CertificateState,
    notices: &mut Vec<Notice>,
) -> Result<bool, AwsError> {
    if state.orphan_windows.is_empty() {
        return Ok(false);
    }
    let now = Utc::now();
    let (ripe, waiting): (Vec<_>, Vec<_>) = state
        .orphan_windows
        .iter()
        .copied()
        .partition(|(_, end)| now >= *end + ctx.orphan_grace);
    if ripe.is_empty() {
        return Ok(true);
    }
    let c = ctx.clients;
    let keep: Vec<&String> = [
        state.cert_id.as_ref(),
        state.previous_cert_id.as_ref(),
        state.next_cert_id.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut in_windows: Vec<Vec<(String, String)>> = vec![Vec::new(); ripe.len()];
    let mut marker: Option<String> = None;
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
            if keep.iter().any(|k| k.as_str() == id) {
                continue;
            }
            for (i, (start, end)) in ripe.iter().enumerate() {
                if created >= *start && created <= *end {
                    in_windows[i].push((id.to_string(), arn.to_string()));
                }
            }
        }
        match page.next_marker() {
            Some(m) if !m.is_empty() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    for found in &in_windows {
        let mut candidates = Vec::new();
        for (id, arn) in found {
            if is_unused_aws_issued(ctx, id, arn).await? {
                candidates.push((id.as_str(), arn.as_str()));
            }
        }
        let ids: Vec<&str> = candidates.iter().map(|(id, _)| *id).collect();
        match verdict(&ids) {
            Verdict::Nothing => {}
            Verdict::Delete(id) => {
                let arn = candidates.iter().find(|(i, _)| *i == id).map(|(_, a)| *a);
                tracing::warn!(thing = ctx.thing_name, certificate = %id, "deleting a certificate whose issuance was interrupted");
                certificate::remove(c, id, arn, None).await?;
                notices.push(Notice::normal(
                    "OrphanDeleted",
                    format!("certificate {id}, created by an interrupted issuance, deleted"),
                ));
            }
            Verdict::Ambiguous(ids) => notices.push(Notice::warning(
                "OrphanUnattributed",
                format!(
                    "an issuance was interrupted and certificates {} were created in its window; \
                     the operator cannot tell which is this Thing's, so it deletes none",
                    ids.join(", ")
                ),
            )),
        }
    }
    state.orphan_windows = waiting;
    ctx.save(state).await?;
    Ok(!state.orphan_windows.is_empty())
}

/// Attached to no thing and no policy, and issued by CreateKeysAndCertificate.
async fn is_unused_aws_issued(
    ctx: &CertContext<'_>,
    id: &str,
    arn: &str,
) -> Result<bool, AwsError> {
    let c = ctx.clients;
    match c
        .call(Family::ThingRead, "ListPrincipalThings", || {
            c.iot.list_principal_things().principal(arn).send()
        })
        .await
    {
        Ok(out) if out.things().is_empty() => {}
        Ok(_) | Err(CallError::NotFound) => return Ok(false),
        Err(e) => return Err(e.into_error("ListPrincipalThings")),
    }
    match c
        .call(Family::Policy, "ListAttachedPolicies", || {
            c.iot.list_attached_policies().target(arn).send()
        })
        .await
    {
        Ok(out) if out.policies().is_empty() => {}
        Ok(_) | Err(CallError::NotFound) => return Ok(false),
        Err(e) => return Err(e.into_error("ListAttachedPolicies")),
    }
    let pem = match c
        .call(Family::Certificate, "DescribeCertificate", || {
            c.iot.describe_certificate().certificate_id(id).send()
        })
        .await
    {
        Ok(out) => out
            .certificate_description()
            .and_then(|d| d.certificate_pem())
            .unwrap_or_default()
            .to_string(),
        Err(CallError::NotFound) => return Ok(false),
        Err(e) => return Err(e.into_error("DescribeCertificate")),
    };
    Ok(crate::credentials::pki::certificate_subject(&pem).as_deref() == Some(AWS_ISSUED_SUBJECT))
}

/// When the next recorded window may be swept (for the requeue), while a sweep is pending.
pub fn sweep_due_at(ctx: &CertContext<'_>, state: &CertificateState) -> Option<DateTime<Utc>> {
    state
        .orphan_windows
        .iter()
        .map(|(_, end)| *end + ctx.orphan_grace)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_candidate_is_attributed_to_the_lost_call() {
        assert_eq!(verdict(&[]), Verdict::Nothing);
        assert_eq!(verdict(&["a"]), Verdict::Delete("a"));
        assert_eq!(verdict(&["a", "b"]), Verdict::Ambiguous(vec!["a", "b"]));
    }
}
