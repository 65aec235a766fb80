//! The push channel's own AWS identity: a key generated here (it never leaves the Secret in the
//! operator's namespace), its self-signed certificate registered with
//! RegisterCertificateWithoutCA, and the operator policy attached to it, which allows exactly
//! what the channel does: connect as its client id, subscribe to the shadow documents filters,
//! receive the documents of the thing names this operator may manage.
//!
//! Crash safety comes from the order of writes, with the Secret as the record:
//! 1. The Secret exists before anything is made in AWS; its creation time is what proves a
//!    policy of the operator policy's name this operator's (a policy older than the Secret was
//!    made by someone else: `PolicyNotOwner`, left alone, as for device policies).
//! 2. A new key and certificate go into the Secret (`next.*`) before AWS sees the certificate;
//!    the certificate id derives from the certificate, so registering again after a crash is
//!    idempotent, and a certificate only the Secret's key can use is attributable to it.
//! 3. Only once the new certificate is ACTIVE with the policy attached does it become the
//!    current one; the old one is recorded as retired in the same write.
//! 4. The retired certificate is detached, deactivated and deleted after the channel
//!    reconnected with the new one; then its record goes.
//!
//! A crash between any two steps leaves a Secret from which the next run carries on.

use std::collections::BTreeMap;

use chrono::Utc;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use super::PushError;
use crate::{
    credentials::pki,
    failpoints::step,
    provider::aws::{
        certs::certificate,
        client::{AwsClients, Family},
        naming::{ArnParts, parse_arn},
        provision::{self, Owner},
    },
};

/// Keys of the identity Secret.
mod keys {
    pub const CERTIFICATE: &str = "tls.crt";
    pub const PRIVATE_KEY: &str = "tls.key";
    pub const CERTIFICATE_ID: &str = "certificate-id";
    pub const CERTIFICATE_ARN: &str = "certificate-arn";
    pub const NEXT_CERTIFICATE: &str = "next.crt";
    pub const NEXT_PRIVATE_KEY: &str = "next.key";
    pub const RETIRED_ID: &str = "retired-certificate-id";
    /// When the current certificate became current (RFC 3339): its age decides rotation.
    pub const ISSUED_AT: &str = "issued-at";
}

/// Validity of the channel's certificate; it is replaced long before (`rotate_after`).
const VALIDITY_DAYS: i64 = 365;

/// What the channel connects with. The key is never printed.
#[derive(Clone)]
pub struct Identity {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub certificate_id: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("certificate_id", &self.certificate_id)
            .finish_non_exhaustive()
    }
}

/// Where the identity lives and what it may do.
pub struct IdentitySettings {
    pub secrets: Api<Secret>,
    pub secret_name: String,
    pub policy_name: String,
    pub client_id: String,
    /// Thing names the policy lets the channel receive documents of: those starting with it.
    pub name_scope: String,
    pub rotate_after: std::time::Duration,
    pub adopt_unowned: bool,
}

/// The operator policy (pure): connect as `client_id`, subscribe to the documents filters,
/// receive documents of thing names starting with `name_scope` only.
pub fn operator_policy(arn: &ArnParts, client_id: &str, name_scope: &str) -> Value {
    let base = format!("arn:{}:iot:{}:{}", arn.partition, arn.region, arn.account);
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("{base}:client/{client_id}")},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": [
                format!("{base}:topicfilter/$aws/things/*/shadow/update/documents"),
                format!("{base}:topicfilter/$aws/things/*/shadow/name/*/update/documents"),
            ]},
            {"Effect": "Allow", "Action": "iot:Receive", "Resource": [
                format!("{base}:topic/$aws/things/{name_scope}*/shadow/update/documents"),
                format!("{base}:topic/$aws/things/{name_scope}*/shadow/name/*/update/documents"),
            ]},
        ]
    })
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.is_empty())
}

impl IdentitySettings {
    fn kube_error(&self, e: kube::Error) -> PushError {
        PushError::Secret {
            name: self.secret_name.clone(),
            message: e.to_string(),
        }
    }

    /// The Secret, created empty when absent (step 1).
    async fn secret(&self) -> Result<Secret, PushError> {
        if let Some(s) = self
            .secrets
            .get_opt(&self.secret_name)
            .await
            .map_err(|e| self.kube_error(e))?
        {
            return Ok(s);
        }
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(self.secret_name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    "thing-operator".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(s) => Ok(s),
            // Another run made it meanwhile: read it.
            Err(kube::Error::Api(ae)) if ae.code == 409 => self
                .secrets
                .get(&self.secret_name)
                .await
                .map_err(|e| self.kube_error(e)),
            Err(e) => Err(self.kube_error(e)),
        }
    }

    /// A merge patch of the Secret's data: `Some` sets a key, `None` removes it.
    async fn write(&self, changes: &[(&str, Option<&str>)]) -> Result<(), PushError> {
        let data: serde_json::Map<String, Value> = changes
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Some(text) => Value::String(base64_encode(text.as_bytes())),
                    None => Value::Null,
                };
                (k.to_string(), value)
            })
            .collect();
        self.secrets
            .patch(
                &self.secret_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": data})),
            )
            .await
            .map(|_| ())
            .map_err(|e| self.kube_error(e))
    }

    fn owner(&self, secret: &Secret) -> Owner<'static> {
        let meta = &secret.metadata;
        Owner {
            record: format!(
                "thing-operator/{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                self.secret_name
            ),
            recorded_arn: None,
            adopt_unowned: self.adopt_unowned,
            since: meta
                .creation_timestamp
                .as_ref()
                .map(|t| aws_smithy_types::DateTime::from_secs(t.0.as_second())),
        }
    }

    /// Whether the current certificate is old enough to be replaced (or unreadable, or about to
    /// expire).
    fn rotation_due(&self, certificate_pem: &str, issued_at: Option<&str>) -> bool {
        let Ok(info) = pki::inspect_certificate(certificate_pem) else {
            return true;
        };
        let now = Utc::now();
        let old = issued_at
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .and_then(|from| (now - from.to_utc()).to_std().ok())
            .is_none_or(|age| age >= self.rotate_after);
        old || info
            .not_after
            .is_none_or(|until| until <= now + chrono::Duration::days(1))
    }

    /// Makes the identity exist (steps 1-3) and returns the certificate to connect with, plus
    /// the id of a retired certificate still to be removed (step 4, [`Self::retire`]).
    pub async fn ensure(&self, c: &AwsClients) -> Result<(Identity, Option<String>), PushError> {
        let secret = self.secret().await?;
        let owner = self.owner(&secret);
        let data = secret.data.clone().unwrap_or_default();
        let current = match (
            text(&data, keys::CERTIFICATE),
            text(&data, keys::PRIVATE_KEY),
            text(&data, keys::CERTIFICATE_ID),
            text(&data, keys::CERTIFICATE_ARN),
        ) {
            (Some(cert), Some(key), Some(id), Some(arn)) => Some((cert, key, id, arn)),
            _ => None,
        };
        let mut next = match (
            text(&data, keys::NEXT_CERTIFICATE),
            text(&data, keys::NEXT_PRIVATE_KEY),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        };
        // A certificate retired by an earlier run is never the one a connection uses now (the
        // channel connects with the current one): finish removing it before anything new.
        if let Some(id) = text(&data, keys::RETIRED_ID) {
            self.retire(c, &id).await?;
        }
        let due = current.as_ref().is_none_or(|(cert, ..)| {
            self.rotation_due(cert, text(&data, keys::ISSUED_AT).as_deref())
        });
        if next.is_none() && due {
            let fresh = pki::generate_self_signed(&self.client_id, VALIDITY_DAYS)
                .map_err(|e| PushError::Key(e.to_string()))?;
            self.write(&[
                (keys::NEXT_CERTIFICATE, Some(&fresh.certificate_pem)),
                (keys::NEXT_PRIVATE_KEY, Some(&fresh.private_key_pem)),
            ])
            .await?;
            step!("aws-push-after-new-key");
            next = Some((fresh.certificate_pem, fresh.private_key_pem));
        }
        let Some((cert, key)) = next else {
            // Nothing to replace: check the policy and its attachment (drift), then connect.
            let (cert, key, id, arn) = current.ok_or(PushError::Incomplete)?;
            self.ensure_policy(c, &owner, &arn, true).await?;
            return Ok((
                Identity {
                    certificate_pem: cert,
                    private_key_pem: key,
                    certificate_id: id,
                },
                None,
            ));
        };
        // Step 3: the new certificate active and allowed before it becomes current.
        let active = certificate::register(c, &cert).await?;
        self.ensure_policy(c, &owner, &active.arn, current.is_some())
            .await?;
        step!("aws-push-before-promote");
        let retired = current.map(|(_, _, id, _)| id);
        let now = Utc::now().to_rfc3339();
        self.write(&[
            (keys::ISSUED_AT, Some(&now)),
            (keys::CERTIFICATE, Some(&cert)),
            (keys::PRIVATE_KEY, Some(&key)),
            (keys::CERTIFICATE_ID, Some(&active.id)),
            (keys::CERTIFICATE_ARN, Some(&active.arn)),
            (keys::RETIRED_ID, retired.as_deref()),
            (keys::NEXT_CERTIFICATE, None),
            (keys::NEXT_PRIVATE_KEY, None),
        ])
        .await?;
        tracing::info!(certificate = %active.id, "push channel certificate active");
        Ok((
            Identity {
                certificate_pem: cert,
                private_key_pem: key,
                certificate_id: active.id,
            },
            retired,
        ))
    }

    /// The policy exists (ours) with the current document and is attached to `cert_arn`.
    async fn ensure_policy(
        &self,
        c: &AwsClients,
        owner: &Owner<'_>,
        cert_arn: &str,
        was_provisioned: bool,
    ) -> Result<(), PushError> {
        let arn = parse_arn(cert_arn).ok_or_else(|| PushError::Arn(cert_arn.to_string()))?;
        let document = operator_policy(&arn, &self.client_id, &self.name_scope);
        let mut notices = Vec::new();
        provision::ensure_policy(
            c,
            &self.policy_name,
            &document,
            owner,
            was_provisioned,
            &mut notices,
        )
        .await?;
        for n in notices {
            tracing::warn!(reason = %n.reason, "push channel policy: {}", n.message);
        }
        // AttachPolicy is idempotent: attaching again is cheaper than listing first.
        step!("aws-push-before-attach-policy");
        c.call(Family::Policy, "AttachPolicy", || {
            c.iot
                .attach_policy()
                .policy_name(&self.policy_name)
                .target(cert_arn)
                .send()
        })
        .await
        .map_err(|e| PushError::Aws(e.into_error("AttachPolicy")))?;
        Ok(())
    }

    /// Step 4: removes a retired certificate (detach, deactivate, delete), then its record.
    pub async fn retire(&self, c: &AwsClients, id: &str) -> Result<(), PushError> {
        certificate::remove(c, id, None, None).await?;
        step!("aws-push-after-retire");
        self.write(&[(keys::RETIRED_ID, None)]).await?;
        tracing::info!(certificate = %id, "previous push channel certificate removed");
        Ok(())
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operator_policy_allows_only_what_the_channel_does() {
        let arn = ArnParts {
            partition: "aws".into(),
            region: "eu-west-1".into(),
            account: "123".into(),
        };
        let p = operator_policy(&arn, "thing-operator-prod", "prod:");
        let statements = p["Statement"].as_array().unwrap();
        assert_eq!(statements.len(), 3);
        assert_eq!(
            statements[0]["Resource"],
            "arn:aws:iot:eu-west-1:123:client/thing-operator-prod"
        );
        let actions: Vec<&str> = statements
            .iter()
            .map(|s| s["Action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["iot:Connect", "iot:Subscribe", "iot:Receive"]);
        for r in statements[2]["Resource"].as_array().unwrap() {
            let r = r.as_str().unwrap();
            assert!(
                r.starts_with("arn:aws:iot:eu-west-1:123:topic/$aws/things/prod:*/shadow/"),
                "{r}"
            );
            assert!(r.ends_with("/update/documents"), "{r}");
        }
        assert!(!p.to_string().contains("iot:Publish"));
    }
}
