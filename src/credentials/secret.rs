//! The device Secret: what a device or a Deployment mounts to connect.
//!
//! Written with server-side apply, owned by its Thing (controller ownerReference), so Kubernetes
//! garbage-collects it with the Thing. Its contents never reach logs: errors name the Secret,
//! never its data. What the keys hold is [`super::codec`]'s business; this module only moves
//! the bytes.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};

use super::codec::SecretData;
use crate::api::Thing;

/// Label put on every device Secret, naming its Thing.
pub const THING_LABEL: &str = "iot.thing-operator.dev/thing";
const FIELD_MANAGER: &str = "thing-operator";

/// Reading or writing a device Secret failed. The Kubernetes error is kept as the source; the
/// message names the Secret only.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the device Secret {name}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the device Secret {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("encoding the device Secret {name}")]
    Encode {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    /// A Secret of that name exists and is not this Thing's: the operator neither reads nor
    /// writes it (it may be a database password, or another Thing's credentials).
    #[error(
        "Secret {name} exists and was not created by the operator for this Thing; choose another credentials.secretName or delete that Secret"
    )]
    Conflict { name: String },
}

impl SecretError {
    /// The condition reason: `SecretConflict` for a Secret that is not this Thing's,
    /// `SecretError` for a failed read or write.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretError::Conflict { .. } => "SecretConflict",
            _ => "SecretError",
        }
    }
}

#[derive(Clone)]
pub struct DeviceSecret {
    api: Api<Secret>,
    name: String,
    owner: Option<OwnerReference>,
    thing_name: String,
}

/// Whether `secret` is the device Secret of the Thing `owner` points to: it carries a controller
/// ownerReference to that Thing's uid. A label alone proves nothing (anyone who may create a
/// Secret may label it); an ownerReference to a Thing's uid is only ever put there by the
/// operator or by someone who may already write that namespace's Secrets.
fn is_owned_by(secret: &Secret, owner: Option<&OwnerReference>) -> bool {
    let Some(owner) = owner else { return false };
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|r| r.controller == Some(true) && r.uid == owner.uid)
}

impl DeviceSecret {
    pub fn for_thing(client: Client, thing: &Thing, namespace: &str, secret_name: String) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: secret_name,
            owner: thing.controller_owner_ref(&()),
            thing_name: thing.meta().name.clone().unwrap_or_default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Secret as it is now, refusing one that is not this Thing's.
    async fn get_own(&self) -> Result<Option<Secret>, SecretError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| SecretError::Read {
                name: self.name.clone(),
                source,
            })?;
        match secret {
            Some(s) if !is_owned_by(&s, self.owner.as_ref()) => Err(SecretError::Conflict {
                name: self.name.clone(),
            }),
            other => Ok(other),
        }
    }

    /// The Secret's data, or `None` when it does not exist. A Secret of that name that is not
    /// this Thing's is a [`SecretError::Conflict`]: its data is never read, so its keys can never
    /// become this Thing's credentials.
    pub async fn read(&self) -> Result<Option<SecretData>, SecretError> {
        let secret = self.get_own().await?;
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    /// Replaces the Secret's data with `data` (server-side apply; keys not given are removed).
    /// Refuses to touch a Secret of that name that is not this Thing's (checked just before the
    /// write; the window between the check and the write is one request long).
    pub async fn write(&self, data: SecretData) -> Result<(), SecretError> {
        self.get_own().await?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([
                    (THING_LABEL.to_string(), self.thing_name.clone()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        "thing-operator".to_string(),
                    ),
                ])),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
            ..Secret::default()
        };
        let mut value = serde_json::to_value(&secret).map_err(|source| SecretError::Encode {
            name: self.name.clone(),
            source,
        })?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("apiVersion".into(), "v1".into());
            obj.insert("kind".into(), "Secret".into());
        }
        self.api
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(value),
            )
            .await
            .map_err(|source| SecretError::Write {
                name: self.name.clone(),
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_with(owners: serde_json::Value) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "ownerReferences": owners}
        }))
        .expect("a Secret")
    }

    fn owner(uid: &str) -> OwnerReference {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "Thing", "name": "lamp",
            "uid": uid, "controller": true
        }))
        .expect("an owner")
    }

    #[test]
    fn only_a_secret_controlled_by_this_things_uid_is_its_own() {
        let me = owner("uid-1");
        let mine = secret_with(serde_json::json!([me]));
        assert!(is_owned_by(&mine, Some(&me)));
        // Another Thing's (same name, other uid), a non-controller reference, none at all.
        assert!(!is_owned_by(
            &secret_with(serde_json::json!([owner("uid-2")])),
            Some(&me)
        ));
        let mut weak = owner("uid-1");
        weak.controller = None;
        assert!(!is_owned_by(
            &secret_with(serde_json::json!([weak])),
            Some(&me)
        ));
        assert!(!is_owned_by(&secret_with(serde_json::json!([])), Some(&me)));
        assert!(!is_owned_by(&mine, None));
        assert_eq!(
            SecretError::Conflict { name: "s".into() }.reason(),
            "SecretConflict"
        );
    }
}
