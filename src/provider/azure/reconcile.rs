//! Reconcile and cleanup of one Azure Thing (the [`IotProvider`] implementation).
//!
//! Full check, in this order (each step safe to repeat after a crash):
//! 1. the spec against IoT Hub's rules (device id, twin key grammar, limits): `InvalidSpec`
//!    before anything is created;
//! 2. the device certificate in the Secret (key first, so a registered thumbprint always has its
//!    key in the cluster);
//! 3. the device: created when missing (409 from a race: read again), else its twin's owner tag
//!    decides whether it is ours ([`ownership::claim`]); a thumbprint that drifted is put back
//!    (If-Match with the device's etag);
//! 4. the twin: owner tag, attributes as tags and desired properties in one PATCH with the twin's
//!    etag, only when something differs.
//!
//! Between full checks a reconcile only reads the twin (step 4), paced by the poll interval and
//! the client's twin-read quota; reported `$version` decides whether status changes.

use std::time::Duration;

use async_trait::async_trait;
use kube::ResourceExt;
use serde_json::{Map, Value};

use super::{
    AzureError, AzureProvider,
    client::{Authentication, Device, Thumbprints, Twin},
    credentials::{self, DeviceCertificate},
    error::ApiErrorKind,
    ownership::{self, Claim},
    symmetric, twin,
};
use crate::{
    api::{ThingStatus, conditions::types, thing::Broker, thing::CredentialSource},
    credentials::codec::DeviceFacts,
    failpoints::step,
    provider::{
        DeviceOutcome, DeviceRequest, IotProvider, Notice, ProviderError,
        aws::certs::rotation::{rotation_due, rotation_token},
        ownership::owner_record,
        status::{DeviceIdentity, record_device, record_failure, set_condition},
    },
};

/// IoT Hub device ids: at most 128 characters of letters, digits and `-.%_*?!(),:=@$'`.
pub fn device_id_problem(id: &str) -> Option<String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-.%_*?!(),:=@$'".contains(c);
    if id.is_empty() || id.len() > 128 || !id.chars().all(allowed) {
        return Some(format!(
            "device id {id:?} must be 1-128 characters of letters, digits or -.%_*?!(),:=@$'"
        ));
    }
    None
}

/// The device as this Thing wants it: self-signed X.509 with its certificate's thumbprint (and
/// the previous certificate's while a rotation overlap lasts).
fn wanted_device(device_id: &str, thumbprint: &str, previous: Option<&str>) -> Device {
    Device {
        device_id: device_id.to_string(),
        etag: None,
        status: Some("enabled".into()),
        authentication: Authentication {
            type_: "selfSigned".into(),
            x509_thumbprint: Thumbprints {
                primary_thumbprint: Some(thumbprint.to_string()),
                secondary_thumbprint: previous.map(str::to_string),
            },
            ..Authentication::default()
        },
    }
}

/// A twin that is gone although its device was just read (deleted in between).
pub(super) fn missing_twin() -> AzureError {
    AzureError::Api {
        op: "GetTwin",
        status: 404,
        code: Some("DeviceNotFound".into()),
        kind: ApiErrorKind::NotFound,
    }
}

struct Wanted {
    tags: Map<String, Value>,
    desired: Map<String, Value>,
}

impl AzureProvider {
    pub(super) fn owner(&self, req: &DeviceRequest<'_>) -> String {
        owner_record(
            req.namespace,
            req.name,
            &req.thing.uid().unwrap_or_default(),
        )
    }

    /// What the twin should hold, or every reason the spec cannot be a twin.
    fn wanted(&self, req: &DeviceRequest<'_>, device_id: &str) -> Result<Wanted, AzureError> {
        let spec = &req.thing.spec;
        let tags = twin::wanted_tags(&spec.attributes, &self.owner(req));
        let desired = twin::wanted_desired(spec.desired.as_ref());
        let mut problems: Vec<String> = device_id_problem(device_id).into_iter().collect();
        problems.extend(twin::check_section("attributes (twin tags)", &tags));
        problems.extend(twin::check_section("desired", &desired));
        if !problems.is_empty() {
            return Err(AzureError::InvalidSpec(problems.join("; ")));
        }
        Ok(Wanted { tags, desired })
    }

    /// Steps 2 and 3 of the full check. Returns the twin read while checking ownership.
    async fn converge_device(
        &self,
        req: &DeviceRequest<'_>,
        device_id: &str,
        status: &mut ThingStatus,
        notices: &mut Vec<Notice>,
    ) -> Result<Twin, AzureError> {
        if req.thing.spec.credentials.source == CredentialSource::CloudIssued {
            let facts = DeviceFacts {
                endpoint: format!("{}:8883", self.host_name()),
                thing_name: device_id.to_string(),
                client_id: device_id.to_string(),
                ca: Some(self.ca_bundle.clone().into_bytes()),
            };
            return self
                .converge_symmetric(req, device_id, &facts, status, notices)
                .await;
        }
        self.converge_x509(req, device_id, status, notices).await
    }

    /// Steps 2 and 3 for an X.509 self-signed device.
    async fn converge_x509(
        &self,
        req: &DeviceRequest<'_>,
        device_id: &str,
        status: &mut ThingStatus,
        notices: &mut Vec<Notice>,
    ) -> Result<Twin, AzureError> {
        let c = &self.client;
        let completed_once = status
            .device
            .as_ref()
            .is_some_and(|d| d.certificate_id.is_some());
        let facts = DeviceFacts {
            endpoint: format!("{}:8883", self.host_name()),
            thing_name: device_id.to_string(),
            client_id: device_id.to_string(),
            ca: Some(self.ca_bundle.clone().into_bytes()),
        };
        let token = rotation_token(req.thing);
        let (mut cert, issued) = credentials::ensure(
            &req.secret,
            &facts,
            self.host_name(),
            self.settings.key_validity_days,
            token.clone(),
        )
        .await
        .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;

        let device = match c.get_device(device_id).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                step!("azure-before-create-device");
                match c
                    .put_device(&wanted_device(device_id, &cert.thumbprint, None), None)
                    .await
                {
                    Ok(d) => {
                        step!("azure-after-create-device");
                        if completed_once {
                            notices.push(Notice::warning(
                                "DriftRepaired",
                                format!(
                                    "device {device_id} had been deleted from the hub; re-created"
                                ),
                            ));
                        }
                        d
                    }
                    // Created in between (another replica, a retried request): decide as for
                    // any existing device.
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
            .ok_or(AzureError::Api {
                op: "GetTwin",
                status: 404,
                code: Some("DeviceNotFound".into()),
                kind: ApiErrorKind::NotFound,
            })?;
        match ownership::claim(
            &twin.tags,
            &self.owner(req),
            device.authentication.has_thumbprint(&cert.thumbprint),
            self.settings.adopt_unowned,
        ) {
            Claim::Ours => {}
            Claim::Adopt => {
                if twin.tags.get(twin::OWNER_TAG).is_none() && !completed_once && !issued {
                    tracing::info!(device = device_id, "adopting a device without owner record");
                }
            }
            Claim::Refuse(why) => {
                let e = AzureError::NotOwner {
                    device_id: device_id.to_string(),
                    why,
                };
                return Err(record_failure(status, types::PROVISIONED, e));
            }
        }
        // Rotation (one at a time): the new certificate goes into the Secret, then both
        // thumbprints into the hub; after the overlap the hub drops the old one, then the Secret.
        let spec = &req.thing.spec;
        let now = chrono::Utc::now();
        let mut expected_change = false;
        if let Some(reason) = rotation_due(&cert.state, &spec.credentials, token.as_deref(), now) {
            let overlap = spec
                .credentials
                .rotation_overlap_duration()
                .unwrap_or(self.settings.default_rotation_overlap);
            let old = cert.thumbprint.clone();
            cert = credentials::rotate(
                &req.secret,
                &facts,
                self.host_name(),
                self.settings.key_validity_days,
                &cert,
                overlap,
                token.clone(),
            )
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
            expected_change = true;
            notices.push(Notice::normal(
                "CertificateRotated",
                format!(
                    "{reason}: certificate {} replaces {old}; the old one stays registered for {}",
                    cert.thumbprint,
                    humantime::format_duration(overlap)
                ),
            ));
        }
        let overlap_over = credentials::overlap_over(&cert, now);
        expected_change |= overlap_over;
        // Record identifiers as soon as the device is known to be ours.
        self.record(req, device_id, &cert, status);
        let (primary, secondary) = credentials::wanted_thumbprints(&cert, now);
        let t = &device.authentication.x509_thumbprint;
        let same = |have: &Option<String>, want: Option<&str>| match (have.as_deref(), want) {
            (None | Some(""), None) => true,
            (Some(h), Some(w)) => h.eq_ignore_ascii_case(w),
            _ => false,
        };
        let auth_ok = device.authentication.type_ == "selfSigned"
            && same(&t.primary_thumbprint, Some(&primary))
            && same(&t.secondary_thumbprint, secondary.as_deref());
        if !auth_ok {
            let mut fixed = wanted_device(device_id, &primary, secondary.as_deref());
            fixed.status = device.status.clone();
            c.put_device(&fixed, device.etag.as_deref().or(Some("*")))
                .await
                .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
            step!("azure-after-register-thumbprints");
            if !expected_change {
                notices.push(Notice::warning(
                    "DriftRepaired",
                    format!("device {device_id}: its registered certificate was changed outside the operator; restored"),
                ));
            }
        }
        if overlap_over {
            let previous = cert.state.previous_cert_id.clone().unwrap_or_default();
            credentials::finish_overlap(&req.secret, &facts, self.host_name(), &mut cert)
                .await
                .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
            self.record(req, device_id, &cert, status);
            notices.push(Notice::normal(
                "PreviousCertificateRevoked",
                format!("certificate {previous} is no longer registered for device {device_id}"),
            ));
        }
        set_condition(
            status,
            types::PROVISIONED,
            true,
            "Provisioned",
            format!("device {device_id} in hub {}", self.host_name()),
        );
        set_condition(
            status,
            types::CREDENTIALS_READY,
            true,
            "CertificateActive",
            format!(
                "certificate {} is registered; Secret {} holds its key",
                cert.thumbprint,
                req.secret.name()
            ),
        );
        Ok(twin)
    }

    fn record(
        &self,
        req: &DeviceRequest<'_>,
        device_id: &str,
        cert: &DeviceCertificate,
        status: &mut ThingStatus,
    ) {
        let endpoint = format!("{}:8883", self.host_name());
        record_device(
            status,
            DeviceIdentity {
                broker: Broker::Azure,
                thing_name: device_id,
                client_id: device_id,
                endpoint: &endpoint,
                topic: &format!("devices/{device_id}/messages/events"),
                secret_name: req.secret.name(),
                policy_name: None,
            },
        );
        let device = status.device.get_or_insert_with(Default::default);
        if device.device_id.as_deref() != Some(device_id) {
            device.device_id = Some(device_id.to_string());
        }
        if device.certificate_id.as_deref() != Some(cert.thumbprint.as_str()) {
            device.certificate_id = Some(cert.thumbprint.clone());
        }
        let creds = status.credentials.get_or_insert_with(Default::default);
        if creds.issued_at != cert.state.issued_at {
            creds.issued_at = cert.state.issued_at;
        }
        let not_after = cert
            .state
            .cert_pem
            .as_deref()
            .and_then(|p| crate::credentials::pki::inspect_certificate(p).ok())
            .and_then(|i| i.not_after);
        if not_after.is_some() && creds.not_after != not_after {
            creds.not_after = not_after;
        }
        if creds.previous_certificate_id != cert.state.previous_cert_id {
            creds.previous_certificate_id = cert.state.previous_cert_id.clone();
        }
        if creds.previous_revoke_at != cert.state.previous_revoke_at {
            creds.previous_revoke_at = cert.state.previous_revoke_at;
        }
    }

    /// Step 4: tags and desired properties to the twin (one PATCH with its etag, only when they
    /// differ; a moved etag is read again once), then the twin's reported state into status.
    async fn sync_twin(
        &self,
        device_id: &str,
        mut current: Option<Twin>,
        wanted: &Wanted,
        status: &mut ThingStatus,
    ) -> Result<(), AzureError> {
        let c = &self.client;
        for attempt in 0..2 {
            let twin = match current.take() {
                Some(t) => t,
                None => c.get_twin(device_id).await?.ok_or(AzureError::Api {
                    op: "GetTwin",
                    status: 404,
                    code: Some("DeviceNotFound".into()),
                    kind: ApiErrorKind::NotFound,
                })?,
            };
            // Between full checks the device may have been given to another owner (by someone
            // with rights on the hub): never write over another owner's record.
            let recorded = twin
                .tags
                .get(twin::OWNER_TAG)
                .and_then(serde_json::Value::as_str);
            if recorded.is_some_and(|r| {
                Some(r)
                    != wanted
                        .tags
                        .get(twin::OWNER_TAG)
                        .and_then(serde_json::Value::as_str)
            }) {
                return Err(AzureError::NotOwner {
                    device_id: device_id.to_string(),
                    why: "belongs to another Thing",
                });
            }
            let Some(patch) = twin::twin_patch(&twin, &wanted.tags, &wanted.desired) else {
                twin::apply_to_status(&twin, &wanted.desired, status);
                return Ok(());
            };
            let etag = twin.etag.clone().unwrap_or_else(|| "*".into());
            match c.patch_twin(device_id, &patch, &etag).await {
                Ok(updated) => {
                    step!("azure-after-twin-update");
                    tracing::debug!(device = device_id, "twin tags/desired updated");
                    twin::apply_to_status(&updated, &wanted.desired, status);
                    return Ok(());
                }
                Err(e) if e.kind() == Some(ApiErrorKind::PreconditionFailed) && attempt == 0 => {
                    tracing::debug!(device = device_id, "twin etag moved; reading it again");
                }
                Err(e) => return Err(e),
            }
        }
        Err(AzureError::Api {
            op: "UpdateTwin",
            status: 412,
            code: Some("PreconditionFailed".into()),
            kind: ApiErrorKind::PreconditionFailed,
        })
    }
}

#[async_trait]
impl IotProvider for AzureProvider {
    fn broker(&self) -> Broker {
        Broker::Azure
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let device_id = req.backend_name.clone();
        if let Some(recorded) = status.device.as_ref().and_then(|d| d.thing_name.as_ref())
            && *recorded != device_id
        {
            let e = AzureError::DeviceIdChanged {
                recorded: recorded.clone(),
                wanted: device_id,
            };
            return Err(record_failure(status, types::PROVISIONED, e).into());
        }
        let wanted = self
            .wanted(req, &device_id)
            .map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        let poll = self.poll_interval(req);

        let mut twin = None;
        if self.needs_full_check(req, status) {
            twin = Some(
                self.converge_device(req, &device_id, status, &mut outcome.notices)
                    .await?,
            );
            self.checked(req);
        }
        match self.sync_twin(&device_id, twin, &wanted, status).await {
            Ok(()) => {
                let message = match status.delta.as_ref() {
                    Some(d) if !d.0.is_empty() => format!(
                        "twin desired properties match the spec; waiting for the device to report: {}",
                        d.0.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    _ => "twin desired properties match the spec".to_string(),
                };
                set_condition(status, types::IN_SYNC, true, "TwinInSync", message);
            }
            Err(e) => {
                // A device deleted or re-owned behind our back: the next reconcile is a full
                // check (re-create, or Conflict).
                if matches!(e, AzureError::NotOwner { .. })
                    || e.kind() == Some(ApiErrorKind::NotFound)
                {
                    self.forget(req);
                }
                return Err(record_failure(status, types::IN_SYNC, e).into());
            }
        }
        outcome.requeue_after = Some(poll.max(Duration::from_millis(500)));
        Ok(())
    }

    fn release(&self, req: &DeviceRequest<'_>, _status: &ThingStatus) {
        self.forget(req);
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let c = &self.client;
        let device_id = req.recorded_name(status);
        self.forget(req);
        if device_id_problem(&device_id).is_some() {
            // Never a valid device id: nothing can have been created under it.
            return Ok(());
        }
        let Some(device) = c.get_device(&device_id).await? else {
            return Ok(());
        };
        let Some(twin) = c.get_twin(&device_id).await? else {
            return Ok(());
        };
        let thumbprint = credentials::secret_thumbprint(&req.secret).await;
        let holds = match device.authentication.type_.as_str() {
            "sas" => symmetric::secret_holds_key_of(&req.secret, &device.authentication).await,
            _ => thumbprint
                .as_deref()
                .is_some_and(|t| device.authentication.has_thumbprint(t)),
        };
        let claim = ownership::claim(&twin.tags, &self.owner(req), holds, false);
        if let Claim::Refuse(_) = claim {
            outcome.notices.push(Notice::warning(
                "LeftAlone",
                format!("device {device_id} is not this Thing's; nothing was deleted"),
            ));
            return Ok(());
        }
        step!("azure-before-delete-device");
        // With the etag read above: a device changed in between (re-tagged by another owner)
        // answers 412 and is looked at again, not deleted blindly.
        let etag = device.etag.clone().unwrap_or_else(|| "*".into());
        c.delete_device(&device_id, &etag).await?;
        tracing::info!(device = %device_id, "device deleted from the hub");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_iot_hub_rules() {
        for ok in [
            "ns_dev",
            "c1:ns_dev",
            "a-b.c%d_e*f?g!h(i)j,k:l=m@n$o'p",
            &"x".repeat(128),
        ] {
            assert_eq!(device_id_problem(ok), None, "{ok}");
        }
        for bad in ["", "a/b", "a b", "a#b", "ü", &"x".repeat(129)] {
            assert!(device_id_problem(bad).is_some(), "{bad}");
        }
    }
}
