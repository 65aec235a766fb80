//! The thing, its policy and the attachments: create what is missing, repair what drifted,
//! apply spec changes in place. Every function is idempotent.

use crate::failpoints::step;
use std::collections::{BTreeMap, HashMap};

use aws_sdk_iot::types::AttributePayload;
use serde_json::Value;

use super::{
    client::{AwsClients, Family},
    error::{AwsError, CallError},
    ownership::{self, Claim, OWNER_ATTRIBUTE},
};
use crate::provider::Notice;

/// Who is asking for a thing, and what it may claim (see [`ownership`]).
pub struct Owner<'a> {
    /// This Thing's owner record.
    pub record: String,
    /// The thing ARN this Thing's status recorded, if any.
    pub recorded_arn: Option<&'a str>,
    pub adopt_unowned: bool,
    /// When the Kubernetes Thing was created: a policy older than that cannot be its own.
    pub since: Option<aws_smithy_types::DateTime>,
}

/// Clock skew allowed between the API server and AWS when comparing creation times.
const CLOCK_SKEW_SECS: i64 = 5;

impl Owner<'_> {
    /// Checks an existing thing's owner record; `Err` leaves the thing untouched.
    fn check(
        &self,
        thing_name: &str,
        arn: &str,
        have: &HashMap<String, String>,
        notices: &mut Vec<Notice>,
    ) -> Result<(), AwsError> {
        match ownership::claim(
            have,
            arn,
            &self.record,
            self.recorded_arn,
            self.adopt_unowned,
        ) {
            Claim::Ours => Ok(()),
            Claim::Adopt => {
                notices.push(Notice::normal(
                    "Adopted",
                    format!("thing {thing_name} had no owner record; it now names this Thing"),
                ));
                Ok(())
            }
            Claim::Refuse(why) => Err(AwsError::NotOwner {
                thing_name: thing_name.to_string(),
                why,
            }),
        }
    }
}

/// Makes the thing exist with exactly the spec's attributes and this Thing's owner record.
/// Returns its ARN and whether CreateThing answered for it in this call (then its shadow most
/// likely does not exist yet: see [`super::shadow::sync`]). An existing thing another Thing owns
/// (or nobody, unless adopting is allowed) is refused before anything is changed.
///
/// Write first: a Thing never provisioned most likely has no thing yet, so CreateThing goes
/// without a read. AWS answers it with success only when no thing of that name exists or one
/// exists with exactly these attributes, which hold this Thing's owner record (namespace, name
/// and uid): the thing of an interrupted earlier run of this same Thing. Any other thing of that
/// name gets ResourceAlreadyExists, and only then is it read and the ownership rule applied.
/// A Thing provisioned before is described first: that read is the drift check.
pub async fn ensure_thing(
    c: &AwsClients,
    thing_name: &str,
    attributes: &BTreeMap<String, String>,
    owner: &Owner<'_>,
    was_provisioned: bool,
    notices: &mut Vec<Notice>,
) -> Result<(String, bool), AwsError> {
    let mut want: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    want.insert(OWNER_ATTRIBUTE.to_string(), owner.record.clone());
    if !was_provisioned {
        return match create_thing(c, thing_name, &want).await {
            Ok(arn) => Ok((arn, true)),
            Err(CallError::AlreadyExists { .. }) => {
                converge_existing(c, thing_name, &want, owner, notices).await
            }
            Err(e) => Err(e.into_error("CreateThing")),
        };
    }
    let described = c
        .call(Family::ThingRead, "DescribeThing", || {
            c.iot.describe_thing().thing_name(thing_name).send()
        })
        .await;
    match described {
        Ok(out) => {
            let arn = out.thing_arn().unwrap_or_default().to_string();
            let have = out.attributes().cloned().unwrap_or_default();
            owner.check(thing_name, &arn, &have, notices)?;
            if have != want {
                update_attributes(c, thing_name, &want).await?;
                notices.push(Notice::normal(
                    "AttributesUpdated",
                    format!("thing {thing_name}: attributes set from the spec"),
                ));
            }
            Ok((arn, false))
        }
        Err(CallError::NotFound) => match create_thing(c, thing_name, &want).await {
            Ok(arn) => {
                notices.push(Notice::warning(
                    "DriftRepaired",
                    format!("thing {thing_name} was deleted outside the operator; recreated"),
                ));
                Ok((arn, true))
            }
            // Created concurrently, by someone else: converge it in place only if it is ours.
            Err(CallError::AlreadyExists { .. }) => {
                converge_existing(c, thing_name, &want, owner, notices).await
            }
            Err(e) => Err(e.into_error("CreateThing")),
        },
        Err(e) => Err(e.into_error("DescribeThing")),
    }
}

/// CreateThing with the owner record in its attributes, between its two crash points.
async fn create_thing(
    c: &AwsClients,
    thing_name: &str,
    want: &HashMap<String, String>,
) -> Result<String, CallError> {
    step!("aws-before-create-thing");
    let payload = AttributePayload::builder()
        .set_attributes(Some(want.clone()))
        .build();
    let created = c
        .call(Family::ThingWrite, "CreateThing", || {
            c.iot
                .create_thing()
                .thing_name(thing_name)
                .attribute_payload(payload.clone())
                .send()
        })
        .await;
    step!("aws-after-create-thing");
    created.map(|out| out.thing_arn().unwrap_or_default().to_string())
}

/// A thing of this name exists with other attributes (AWS's 409): read it, and converge it in
/// place only if the ownership rule says it is this Thing's.
async fn converge_existing(
    c: &AwsClients,
    thing_name: &str,
    want: &HashMap<String, String>,
    owner: &Owner<'_>,
    notices: &mut Vec<Notice>,
) -> Result<(String, bool), AwsError> {
    let out = c
        .call(Family::ThingRead, "DescribeThing", || {
            c.iot.describe_thing().thing_name(thing_name).send()
        })
        .await
        .map_err(|e| e.into_error("DescribeThing"))?;
    let arn = out.thing_arn().unwrap_or_default().to_string();
    let have = out.attributes().cloned().unwrap_or_default();
    owner.check(thing_name, &arn, &have, notices)?;
    if have != *want {
        update_attributes(c, thing_name, want).await?;
    }
    Ok((arn, false))
}

async fn update_attributes(
    c: &AwsClients,
    thing_name: &str,
    want: &HashMap<String, String>,
) -> Result<(), AwsError> {
    // merge=false replaces the whole set, so attributes removed from the spec go too.
    let payload = AttributePayload::builder()
        .set_attributes(Some(want.clone()))
        .merge(false)
        .build();
    c.call(Family::ThingWrite, "UpdateThing", || {
        c.iot
            .update_thing()
            .thing_name(thing_name)
            .attribute_payload(payload.clone())
            .send()
    })
    .await
    .map(|_| ())
    .map_err(|e| e.into_error("UpdateThing"))
}

/// Makes the policy exist with `document` as its default version.
pub async fn ensure_policy(
    c: &AwsClients,
    policy_name: &str,
    document: &Value,
    owner: &Owner<'_>,
    was_provisioned: bool,
    notices: &mut Vec<Notice>,
) -> Result<(), AwsError> {
    let text = document.to_string();
    if !was_provisioned {
        // Write first: a Thing never provisioned most likely has no policy yet. Only a conflict
        // (a policy of that name exists: ours from a crashed run, or drifted) costs a read.
        match create_policy(c, policy_name, &text, owner).await {
            Ok(_) => return Ok(()),
            // Ours from an interrupted run, or someone else's: the policy's age tells.
            Err(CallError::AlreadyExists { .. }) => {
                check_policy_owner(c, policy_name, owner).await?;
            }
            Err(e) => return Err(e.into_error("CreatePolicy")),
        }
    }
    let got = c
        .call(Family::Policy, "GetPolicy", || {
            c.iot.get_policy().policy_name(policy_name).send()
        })
        .await;
    match got {
        Ok(out) => {
            let current: Option<Value> = out
                .policy_document()
                .and_then(|d| serde_json::from_str(d).ok());
            if current.as_ref() != Some(document) {
                replace_policy_version(c, policy_name, &text).await?;
                notices.push(Notice::normal(
                    "PolicyUpdated",
                    format!("policy {policy_name}: new default version"),
                ));
            }
            Ok(())
        }
        Err(CallError::NotFound) => {
            match create_policy(c, policy_name, &text, owner).await {
                Ok(_) => {
                    if was_provisioned {
                        notices.push(Notice::warning(
                            "DriftRepaired",
                            format!(
                                "policy {policy_name} was deleted outside the operator; recreated"
                            ),
                        ));
                    }
                    Ok(())
                }
                // Created between our read and write: the next reconcile compares documents.
                Err(CallError::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(e.into_error("CreatePolicy")),
            }
        }
        Err(e) => Err(e.into_error("GetPolicy")),
    }
}

/// CreatePolicy with the owner tag, between its two crash points.
async fn create_policy(
    c: &AwsClients,
    policy_name: &str,
    text: &str,
    owner: &Owner<'_>,
) -> Result<(), CallError> {
    step!("aws-before-create-policy");
    let created = c
        .call(Family::Policy, "CreatePolicy", || {
            c.iot
                .create_policy()
                .policy_name(policy_name)
                .policy_document(text)
                .set_tags(owner_tag(owner))
                .send()
        })
        .await;
    step!("aws-after-create-policy");
    created.map(|_| ())
}

/// The owner record as a tag, set in the call that creates the policy: whoever looks at the
/// account sees which Thing a policy belongs to.
fn owner_tag(owner: &Owner<'_>) -> Option<Vec<aws_sdk_iot::types::Tag>> {
    // `build` fails only without a key, which is set here.
    aws_sdk_iot::types::Tag::builder()
        .key(OWNER_ATTRIBUTE)
        .value(&owner.record)
        .build()
        .ok()
        .map(|tag| vec![tag])
}

/// A policy of this Thing's policy name that the Thing never completed provisioning with is
/// its own only if it was made after the Thing existed (by an interrupted run of this Thing:
/// names derive from the thing name, which this Thing's owner record holds). One older than the
/// Thing was made outside the operator: `PolicyNotOwner`, unchanged, unless adopting is allowed.
/// (AWS IoT policies can carry tags, but the policy's creation time is what every AWS answers,
/// moto included: `ListPolicyVersions` dates each version; the oldest is the creation.)
async fn check_policy_owner(
    c: &AwsClients,
    policy_name: &str,
    owner: &Owner<'_>,
) -> Result<(), AwsError> {
    if owner.adopt_unowned {
        return Ok(());
    }
    let Some(since) = owner.since else {
        return Ok(());
    };
    let versions = c
        .call(Family::Policy, "ListPolicyVersions", || {
            c.iot.list_policy_versions().policy_name(policy_name).send()
        })
        .await
        .map_err(|e| e.into_error("ListPolicyVersions"))?;
    let created = versions
        .policy_versions()
        .iter()
        .filter_map(|v| v.create_date().map(|d| d.secs()))
        .min();
    match created {
        Some(created) if created < since.secs() - CLOCK_SKEW_SECS => {
            Err(AwsError::PolicyNotOwner {
                policy_name: policy_name.to_string(),
                why: "existed before this Thing (made outside this operator; --aws-adopt-unowned allows adopting it)",
            })
        }
        _ => Ok(()),
    }
}

/// AWS keeps at most five versions of a policy: drop the oldest non-default ones first.
async fn replace_policy_version(
    c: &AwsClients,
    policy_name: &str,
    text: &str,
) -> Result<(), AwsError> {
    let versions = c
        .call(Family::Policy, "ListPolicyVersions", || {
            c.iot.list_policy_versions().policy_name(policy_name).send()
        })
        .await
        .map_err(|e| e.into_error("ListPolicyVersions"))?;
    let mut old: Vec<String> = versions
        .policy_versions()
        .iter()
        .filter(|v| !v.is_default_version())
        .filter_map(|v| v.version_id().map(str::to_string))
        .collect();
    old.sort_by_key(|id| id.parse::<u64>().unwrap_or(0));
    let total = versions.policy_versions().len();
    let excess = (total + 1).saturating_sub(5);
    for id in old.iter().take(excess) {
        match c
            .call(Family::Policy, "DeletePolicyVersion", || {
                c.iot
                    .delete_policy_version()
                    .policy_name(policy_name)
                    .policy_version_id(id)
                    .send()
            })
            .await
        {
            Ok(_) | Err(CallError::NotFound) => {}
            Err(e) => return Err(e.into_error("DeletePolicyVersion")),
        }
    }
    c.call(Family::Policy, "CreatePolicyVersion", || {
        c.iot
            .create_policy_version()
            .policy_name(policy_name)
            .policy_document(text)
            .set_as_default(true)
            .send()
    })
    .await
    .map(|_| ())
    .map_err(|e| e.into_error("CreatePolicyVersion"))
}

/// Attaches the policy to the certificate and the certificate to the thing, when missing.
pub async fn ensure_attachments(
    c: &AwsClients,
    thing_name: &str,
    policy_name: &str,
    cert_arn: &str,
    was_provisioned: bool,
    notices: &mut Vec<Notice>,
) -> Result<(), AwsError> {
    if !was_provisioned {
        // Write first: both attachments are idempotent in AWS, and nothing can have drifted on
        // a Thing never provisioned, so there is nothing to read (or report) first.
        step!("aws-before-attach-policy");
        c.call(Family::Policy, "AttachPolicy", || {
            c.iot
                .attach_policy()
                .policy_name(policy_name)
                .target(cert_arn)
                .send()
        })
        .await
        .map_err(|e| e.into_error("AttachPolicy"))?;
        step!("aws-before-attach-principal");
        c.call(Family::ThingWrite, "AttachThingPrincipal", || {
            c.iot
                .attach_thing_principal()
                .thing_name(thing_name)
                .principal(cert_arn)
                .send()
        })
        .await
        .map_err(|e| e.into_error("AttachThingPrincipal"))?;
        step!("aws-after-attachments");
        return Ok(());
    }
    let attached = c
        .call(Family::Policy, "ListAttachedPolicies", || {
            c.iot.list_attached_policies().target(cert_arn).send()
        })
        .await
        .map_err(|e| e.into_error("ListAttachedPolicies"))?;
    if !attached
        .policies()
        .iter()
        .any(|p| p.policy_name() == Some(policy_name))
    {
        step!("aws-before-attach-policy");
        c.call(Family::Policy, "AttachPolicy", || {
            c.iot
                .attach_policy()
                .policy_name(policy_name)
                .target(cert_arn)
                .send()
        })
        .await
        .map_err(|e| e.into_error("AttachPolicy"))?;
        if was_provisioned {
            notices.push(Notice::warning(
                "DriftRepaired",
                format!("policy {policy_name} was not attached to the certificate; attached"),
            ));
        }
    }
    let principals = list_thing_principals(c, thing_name).await?;
    if !principals.iter().any(|p| p == cert_arn) {
        step!("aws-before-attach-principal");
        c.call(Family::ThingWrite, "AttachThingPrincipal", || {
            c.iot
                .attach_thing_principal()
                .thing_name(thing_name)
                .principal(cert_arn)
                .send()
        })
        .await
        .map_err(|e| e.into_error("AttachThingPrincipal"))?;
        if was_provisioned {
            notices.push(Notice::warning(
                "DriftRepaired",
                format!("certificate was not attached to thing {thing_name}; attached"),
            ));
        }
    }
    step!("aws-after-attachments");
    Ok(())
}

/// Whether the thing may be torn down by this Thing: it is gone (`Ok(true)`: nothing to guard),
/// or carries this Thing's record, or carries none and this Thing's status recorded it.
pub async fn may_tear_down(
    c: &AwsClients,
    thing_name: &str,
    owner: &Owner<'_>,
) -> Result<bool, AwsError> {
    match c
        .call(Family::ThingRead, "DescribeThing", || {
            c.iot.describe_thing().thing_name(thing_name).send()
        })
        .await
    {
        Ok(out) => {
            let arn = out.thing_arn().unwrap_or_default();
            let have = out.attributes().cloned().unwrap_or_default();
            // Adopting is for provisioning: a Thing never takes a stranger's thing down.
            let claim = ownership::claim(&have, arn, &owner.record, owner.recorded_arn, false);
            Ok(!matches!(claim, Claim::Refuse(_)))
        }
        Err(CallError::NotFound) => Ok(true),
        Err(e) => Err(e.into_error("DescribeThing")),
    }
}

/// Every principal attached to the thing (all pages). A thing that is gone has none.
pub async fn list_thing_principals(
    c: &AwsClients,
    thing_name: &str,
) -> Result<Vec<String>, AwsError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = c
            .call(Family::ThingRead, "ListThingPrincipals", || {
                c.iot
                    .list_thing_principals()
                    .thing_name(thing_name)
                    .set_next_token(token.clone())
                    .send()
            })
            .await;
        match page {
            Ok(p) => {
                out.extend(p.principals().iter().cloned());
                match p.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(out),
                }
            }
            Err(CallError::NotFound) => return Ok(out),
            Err(e) => return Err(e.into_error("ListThingPrincipals")),
        }
    }
}
