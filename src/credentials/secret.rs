//! The device Secret: what a device or a Deployment mounts to connect.
//!
//! Written with server-side apply, owned by its Thing (controller ownerReference), so Kubernetes
//! garbage-collects it with the Thing. Its contents never reach logs: errors name the Secret,
//! never its data.

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

use crate::{api::Thing, provider::BackendFailure};

/// Key names inside the device Secret, chosen to be mountable as-is.
pub mod keys {
    /// PEM device certificate.
    pub const CERTIFICATE: &str = "tls.crt";
    /// PEM private key.
    pub const PRIVATE_KEY: &str = "tls.key";
    /// PEM root CA(s) of the server the device connects to.
    pub const CA: &str = "ca.crt";
    /// Host (and port) of the MQTT endpoint.
    pub const ENDPOINT: &str = "endpoint";
    pub const THING_NAME: &str = "thingName";
    pub const CLIENT_ID: &str = "clientId";
    pub const USERNAME: &str = "username";
    pub const PASSWORD: &str = "password";
    /// Id of the certificate in `tls.crt` as the backend knows it.
    pub const CERTIFICATE_ID: &str = "certificateId";
}

/// Label put on every device Secret, naming its Thing.
pub const THING_LABEL: &str = "iot.thing-operator.dev/thing";
const FIELD_MANAGER: &str = "thing-operator";

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
    pub async fn read(&self) -> Result<Option<BTreeMap<String, Vec<u8>>>, BackendFailure> {
        let secret =
            self.api.get_opt(&self.name).await.map_err(|e| {
                BackendFailure::Secret(format!("reading Secret {}: {}", self.name, e))
            })?;
        Ok(secret.map(|s| {
            s.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect()
        }))
    }

    /// One key as UTF-8 text.
    pub fn text(data: &BTreeMap<String, Vec<u8>>, key: &str) -> Option<String> {
        data.get(key)
            .and_then(|v| String::from_utf8(v.clone()).ok())
    }

    /// Replaces the Secret's data with `data` (server-side apply; keys not given are removed).
    pub async fn write(&self, data: BTreeMap<String, Vec<u8>>) -> Result<(), BackendFailure> {
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
        let mut value = serde_json::to_value(&secret)
            .map_err(|e| BackendFailure::Secret(format!("encoding Secret {}: {}", self.name, e)))?;
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
            .map_err(|e| BackendFailure::Secret(format!("writing Secret {}: {}", self.name, e)))?;
        Ok(())
    }
}
