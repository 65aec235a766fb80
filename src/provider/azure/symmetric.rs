//! Symmetric-key (SAS) devices, `credentials.source: CloudIssued` on Azure: the device
//! authenticates with a key it shares with the hub, and the Secret holds its device connection
//! string (layout and rotation journal: [`super::key_state`]). Outside a rotation the hub is the
//! source of truth for the working key: regenerated on the hub, the Secret follows at the next
//! full check.
//!
//! The first keys are generated in the operator (IoT Hub accepts provided keys) and written to the
//! Secret *before* the create call, so that an untagged device (a crash between creating and
//! tagging) is proven to be this Thing's by its key, which nobody else can know. Keys the hub
//! generated would reach the Secret only after the create call, and a marker standing in for them
//! could be forged: a tenant may create a Secret that looks like its device Secret.
//!
//! Rotation (the rotate annotation or `rotateAfter`), with zero downtime through the hub's two
//! keys, each step safe to repeat after a crash:
//! 1. a new key goes into the Secret's `next` slot (the device keeps its working key);
//! 2. the hub gets the new key as primary and the working key as secondary;
//! 3. the Secret makes the new key the working one and keeps the old one as `previous` until
//!    `rotationOverlap` has passed (a device that has not reloaded keeps connecting);
//! 4. after the overlap the hub's secondary is replaced by a fresh key nobody is given, then the
//!    Secret forgets the previous key.

use chrono::Utc;

use super::{
    AzureProvider,
    client::{Authentication, Device, SymmetricKeys, Twin},
    error::{ApiErrorKind, AzureError},
    key_state::KeyState,
    ownership::{self, Claim},
    reconcile::missing_twin,
};
use crate::{
    api::{ThingStatus, conditions::types, thing::Broker},
    credentials::{DeviceSecret, SecretData, codec::DeviceFacts},
    failpoints::step,
    provider::{
        DeviceRequest, Notice,
        aws::certs::rotation::{RotationJournal, rotation_due_for, rotation_token},
        status::{DeviceIdentity, record_device, record_failure, set_condition},
    },
};

/// A new random key, base64 (32 bytes, as IoT Hub generates them).
fn new_key() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

/// A SAS device with `primary` and `secondary` (a fresh key nobody is given when `None`).
fn sas_device(device_id: &str, primary: &str, secondary: Option<&str>) -> Device {
    Device {
        device_id: device_id.to_string(),
        etag: None,
        status: Some("enabled".into()),
        authentication: Authentication {
            type_: "sas".into(),
            symmetric_key: SymmetricKeys {
                primary_key: Some(primary.to_string()),
                secondary_key: Some(secondary.map(str::to_string).unwrap_or_else(new_key)),
            },
            ..Authentication::default()
        },
    }
}

/// The hub's (primary, secondary) keys of `device`.
fn hub_keys(device: &Device) -> (Option<&str>, Option<&str>) {
    let k = &device.authentication.symmetric_key;
    (k.primary_key.as_deref(), k.secondary_key.as_deref())
}

/// Whether this Thing's Secret proves the device with `auth` is its own (a missing or foreign
/// Secret proves nothing).
pub async fn secret_holds_key_of(secret: &DeviceSecret, auth: &Authentication) -> bool {
    match secret.read().await {
        Ok(Some(data)) => KeyState::from_data(&data).proves(auth),
        _ => false,
    }
}

/// What a full check of a SAS device works with.
struct KeyContext<'a> {
    req: &'a DeviceRequest<'a>,
    device_id: &'a str,
    facts: &'a DeviceFacts,
    host: &'a str,
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
        let cx = KeyContext {
            req,
            device_id,
            facts,
            host: &host,
        };
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
        let mut state = KeyState::from_data(&data);
        if state.key.is_none() {
            // The first key; a rotate annotation present now asks for nothing yet.
            state.key = Some(new_key());
            state.issued_at = Some(Utc::now());
            state.rotation_token = rotation_token(req.thing);
        }
        // A Secret written before rotation existed has no issuance time: count from now.
        state.issued_at.get_or_insert_with(Utc::now);
        let key = state.key.clone().unwrap_or_default();
        let device = match c.get_device(device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                // The key goes into the Secret first (see the module docs).
                self.write_keys(&cx, &state, &mut data, status).await?;
                step!("azure-before-create-device");
                match c.put_device(&sas_device(device_id, &key, None), None).await {
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
        if let Claim::Refuse(why) = ownership::claim(
            &twin.tags,
            &self.owner(req),
            state.proves(&device.authentication),
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
            let mut fixed = sas_device(device_id, &key, None);
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
        self.converge_keys(&cx, device, &mut state, &mut data, status, notices)
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        self.write_keys(&cx, &state, &mut data, status).await?;
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
        let creds = status.credentials.get_or_insert_with(Default::default);
        if creds.issued_at != state.issued_at {
            creds.issued_at = state.issued_at;
        }
        if creds.previous_revoke_at != state.previous_revoke_at {
            creds.previous_revoke_at = state.previous_revoke_at;
        }
        set_condition(
            status,
            types::PROVISIONED,
            true,
            "Provisioned",
            format!("device {device_id} in hub {host}"),
        );
        let message = match state.previous_revoke_at {
            Some(at) if state.previous_key.is_some() => format!(
                "the hub's primary key is in Secret {} as a device connection string; the previous key stays valid until {}",
                req.secret.name(),
                at.to_rfc3339()
            ),
            _ => format!(
                "the hub's primary key is in Secret {} as a device connection string",
                req.secret.name()
            ),
        };
        set_condition(
            status,
            types::CREDENTIALS_READY,
            true,
            "SymmetricKeyActive",
            message,
        );
        Ok(twin)
    }

    /// Writes the Secret for `state` unless it already holds exactly that.
    async fn write_keys(
        &self,
        cx: &KeyContext<'_>,
        state: &KeyState,
        data: &mut SecretData,
        status: &mut ThingStatus,
    ) -> Result<(), AzureError> {
        let want = state.to_data(cx.facts, cx.host);
        if want != *data {
            cx.req.secret.write(want.clone()).await.map_err(|e| {
                record_failure(status, types::CREDENTIALS_READY, AzureError::from(e))
            })?;
            *data = want;
        }
        Ok(())
    }

    /// Puts the device's keys to (`primary`, `secondary`) with its etag.
    async fn set_keys(
        &self,
        device: &Device,
        primary: &str,
        secondary: Option<&str>,
    ) -> Result<Device, AzureError> {
        let mut fixed = sas_device(&device.device_id, primary, secondary);
        fixed.status = device.status.clone();
        self.client
            .put_device(&fixed, device.etag.as_deref().or(Some("*")))
            .await
    }

    /// The keys of a SAS device that is ours: a rotation started, resumed or finished (see the
    /// module docs), or else the Secret follows the hub's primary key.
    async fn converge_keys(
        &self,
        cx: &KeyContext<'_>,
        device: Device,
        state: &mut KeyState,
        data: &mut SecretData,
        status: &mut ThingStatus,
        notices: &mut Vec<Notice>,
    ) -> Result<(), AzureError> {
        let now = Utc::now();
        let spec = &cx.req.thing.spec.credentials;
        let device_id = cx.device_id;
        let (primary, secondary) = hub_keys(&device);
        let mut reason = None;
        if state.next_key.is_none() && state.previous_key.is_none() {
            // Outside a rotation the hub is the source of truth for the working key.
            let hub_primary = primary.ok_or(AzureError::Api {
                op: "GetDevice",
                status: 200,
                code: Some("NoPrimaryKey".into()),
                kind: ApiErrorKind::Server,
            })?;
            if state.key.as_deref() != Some(hub_primary) {
                state.key = Some(hub_primary.to_string());
                state.issued_at = Some(now);
            }
            let token = rotation_token(cx.req.thing);
            let journal = RotationJournal {
                what: "key",
                in_overlap: false,
                issued_at: state.issued_at,
                handled_token: state.rotation_token.as_deref(),
            };
            if let Some(why) = rotation_due_for(journal, spec, token.as_deref(), now) {
                // Step 1: the new key is in the cluster before the hub hears of it.
                state.next_key = Some(new_key());
                state.rotation_token = token;
                self.write_keys(cx, state, data, status).await?;
                step!("azure-after-rotate-secret");
                reason = Some(why);
            }
        }
        if let (Some(next), Some(current)) = (state.next_key.clone(), state.key.clone()) {
            // Step 2: new key primary, working key secondary.
            if primary != Some(next.as_str()) || secondary != Some(current.as_str()) {
                self.set_keys(&device, &next, Some(&current)).await?;
                step!("azure-after-register-keys");
            }
            // Step 3: the new key is the working one; the old stays valid for the overlap.
            let overlap = spec
                .rotation_overlap_duration()
                .unwrap_or(self.settings.default_rotation_overlap);
            state.previous_key = Some(current);
            state.key = Some(next);
            state.next_key = None;
            state.issued_at = Some(now);
            state.previous_revoke_at =
                Some(now + chrono::Duration::from_std(overlap).unwrap_or_default());
            self.write_keys(cx, state, data, status).await?;
            notices.push(Notice::normal(
                "KeyRotated",
                format!(
                    "{}: device {device_id} has a new primary key in Secret {}; the previous key stays valid for {}",
                    reason.as_deref().unwrap_or("an interrupted rotation resumed"),
                    cx.req.secret.name(),
                    humantime::format_duration(overlap)
                ),
            ));
            return Ok(());
        }
        let (Some(previous), Some(current)) = (state.previous_key.clone(), state.key.clone())
        else {
            return Ok(());
        };
        if state.overlap_over(now) {
            // Step 4: the hub forgets the previous key (replaced by one nobody is given), then
            // the Secret does.
            if secondary == Some(previous.as_str()) || primary != Some(current.as_str()) {
                self.set_keys(&device, &current, None).await?;
                step!("azure-after-revoke-previous-key");
            }
            state.previous_key = None;
            state.previous_revoke_at = None;
            self.write_keys(cx, state, data, status).await?;
            notices.push(Notice::normal(
                "PreviousKeyRevoked",
                format!(
                    "device {device_id}: the key replaced by the last rotation is no longer valid"
                ),
            ));
        } else if primary != Some(current.as_str()) || secondary != Some(previous.as_str()) {
            // During the overlap the operator owns both keys: changed on the hub, restored.
            self.set_keys(&device, &current, Some(&previous)).await?;
            notices.push(Notice::warning(
                "DriftRepaired",
                format!("device {device_id}: its keys were changed outside the operator during a rotation overlap; restored"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sas_devices_get_a_fresh_secondary_unless_one_is_given() {
        let a = sas_device("dev", "k1", None);
        let b = sas_device("dev", "k1", None);
        assert_eq!(hub_keys(&a).0, Some("k1"));
        assert_ne!(hub_keys(&a).1, hub_keys(&b).1);
        assert_eq!(hub_keys(&sas_device("dev", "k1", Some("k0"))).1, Some("k0"));
        let k = new_key();
        assert_ne!(k, new_key());
        assert_eq!(k.len(), 44);
    }
}
