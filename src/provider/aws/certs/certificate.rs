//! Calls on one certificate that issuance, rotation, the orphan sweep and teardown share:
//! registering an in-cluster certificate, learning its id, activating, and removing it in the
//! order AWS demands.

use aws_sdk_iot::types::CertificateStatus;

use super::ActiveCert;
use crate::{
    failpoints::step,
    provider::aws::{
        client::{AwsClients, Family},
        error::{AwsError, CallError},
    },
};

/// RegisterCertificateWithoutCA, idempotent: the id derives from the certificate, and AWS
/// names the existing one when it was registered before. Only then is it read: a certificate
/// registered earlier may have been deactivated since, and is activated again.
pub async fn register(clients: &AwsClients, pem: &str) -> Result<ActiveCert, AwsError> {
    step!("aws-before-register-certificate");
    let res = clients
        .call(Family::Certificate, "RegisterCertificateWithoutCA", || {
            clients
                .iot
                .register_certificate_without_ca()
                .certificate_pem(pem)
                .status(CertificateStatus::Active)
                .send()
        })
        .await;
    step!("aws-after-register-certificate");
    let (id, arn) = match res {
        // Registered now, ACTIVE as asked: nothing to read back.
        Ok(out) => match (out.certificate_id(), out.certificate_arn()) {
            (Some(id), Some(arn)) => {
                return Ok(ActiveCert {
                    id: id.to_string(),
                    arn: arn.to_string(),
                });
            }
            (id, arn) => (id.map(str::to_string), arn.map(str::to_string)),
        },
        Err(CallError::AlreadyExists {
            resource_id,
            resource_arn,
        }) => (resource_id, resource_arn),
        Err(e) => return Err(e.into_error("RegisterCertificateWithoutCA")),
    };
    let Some(id) = id else {
        return Err(AwsError::MissingCertificateId {
            operation: "RegisterCertificateWithoutCA",
        });
    };
    let desc = clients
        .call(Family::Certificate, "DescribeCertificate", || {
            clients
                .iot
                .describe_certificate()
                .certificate_id(&id)
                .send()
        })
        .await
        .map_err(|e| e.into_error("DescribeCertificate"))?;
    let d = desc.certificate_description();
    if d.and_then(|d| d.status()) != Some(&CertificateStatus::Active) {
        set_status(clients, &id, CertificateStatus::Active).await?;
    }
    let arn = arn
        .or_else(|| d.and_then(|d| d.certificate_arn()).map(str::to_string))
        .unwrap_or_default();
    Ok(ActiveCert { id, arn })
}

/// The id of `pem` in AWS, learnt by registering it INACTIVE: AWS answers with the existing
/// certificate's id, or registers it (inactive, so never usable) for the caller to delete.
pub async fn registered_id(clients: &AwsClients, pem: &str) -> Result<Option<String>, AwsError> {
    let res = clients
        .call(Family::Certificate, "RegisterCertificateWithoutCA", || {
            clients
                .iot
                .register_certificate_without_ca()
                .certificate_pem(pem)
                .status(CertificateStatus::Inactive)
                .send()
        })
        .await;
    match res {
        Ok(out) => Ok(out.certificate_id().map(str::to_string)),
        Err(CallError::AlreadyExists { resource_id, .. }) => Ok(resource_id),
        Err(e) => Err(e.into_error("RegisterCertificateWithoutCA")),
    }
}

pub async fn set_status(
    clients: &AwsClients,
    id: &str,
    status: CertificateStatus,
) -> Result<(), AwsError> {
    clients
        .call(Family::Certificate, "UpdateCertificate", || {
            clients
                .iot
                .update_certificate()
                .certificate_id(id)
                .new_status(status.clone())
                .send()
        })
        .await
        .map(|_| ())
        .map_err(|e| e.into_error("UpdateCertificate"))
}

/// A call whose target may already be gone: that counts as done.
pub(in crate::provider::aws) fn tolerate_gone<T>(
    r: Result<T, CallError>,
    operation: &'static str,
) -> Result<(), AwsError> {
    match r {
        Ok(_) | Err(CallError::NotFound) => Ok(()),
        Err(e) => Err(e.into_error(operation)),
    }
}

/// The thing and policy a certificate of this Thing is attached to.
pub struct Attachments<'a> {
    pub thing_name: &'a str,
    pub policy_name: &'a str,
}

/// Whether an answer is AWS's DeleteConflictException (something is still attached).
fn is_delete_conflict(r: &Result<(), AwsError>) -> bool {
    matches!(r, Err(AwsError::Service { code, .. }) if code == "DeleteConflictException")
}

/// Detaches every policy and the thing, deactivates and deletes one certificate; whatever is
/// already gone is skipped. `arn` saves a DescribeCertificate when known.
///
/// Write first: with `ours` (the Thing's own thing and policy) the certificate is detached from
/// those and deleted without listing its attachments; only when AWS answers that something else
/// is still attached (DeleteConflictException) are they listed and detached.
pub async fn remove(
    c: &AwsClients,
    id: &str,
    arn: Option<&str>,
    ours: Option<Attachments<'_>>,
) -> Result<(), AwsError> {
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
            Err(e) => return Err(e.into_error("DescribeCertificate")),
        },
    };
    if let Some(ours) = ours {
        step!("aws-before-detach-policy");
        let r = c
            .call(Family::Policy, "DetachPolicy", || {
                c.iot
                    .detach_policy()
                    .policy_name(ours.policy_name)
                    .target(&arn)
                    .send()
            })
            .await;
        tolerate_gone(r, "DetachPolicy")?;
        step!("aws-before-detach-principal");
        let r = c
            .call(Family::ThingWrite, "DetachThingPrincipal", || {
                c.iot
                    .detach_thing_principal()
                    .thing_name(ours.thing_name)
                    .principal(&arn)
                    .send()
            })
            .await;
        tolerate_gone(r, "DetachThingPrincipal")?;
        let deleted = deactivate_and_delete(c, id).await;
        if !is_delete_conflict(&deleted) {
            return deleted;
        }
    }
    remove_listed(c, id, &arn).await
}

/// UpdateCertificate INACTIVE, then DeleteCertificate; a certificate already gone is done.
async fn deactivate_and_delete(c: &AwsClients, id: &str) -> Result<(), AwsError> {
    step!("aws-before-deactivate-certificate");
    let r = c
        .call(Family::Certificate, "UpdateCertificate", || {
            c.iot
                .update_certificate()
                .certificate_id(id)
                .new_status(CertificateStatus::Inactive)
                .send()
        })
        .await;
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
        .await;
    tolerate_gone(r, "DeleteCertificate")?;
    step!("aws-after-delete-certificate");
    Ok(())
}

/// The reading path: lists what the certificate is attached to, detaches all of it, deletes.
async fn remove_listed(c: &AwsClients, id: &str, arn: &str) -> Result<(), AwsError> {
    let policies = match c
        .call(Family::Policy, "ListAttachedPolicies", || {
            c.iot.list_attached_policies().target(arn).send()
        })
        .await
    {
        Ok(out) => out
            .policies()
            .iter()
            .filter_map(|p| p.policy_name().map(str::to_string))
            .collect(),
        Err(CallError::NotFound) => Vec::new(),
        Err(e) => return Err(e.into_error("ListAttachedPolicies")),
    };
    for p in policies {
        step!("aws-before-detach-policy");
        let r = c
            .call(Family::Policy, "DetachPolicy", || {
                c.iot.detach_policy().policy_name(&p).target(arn).send()
            })
            .await;
        tolerate_gone(r, "DetachPolicy")?;
    }
    let things = match c
        .call(Family::ThingRead, "ListPrincipalThings", || {
            c.iot.list_principal_things().principal(arn).send()
        })
        .await
    {
        Ok(out) => out.things().to_vec(),
        Err(CallError::NotFound) => Vec::new(),
        Err(e) => return Err(e.into_error("ListPrincipalThings")),
    };
    for t in &things {
        step!("aws-before-detach-principal");
        let r = c
            .call(Family::ThingWrite, "DetachThingPrincipal", || {
                c.iot
                    .detach_thing_principal()
                    .thing_name(t)
                    .principal(arn)
                    .send()
            })
            .await;
        tolerate_gone(r, "DetachThingPrincipal")?;
    }
    deactivate_and_delete(c, id).await
}
