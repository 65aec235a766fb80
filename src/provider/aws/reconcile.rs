//! Reconcile and cleanup of one AWS Thing (the [`IotProvider`] implementation): the order of
//! the steps within a full check ([`AwsProvider::converge`]), the shadow read every reconcile
//! does, and when to look again.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kube::ResourceExt;

use super::{
    AwsError, AwsProvider, FullCheck,
    certs::{self, orphans, rotation::rotation_token},
    fingerprint,
    naming::{self, ArnParts, PolicyVars},
    ownership,
    provision::{self, Owner},
    shadow, teardown,
};
use crate::{
    api::{ThingStatus, conditions::types, thing::Broker},
    failpoints::step,
    provider::{
        DeviceOutcome, DeviceRequest, IotProvider, Notice, ProviderError,
        status::{DeviceIdentity, record_device, record_failure, set_condition},
    },
};

impl AwsProvider {
    /// This Thing as an owner of AWS things.
    fn owner<'a>(&self, req: &DeviceRequest<'_>, recorded_arn: Option<&'a str>) -> Owner<'a> {
        Owner {
            record: ownership::owner_record(
                req.namespace,
                req.name,
                &req.thing.uid().unwrap_or_default(),
            ),
            recorded_arn,
            adopt_unowned: self.settings.adopt_unowned,
            since: req
                .thing
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| aws_smithy_types::DateTime::from_secs(t.0.as_second())),
        }
    }

    /// The full check: thing, policy, credentials, attachments, rotation, orphan sweep.
    /// Returns the earliest deadline that needs another full check, and whether the thing was
    /// created just now (its shadow does not exist yet: nothing to read before writing it).
    async fn converge(
        &self,
        req: &DeviceRequest<'_>,
        thing_name: &str,
        policy_name: &str,
        endpoint: String,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(Option<DateTime<Utc>>, bool), AwsError> {
        let c = &self.clients;
        let spec = &req.thing.spec;
        // "Was complete once": a recorded certificate ARN means thing, policy and certificate all
        // existed; the conditions alone would forget that after one failed step (a repair that
        // fails half-way must still be reported as drift when it succeeds).
        let completed_once = status
            .device
            .as_ref()
            .is_some_and(|d| d.certificate_arn.is_some());
        let was_provisioned = completed_once || status.conditions.is_true(types::PROVISIONED);
        let was_ready = completed_once || status.conditions.is_true(types::CREDENTIALS_READY);
        let notices = &mut outcome.notices;

        let recorded_arn = status.device.as_ref().and_then(|d| d.thing_arn.clone());
        let owner = self.owner(req, recorded_arn.as_deref());
        let (thing_arn, created) = provision::ensure_thing(
            c,
            thing_name,
            &spec.attributes,
            &owner,
            was_provisioned,
            notices,
        )
        .await
        .map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        if let Some(d) = status.device.as_mut()
            && d.thing_arn.as_deref() != Some(thing_arn.as_str())
        {
            d.thing_arn = Some(thing_arn.clone());
        }
        let arn = naming::parse_arn(&thing_arn).unwrap_or_else(|| ArnParts {
            partition: "aws".into(),
            region: self.settings.client.region.clone().unwrap_or_default(),
            account: "*".into(),
        });
        let topic =
            naming::topic_prefix(self.settings.cluster_id.as_deref(), req.namespace, req.name);
        let vars = PolicyVars {
            thing_name,
            client_id: thing_name,
            topic_prefix: &topic,
            arn: &arn,
        };
        let document =
            naming::render_policy(spec.policy.as_ref().map(|p| p.template.as_str()), &vars)
                .map_err(|m| {
                    record_failure(status, types::PROVISIONED, AwsError::PolicyTemplate(m))
                })?;
        provision::ensure_policy(c, policy_name, &document, &owner, was_provisioned, notices)
            .await
            .map_err(|e| record_failure(status, types::PROVISIONED, e))?;

        let ctx = self.cert_context(req, thing_name, policy_name, endpoint);
        let mut state = ctx
            .load()
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        // Certificates the status recorded that the device Secret no longer holds (the Secret
        // was renamed or deleted) are revoked before anything new is issued, so no usable
        // credential is left behind. A crash in between repeats it; one already gone is skipped.
        for stale in certs::stale_certificates(status, &state) {
            step!("aws-before-revoke-stale-certificate");
            certs::certificate::remove(
                c,
                &stale,
                None,
                Some(certs::certificate::Attachments {
                    thing_name,
                    policy_name,
                }),
            )
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
            certs::forget_certificate(status, &stale);
            notices.push(Notice::normal(
                "CredentialRevoked",
                format!(
                    "certificate {stale} is not in the device Secret {}; revoked",
                    req.secret.name()
                ),
            ));
        }
        let mut active =
            certs::issue::ensure_credentials(&ctx, &mut state, status, was_ready, notices)
                .await
                .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        provision::ensure_attachments(
            c,
            thing_name,
            policy_name,
            &active.arn,
            was_provisioned,
            notices,
        )
        .await
        .map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        set_condition(
            status,
            types::PROVISIONED,
            true,
            "Provisioned",
            format!("thing {thing_name} and policy {policy_name} in place"),
        );

        let overlap = spec
            .credentials
            .rotation_overlap_duration()
            .unwrap_or(self.settings.default_rotation_overlap);
        let token = rotation_token(req.thing);
        let reason = if certs::rotation::in_progress(&state) {
            Some("resuming an interrupted rotation".to_string())
        } else {
            certs::rotation::rotation_due(&state, &spec.credentials, token.as_deref(), Utc::now())
        };
        if let Some(reason) = reason {
            active = certs::rotation::rotate(&ctx, &mut state, status, overlap, &reason, notices)
                .await
                .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        }
        certs::rotation::finish_overlap(&ctx, &mut state, status, notices)
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        let sweep_pending = orphans::sweep(&ctx, &mut state, notices)
            .await
            .map_err(|e| record_failure(status, types::CREDENTIALS_READY, e))?;
        certs::mirror(status, &state, Some(&active));
        set_condition(
            status,
            types::CREDENTIALS_READY,
            true,
            "CertificateActive",
            format!(
                "certificate {} is active; Secret {} holds its key",
                active.id,
                req.secret.name()
            ),
        );

        let deadlines = [
            state.previous_revoke_at,
            state
                .issued_at
                .and_then(|at| spec.credentials.rotation_due_at(at)),
            sweep_pending
                .then(|| orphans::sweep_due_at(&ctx, &state))
                .flatten(),
        ];
        Ok((deadlines.into_iter().flatten().min(), created))
    }
}

#[async_trait]
impl IotProvider for AwsProvider {
    fn broker(&self) -> Broker {
        Broker::Aws
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let thing_name = req.backend_name.clone();
        if let Some(recorded) = status.device.as_ref().and_then(|d| d.thing_name.as_ref())
            && *recorded != thing_name
        {
            // A new name would create a second thing and orphan the first.
            let e = AwsError::ThingNameChanged {
                recorded: recorded.clone(),
                wanted: thing_name,
            };
            return Err(record_failure(status, types::PROVISIONED, e).into());
        }
        let policy_name = naming::policy_name(&thing_name);
        let poll = self.poll_interval(req);
        let endpoint = self
            .device_endpoint()
            .await
            .map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        let topic =
            naming::topic_prefix(self.settings.cluster_id.as_deref(), req.namespace, req.name);
        record_device(
            status,
            DeviceIdentity {
                broker: Broker::Aws,
                thing_name: &thing_name,
                client_id: &thing_name,
                endpoint: &endpoint,
                topic: &topic,
                secret_name: req.secret.name(),
                policy_name: Some(&policy_name),
            },
        );

        // A deadline an earlier full check found (the end of a rotation overlap, a rotation, an
        // orphan sweep) holds for every reconcile until then: a reconcile that does no full
        // check (the one the status write itself triggers) must not push it back to the poll.
        let mut deadline = self.pending_deadline(req);
        let shadow_name = shadow_name(req);
        let mut fresh = false;
        let full_check =
            self.needs_full_check(req, status, self.push.covers(&thing_name, shadow_name));
        if full_check {
            let (due, created) = self
                .converge(req, &thing_name, &policy_name, endpoint, status, outcome)
                .await?;
            fresh = created;
            deadline = deadline.into_iter().chain(due).min();
            self.checks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    req.key(),
                    FullCheck {
                        at: Instant::now(),
                        fingerprint: fingerprint(req),
                        due,
                    },
                );
        }

        // The thing is this Thing's (provisioned by it, or every condition True): its pushed
        // documents count from now on.
        self.push
            .track(&thing_name, &req.key(), req.thing.labels(), shadow_name);
        let not_older = |d: &serde_json::Value| {
            d.get("version").and_then(serde_json::Value::as_i64) >= status.version
        };
        let pushed = self
            .push
            .document(&thing_name, shadow_name)
            .filter(not_older);
        // Between polls, a reconcile no spec change asked for copies the last read. Not while
        // the push channel is up: a Thing it does not cover needs a read to be covered again
        // (after a reconnect), and its pushed documents may be newer than that read.
        let (known, read_age) = match pushed {
            Some(doc) => (Some(doc), Duration::ZERO),
            None if !full_check && !self.push.is_up() => self
                .recent_read(req, poll)
                .filter(|(doc, _)| not_older(doc))
                .map_or((None, Duration::ZERO), |(doc, age)| (Some(doc), age)),
            None => (None, Duration::ZERO),
        };
        match shadow::sync(
            &self.clients,
            &thing_name,
            shadow_name,
            req.thing.spec.desired.as_ref(),
            fresh,
            known,
            status,
        )
        .await
        {
            Ok(result) => {
                if let Some(read) = &result.read {
                    self.push.record_read(&thing_name, read.as_ref());
                    let covered = self.push.covers(&thing_name, shadow_name);
                    self.remember_read(req, read.as_ref().filter(|_| !covered));
                }
                set_condition(
                    status,
                    types::IN_SYNC,
                    true,
                    "ShadowInSync",
                    "shadow desired state matches the spec",
                )
            }
            Err(e) => return Err(record_failure(status, types::IN_SYNC, e).into()),
        }
        // While the push channel delivers this Thing's state, the poll is only a drift check.
        let period = match self.push.covers(&thing_name, shadow_name) {
            true => poll.max(self.push.drift_interval()),
            false => poll,
        };
        // A copied read is as old as the read: the next one is due a poll after it.
        let next = Utc::now()
            + chrono::Duration::from_std(period.saturating_sub(read_age)).unwrap_or_default();
        let next = deadline.map_or(next, |d| next.min(d));
        // A deadline slightly in the past still waits a moment: no hot loop on a skewed clock.
        let wait = (next - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(500));
        outcome.requeue_after = Some(wait.min(period));
        Ok(())
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        let device = status.device.clone().unwrap_or_default();
        let thing_name = req.recorded_name(status);
        let policy_name = device
            .policy_name
            .clone()
            .unwrap_or_else(|| naming::policy_name(&thing_name));
        let endpoint = device.endpoint.clone().unwrap_or_default();
        let ctx = self.cert_context(req, &thing_name, &policy_name, endpoint);
        let recorded: Vec<String> = device
            .certificate_id
            .iter()
            .chain(
                status
                    .credentials
                    .as_ref()
                    .and_then(|c| c.previous_certificate_id.as_ref()),
            )
            .cloned()
            .collect();
        let shadow_name = shadow_name(req);
        let owner = self.owner(req, device.thing_arn.as_deref());
        if provision::may_tear_down(&self.clients, &thing_name, &owner).await? {
            let recorded_arn = device
                .certificate_id
                .as_deref()
                .zip(device.certificate_arn.as_deref());
            teardown::teardown(
                &ctx,
                &recorded,
                recorded_arn,
                shadow_name,
                &mut outcome.notices,
            )
            .await?;
        } else {
            // Another Thing's (or nobody's): this Thing never provisioned anything under that
            // name, so there is nothing of its own to delete.
            outcome.notices.push(Notice::warning(
                "LeftAlone",
                format!("thing {thing_name} is not this Thing's; nothing was deleted"),
            ));
        }
        self.release(req, status);
        Ok(())
    }

    fn release(&self, req: &DeviceRequest<'_>, status: &ThingStatus) {
        let thing_name = req.recorded_name(status);
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.key());
        self.remember_read(req, None);
        self.push.forget(&thing_name, &req.key());
    }
}

/// The named shadow the spec asks for; `None`: the classic one.
fn shadow_name<'a>(req: &DeviceRequest<'a>) -> Option<&'a str> {
    req.thing
        .spec
        .shadow
        .as_ref()
        .and_then(|s| s.name.as_deref())
}
