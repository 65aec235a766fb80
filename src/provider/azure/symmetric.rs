//! Symmetric-key (SAS) devices, `credentials.source: CloudIssued` on Azure: IoT Hub generates
//! the device's keys and the operator copies the device connection string into the Secret. The
//! hub is the source of truth for the keys: when they are regenerated on the hub, the Secret
//! follows at the next full check.
//!
//! Crash safety: the hub makes the keys in the call that creates the device, so a crash before
//! they reach the Secret would leave a device without owner tag and nothing in the cluster to
//! prove it is this Thing's. The Secret therefore gets a pending marker *before* the create call;
//! an untagged SAS device is this Thing's when the Secret holds its key or that marker. A 409 on
//! create (someone else's device) clears the marker before anything else happens.

use chrono::Utc;

use super::{
    AzureProvider,
    client::{Authentication, Device, Twin},
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

fn sas_device(device_id: &str) -> Device {
    Device {
        device_id: device_id.to_string(),
        etag: None,
        status: Some("enabled".into()),
        authentication: Authentication {
            type_: "sas".into(),
            ..Authentication::default()
        },
    }
}

/// The Secret of a SAS device: facts, host name, device id, and the connection string (or, before
/// the hub answered, the pending marker).
fn secret_data(
    facts: &DeviceFacts,
    host_name: &str,
    key: Option<&str>,
    pending: bool,
) -> SecretData {
    let mut d = SecretData::new();
    let mut put = |k: &str, v: String| {
        d.insert(k.to_string(), v.into_bytes());
    };
    put(keys::ENDPOINT, facts.endpoint.clone());
    put(keys::THING_NAME, facts.thing_name.clone());
    put(keys::CLIENT_ID, facts.client_id.clone());
    put(azure_keys::HOST_NAME, host_name.to_string());
    put(azure_keys::DEVICE_ID, facts.thing_name.clone());
    if let Some(key) = key {
        put(
            CONNECTION_STRING,
            format!(
                "HostName={host_name};DeviceId={};SharedAccessKey={key}",
                facts.thing_name
            ),
        );
    }
    if pending {
        put(keys::PENDING_SINCE, Utc::now().to_rfc3339());
    }
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

/// Whether `data` proves the device with `auth` is this Thing's: it holds one of its keys, or the
/// marker of a create call whose answer never reached it.
fn proves(data: &SecretData, auth: &Authentication) -> bool {
    if data.contains_key(keys::PENDING_SINCE) {
        return true;
    }
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
                data = secret_data(facts, &host, key_in(&data).as_deref(), true);
                req.secret.write(data.clone()).await.map_err(|e| {
                    record_failure(status, types::CREDENTIALS_READY, AzureError::from(e))
                })?;
                step!("azure-before-create-device");
                match c.put_device(&sas_device(device_id), None).await {
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
                    Err(e) if e.kind() == Some(ApiErrorKind::AlreadyExists) => {
                        // Not made by this call: the marker must not vouch for it.
                        data.remove(keys::PENDING_SINCE);
                        req.secret.write(data.clone()).await?;
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
            // Drift (or an adopted X.509 device): back to hub-generated keys.
            let mut fixed = sas_device(device_id);
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
        let want = secret_data(facts, &host, Some(&key), false);
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
    use crate::provider::azure::client::SymmetricKeys;

    #[test]
    fn a_secret_proves_a_sas_device_by_its_key_or_a_pending_create() {
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
        let with_key = secret_data(&facts, "h", Some("k2"), false);
        assert_eq!(
            text(&with_key, CONNECTION_STRING).as_deref(),
            Some("HostName=h;DeviceId=dev;SharedAccessKey=k2")
        );
        assert!(proves(&with_key, &auth));
        assert!(!proves(&secret_data(&facts, "h", Some("k3"), false), &auth));
        assert!(!proves(&secret_data(&facts, "h", None, false), &auth));
        assert!(proves(&secret_data(&facts, "h", None, true), &auth));
    }
}
