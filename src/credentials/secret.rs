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
}

#[derive(Clone)]
pub struct DeviceSecret {
    api: Api<Secret>,
    name: String,
    owner: Option<OwnerReference>,
    thing_name: String,
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

    /// The Secret's data, or `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<SecretData>, SecretError> {
        let secret = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| SecretError::Read {
                name: self.name.clone(),
                source,
            })?;
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    /// Replaces the Secret's data with `data` (server-side apply; keys not given are removed).
    pub async fn write(&self, data: SecretData) -> Result<(), SecretError> {
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
