//! Symmetric-key (SAS) devices, `credentials.source: CloudIssued` on Azure: the device
//! authenticates with a key it shares with the hub, and the Secret holds its device connection
//! string. After creation the hub is the source of truth for the keys: regenerated on the hub,
//! the Secret follows at the next full check.
//!
//! The first keys are generated in the operator (IoT Hub accepts provided keys) and written to the
//! Secret *before* the create call, so that an untagged device (a crash between creating and
//! tagging) is proven to be this Thing's by its key, which nobody else can know. Keys the hub
//! generated would reach the Secret only after the create call, and a marker standing in for them
//! could be forged: a tenant may create a Secret that looks like its device Secret.

use super::{
    AzureProvider,
    client::{Authentication, Device, SymmetricKeys, Twin},
    credentials::keys as azure_keys,
    error::{ApiErrorKind, AzureError},
    ownership::{self, Claim},
    reconcile::missing_twin,
};
use crate::{
    api::{ThingStatus, conditions::types, thing::Broker},
    credentials::{
        DeviceSecret, SecretData,
        codec::{DeviceFacts, keys, text},
    },
    failpoints::step,
    provider::{
        DeviceRequest, Notice,
        status::{DeviceIdentity, record_device, record_failure, set_condition},
    },
};

/// The device connection string a SAS device uses.
pub const CONNECTION_STRING: &str = "connectionString";

/// A new random key, base64 (32 bytes, as IoT Hub generates them).
fn new_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

fn sas_device(device_id: &str, primary: &str) -> Device {
    Device {
        device_id: device_id.to_string(),
        etag: None,
        status: Some("enabled".into()),
        authentication: Authentication {
            type_: "sas".into(),
            symmetric_key: SymmetricKeys {
                primary_key: Some(primary.to_string()),
                secondary_key: Some(new_key()),
            },
            ..Authentication::default()
        },
    }
}

/// The Secret of a SAS device: facts, host name, device id and the connection string.
fn secret_data(facts: &DeviceFacts, host_name: &str, key: &str) -> SecretData {
    let mut d = SecretData::new();
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), v.into_bytes());
    };
    put(keys::ENDPOINT, facts.endpoint.clone());
    put(keys::THING_NAME, facts.thing_name.clone());
    put(keys::CLIENT_ID, facts.client_id.clone());
    put(azure_keys::HOST_NAME, host_name.to_string());
    put(azure_keys::DEVICE_ID, facts.thing_name.clone());
    put(
        CONNECTION_STRING,
        format!(
            "HostName={host_name};DeviceId={};SharedAccessKey={key}",
            facts.thing_name
        ),
    );
    if let Some(ca) = &facts.ca {
        d.insert(keys::CA.to_string(), ca.clone());
    }
    d
}

/// The key in a Secret's connection string.
fn key_in(data: &SecretData) -> Option<String> {
    let cs = text(data, CONNECTION_STRING)?;
    cs.split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .map(str::to_string)
}

/// Whether `data` proves the device with `auth` is this Thing's: it holds one of its keys.
fn proves(data: &SecretData, auth: &Authentication) -> bool {
    let Some(key) = key_in(data) else {
        return false;
    };
    let k = &auth.symmetric_key;
    [&k.primary_key, &k.secondary_key]
        .into_iter()
        .flatten()
        .any(|have| *have == key)
}

/// [`proves`], reading this Thing's Secret (a missing or foreign Secret proves nothing).
pub async fn secret_holds_key_of(secret: &DeviceSecret, auth: &Authentication) -> bool {
    match secret.read().await {
        Ok(Some(data)) => proves(&data, auth),
        _ => false,
    }
}

impl AzureProvider {
    /// Steps 2 and 3 of the full check for a SAS device. Returns the twin read for ownership.
    pub(super) async fn converge_symmetric(
        &self,
        req: &DeviceRequest<'_>,
        device_id: &str,
        facts: &DeviceFacts,
        status: &mut ThingStatus,
        notices: &mut Vec<Notice>,
    ) -> Result<Twin, AzureError> {
        let c = &self.client;
        let host = self.host_name().to_string();
        let provisioned_once = status
            .device
            .as_ref()
            .is_some_and(|d| d.device_id.is_some());
        let mut data = req
            .secret
            .read()
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, AzureError::from(e)))?
            .unwrap_or_default();
        let device = match c.get_device(device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                // The key goes into the Secret first (see the module docs).
                let key = key_in(&data).unwrap_or_else(new_key);
                let want = secret_data(facts, &host, &key);
                if want != data {
                    req.secret.write(want.clone()).await.map_err(|e| {
                        record_failure(status, types::CREDENTIALS_READY, AzureError::from(e))
                    })?;
                    data = want;
                }
                step!("azure-before-create-device");
                match c.put_device(&sas_device(device_id, &key), None).await {
                    Ok(d) => {
                        step!("azure-after-create-device");
                        if provisioned_once {
                            notices.push(Notice::warning(
                                "DriftRepaired",
                                format!(
                                    "device {device_id} had been deleted from the hub; re-created"
                                ),
                            ));
                        }
                        d
                    }
                    // Made in between by someone else (or a retried request): decided below.
                    Err(e) if e.kind() == Some(ApiErrorKind::AlreadyExists) => {
                        c.get_device(device_id).await?.ok_or(e)?
                    }
                    Err(e) => return Err(record_failure(status, types::PROVISIONED, e)),
                }
            }
            Err(e) => return Err(record_failure(status, types::PROVISIONED, e)),
        };
        let twin = c
            .get_twin(device_id)
            .await
            .map_err(|e| record_failure(status, types::PROVISIONED, e))?
            .ok_or_else(missing_twin)?;
        let holds = proves(&data, &device.authentication);
        if let Claim::Refuse(why) = ownership::claim(
            &twin.tags,
            &self.owner(req),
            holds,
            self.settings.adopt_unowned,
        ) {
            let e = AzureError::NotOwner {
                device_id: device_id.to_string(),
                why,
            };
            return Err(record_failure(status, types::PROVISIONED, e));
        }
        let device = if device.authentication.type_ == "sas" {
            device
        } else {
            // Drift (or an adopted X.509 device): back to a symmetric key.
            let key = key_in(&data).unwrap_or_else(new_key);
            let mut fixed = sas_device(device_id, &key);
            fixed.status = device.status.clone();
            let d = c
                .put_device(&fixed, device.etag.as_deref().or(Some("*")))
                .await
                .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
            notices.push(Notice::warning(
                "DriftRepaired",
                format!("device {device_id}: its authentication was changed outside the operator; restored to symmetric keys"),
            ));
            d
        };
        let key = device
            .authentication
            .symmetric_key
            .primary_key
            .clone()
            .ok_or(AzureError::Api {
                op: "GetDevice",
                status: 200,
                code: Some("NoPrimaryKey".into()),
                kind: ApiErrorKind::Server,
            })?;
        let want = secret_data(facts, &host, &key);
        if want != data {
            req.secret.write(want).await.map_err(|e| {
                record_failure(status, types::CREDENTIALS_READY, AzureError::from(e))
            })?;
        }
        record_device(
            status,
            DeviceIdentity {
                broker: Broker::Azure,
                thing_name: device_id,
                client_id: device_id,
                endpoint: &facts.endpoint,
                topic: &format!("devices/{device_id}/messages/events"),
                secret_name: req.secret.name(),
                policy_name: None,
            },
        );
        let d = status.device.get_or_insert_with(Default::default);
        if d.device_id.as_deref() != Some(device_id) {
            d.device_id = Some(device_id.to_string());
        }
        set_condition(
            status,
            types::PROVISIONED,
            true,
            "Provisioned",
            format!("device {device_id} in hub {host}"),
        );
        set_condition(
            status,
            types::CREDENTIALS_READY,
            true,
            "SymmetricKeyActive",
            format!(
                "the hub's primary key is in Secret {} as a device connection string",
                req.secret.name()
            ),
        );
        Ok(twin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_proves_a_sas_device_only_by_its_key() {
        let facts = DeviceFacts {
            endpoint: "h:8883".into(),
            thing_name: "dev".into(),
            client_id: "dev".into(),
            ca: None,
        };
        let auth = Authentication {
            type_: "sas".into(),
            symmetric_key: SymmetricKeys {
                primary_key: Some("k1".into()),
                secondary_key: Some("k2".into()),
            },
            ..Authentication::default()
        };
        let with_key = secret_data(&facts, "h", "k2");
        assert_eq!(
            text(&with_key, CONNECTION_STRING).as_deref(),
            Some("HostName=h;DeviceId=dev;SharedAccessKey=k2")
        );
        assert!(proves(&with_key, &auth));
        assert!(!proves(&secret_data(&facts, "h", "k3"), &auth));
        // A marker or anything else a tenant could write proves nothing.
        let mut forged = SecretData::new();
        forged.insert(keys::PENDING_SINCE.into(), b"2026-01-01T00:00:00Z".to_vec());
        assert!(!proves(&forged, &auth));
        let a = new_key();
        assert_ne!(a, new_key());
        assert_eq!(a.len(), 44);
    }
}
