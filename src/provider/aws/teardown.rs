//! Deletion in the order AWS demands: for each of the device's certificates detach its policies
//! and its thing, deactivate and delete it; then the shadow, the policy (detached from any
//! remaining target, old versions first) and the thing (detached from principals someone else
//! attached, when AWS refuses to delete it for them). Everything already gone is skipped, so a
//! teardown interrupted at any step completes when run again.

use super::{
    certs::{
        CertContext,
        certificate::{self, tolerate_gone},
        orphans,
    },
    client::{AwsClients, Family},
    error::{AwsError, CallError},
    provision::list_thing_principals,
    shadow,
};
use crate::{
    credentials::{SecretError, codec::CertificateState},
    failpoints::step,
    provider::Notice,
};

/// `recorded_cert_ids`: certificates the status recorded; `recorded_arn`: the ARN it recorded
/// for one of them (id, ARN), which spares that certificate's DescribeCertificate.
pub async fn teardown(
    ctx: &CertContext<'_>,
    recorded_cert_ids: &[String],
    recorded_arn: Option<(&str, &str)>,
    shadow_name: Option<&str>,
    notices: &mut Vec<Notice>,
) -> Result<(), AwsError> {
    let c = ctx.clients;
    let thing_name = ctx.thing_name;
    let policy_name = ctx.policy_name;
    let mut state = match ctx.load().await {
        // A Secret that is not this Thing's holds nothing of this Thing's: no certificate to
        // find there (and it must not be read, let alone written).
        Err(AwsError::Secret(SecretError::Conflict { .. })) => CertificateState::default(),
        other => other?,
    };

    // Certificates this Thing issued: the Secret's, the status's, and any interrupted issuance.
    let mut ids: Vec<String> = recorded_cert_ids.to_vec();
    ids.extend(state.cert_id.iter().cloned());
    ids.extend(state.previous_cert_id.iter().cloned());
    ids.extend(state.next_cert_id.iter().cloned());
    // A crash between writing an in-cluster certificate and recording its id: it may be
    // registered. Only AWS knows the id (moto even derives it differently), so ask it.
    if !ctx.cloud_issued {
        for (id, pem) in [
            (&state.cert_id, &state.cert_pem),
            (&state.next_cert_id, &state.next_cert_pem),
        ] {
            if id.is_none()
                && let Some(pem) = pem.as_deref()
            {
                ids.extend(certificate::registered_id(c, pem).await?);
            }
        }
    }
    ids.sort();
    ids.dedup();
    for id in &ids {
        let arn = recorded_arn
            .filter(|(recorded, _)| recorded == id)
            .map(|(_, arn)| arn);
        certificate::remove(
            c,
            id,
            arn,
            Some(certificate::Attachments {
                thing_name,
                policy_name,
            }),
        )
        .await?;
    }
    if state.pending_since.is_some() || !state.orphan_windows.is_empty() {
        if state.close_pending(ctx.call_bound, chrono::Utc::now()) {
            ctx.save(&state).await?;
        }
        // Deleting the Thing must not leave an unrecorded certificate behind, and must not take
        // another Thing's fresh certificate either: wait out the grace period, then sweep.
        if orphans::sweep(ctx, &mut state, notices).await? {
            return Err(AwsError::OrphanGracePending);
        }
    }

    step!("aws-before-delete-shadow");
    shadow::delete(c, thing_name, shadow_name).await?;
    delete_policy(c, policy_name).await?;
    step!("aws-before-delete-thing");
    delete_thing(c, thing_name, notices).await?;
    step!("aws-after-delete-thing");
    Ok(())
}

/// Write first: DeleteThing at once (this Thing's own certificates are detached by now). AWS
/// refuses it (InvalidRequestException, "still attached to one or more principals") while a
/// principal is attached: only then are the principals listed, and those someone else
/// attached are detached (not deleted: they are not this Thing's), and DeleteThing is asked
/// again. Saves the ListThingPrincipals of every teardown that has none.
async fn delete_thing(
    c: &AwsClients,
    thing_name: &str,
    notices: &mut Vec<Notice>,
) -> Result<(), AwsError> {
    let call = || {
        c.call(Family::ThingWrite, "DeleteThing", || {
            c.iot.delete_thing().thing_name(thing_name).send()
        })
    };
    match call().await {
        Ok(_) | Err(CallError::NotFound) => return Ok(()),
        Err(CallError::Failed(AwsError::Service { ref code, .. }))
            if code == "InvalidRequestException" => {}
        Err(e) => return Err(e.into_error("DeleteThing")),
    }
    for principal in list_thing_principals(c, thing_name).await? {
        step!("aws-before-detach-foreign-principal");
        let r = c
            .call(Family::ThingWrite, "DetachThingPrincipal", || {
                c.iot
                    .detach_thing_principal()
                    .thing_name(thing_name)
                    .principal(&principal)
                    .send()
            })
            .await;
        tolerate_gone(r, "DetachThingPrincipal")?;
        notices.push(Notice::normal(
            "PrincipalDetached",
            format!("detached {principal} from thing {thing_name}"),
        ));
    }
    match call().await {
        Ok(_) | Err(CallError::NotFound) => Ok(()),
        // A detachment takes a few seconds to propagate on AWS: a second refusal is retried
        // with backoff, not left waiting for a spec change.
        Err(CallError::Failed(AwsError::Service {
            operation,
            code,
            status,
            request_id,
            ..
        })) if code == "InvalidRequestException" => Err(AwsError::Service {
            operation,
            code,
            status,
            request_id,
            retryable: true,
        }),
        Err(e) => Err(e.into_error("DeleteThing")),
    }
}

/// Write first: DeletePolicy at once (the Thing's certificates are detached by now); only when
/// AWS answers that something is still attached or old versions remain are they listed.
async fn delete_policy(c: &AwsClients, policy_name: &str) -> Result<(), AwsError> {
    step!("aws-before-delete-policy");
    let first = c
        .call(Family::Policy, "DeletePolicy", || {
            c.iot.delete_policy().policy_name(policy_name).send()
        })
        .await;
    match first {
        Ok(_) | Err(CallError::NotFound) => return Ok(()),
        Err(CallError::Failed(AwsError::Service { ref code, .. }))
            if code == "DeleteConflictException" => {}
        Err(e) => return Err(e.into_error("DeletePolicy")),
    }
    let mut marker: Option<String> = None;
    let mut targets = Vec::new();
    loop {
        match c
            .call(Family::Policy, "ListTargetsForPolicy", || {
                c.iot
                    .list_targets_for_policy()
                    .policy_name(policy_name)
                    .set_marker(marker.clone())
                    .send()
            })
            .await
        {
            Ok(out) => {
                targets.extend(out.targets().iter().cloned());
                match out.next_marker() {
                    Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                    _ => break,
                }
            }
            Err(CallError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into_error("ListTargetsForPolicy")),
        }
    }
    for target in targets {
        let r = c
            .call(Family::Policy, "DetachPolicy", || {
                c.iot
                    .detach_policy()
                    .policy_name(policy_name)
                    .target(&target)
                    .send()
            })
            .await;
        tolerate_gone(r, "DetachPolicy")?;
    }
    match c
        .call(Family::Policy, "ListPolicyVersions", || {
            c.iot.list_policy_versions().policy_name(policy_name).send()
        })
        .await
    {
        Ok(out) => {
            for v in out
                .policy_versions()
                .iter()
                .filter(|v| !v.is_default_version())
            {
                let Some(id) = v.version_id() else { continue };
                let r = c
                    .call(Family::Policy, "DeletePolicyVersion", || {
                        c.iot
                            .delete_policy_version()
                            .policy_name(policy_name)
                            .policy_version_id(id)
                            .send()
                    })
                    .await;
                tolerate_gone(r, "DeletePolicyVersion")?;
            }
        }
        Err(CallError::NotFound) => return Ok(()),
        Err(e) => return Err(e.into_error("ListPolicyVersions")),
    }
    step!("aws-before-delete-policy");
    let r = c
        .call(Family::Policy, "DeletePolicy", || {
            c.iot.delete_policy().policy_name(policy_name).send()
        })
        .await;
    tolerate_gone(r, "DeletePolicy")
}
