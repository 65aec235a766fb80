//! Self-hosted Things on Mosquitto 2.x, through its dynamic-security plugin.
//!
//! Each Thing gets one broker client (username = client id = the Thing's backend name, password
//! generated here and kept only in the device Secret) and one role allowing exactly its own
//! topics. The operator itself runs the Thing's shadow (see [`service`] and [`shadow`]) on the
//! AWS IoT shadow topic layout, both under the Thing's topic tree and at
//! `$aws/things/{thingName}/shadow/…`.
//!
//! - [`connection`]: the operator's MQTT connection (admin credentials), reconnecting;
//! - [`dynsec`]: dynamic-security commands over `$CONTROL/dynamic-security/v1`;
//! - [`shadow`]: shadow document semantics, pure;
//! - [`service`]: in-memory shadows, request handling, status-write pacing.

pub mod dynsec;
pub mod service;
pub mod shadow;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use chrono::Utc;
use kube::{Api, ResourceExt};
use rand::Rng;
use rumqttc::{AsyncClient, QoS};
use serde_json::Map;
use tokio_util::sync::CancellationToken;

use self::{
    dynsec::{Acl, ClientSpec, Dynsec, DynsecError},
    service::{Entry, Key, Service, Things},
    shadow::{Limits, Shadow},
};
use super::{
    BackendError, BackendFailure, DeviceOutcome, DeviceRequest, IotProvider, ProviderError,
};
use crate::mqtt::connection::{self, BrokerAddress, ConfigError, ConnectionSettings};
use crate::{
    api::{
        Condition, ConditionStatus, JsonObject, Thing, ThingStatus,
        conditions::types,
        thing::{Broker, DeviceStatus},
    },
    config::RunArgs,
    credentials::{
        DeviceSecret,
        ca::{CaError, OperatorCa},
        keys,
    },
    feed::StateFeed,
    metrics::Metrics,
    mqtt::topic::{ShadowReply, TopicLayout, aws_shadow_root, check_thing_name},
};

const BACKEND: &str = "mosquitto";
/// Secret key holding the Thing's topic tree (the REST message broker's topic of its URL).
pub const TOPIC_KEY: &str = "topic";
/// How long a successful check of client, role and Secret is trusted before the next
/// reconcile checks again (drift repair); reconciles in between only copy shadow state.
const VERIFY_EVERY: Duration = Duration::from_secs(60);
const DYNSEC_TIMEOUT: Duration = Duration::from_secs(10);
const PASSWORD_CHARS: usize = 32;
/// Secret key: `host:port` of the mTLS listener, when devices get certificates.
pub const TLS_ENDPOINT_KEY: &str = "tlsEndpoint";
/// Validity of a device certificate; it is renewed in its last 30 days.
const CERT_VALIDITY_DAYS: i64 = 365;
const CERT_RENEW_DAYS: i64 = 30;
/// The role that lets the operator's own account publish replies and state.
const SERVICE_ROLE: &str = "thing-operator-service";

/// Everything the backend needs from the configuration.
pub struct MosquittoConfig {
    pub address: BrokerAddress,
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: String,
    pub device_endpoint: String,
    pub layout: TopicLayout,
    pub status_interval: Duration,
    pub limits: Limits,
    /// The mTLS listener devices may use with their certificate.
    pub device_tls_endpoint: Option<String>,
    /// Where the device CA lives: (namespace, Secret name).
    pub ca_secret: (String, String),
    /// Loaded by [`MosquittoConfig::load_device_ca`] when `device_tls_endpoint` is set.
    pub device_ca: Option<Arc<OperatorCa>>,
}

impl MosquittoConfig {
    /// `None` when no `--mqtt-url` is set (the backend is off).
    pub fn from_args(args: &RunArgs) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &args.mqtt.url else {
            return Ok(None);
        };
        let address = BrokerAddress::parse(url)?;
        let username = args
            .mqtt
            .username
            .clone()
            .ok_or(ConfigError::Missing("username"))?;
        let password_file = args
            .mqtt
            .password_file
            .as_ref()
            .ok_or(ConfigError::Missing("password-file"))?;
        let password = connection::read_password(password_file)?;
        let layout = TopicLayout::new(&args.mqtt.topic_prefix)
            .map_err(|e| ConfigError::Url(args.mqtt.topic_prefix.clone(), e.to_string()))?;
        Ok(Some(Self {
            device_endpoint: args
                .mqtt
                .device_endpoint
                .clone()
                .unwrap_or_else(|| address.endpoint()),
            address,
            ca_file: args.mqtt.ca_file.clone(),
            username,
            password,
            layout,
            status_interval: args.status_write_interval,
            limits: Limits::default(),
            device_tls_endpoint: args.mqtt.device_tls_endpoint.clone(),
            ca_secret: (
                args.lease_namespace
                    .clone()
                    .unwrap_or_else(|| "thing-operator-system".into()),
                args.mqtt.ca_secret.clone(),
            ),
            device_ca: None,
        }))
    }

    /// Loads (or creates) the device CA when devices get certificates.
    pub async fn load_device_ca(&mut self, client: kube::Client) -> Result<(), CaError> {
        if self.device_tls_endpoint.is_some() {
            let (ns, name) = &self.ca_secret;
            self.device_ca = Some(Arc::new(
                OperatorCa::load_or_create(client, ns, name).await?,
            ));
        }
        Ok(())
    }
}

pub struct MosquittoProvider {
    config: MosquittoConfig,
    client: AsyncClient,
    dynsec: Arc<Dynsec>,
    service: Arc<Service>,
    things: Arc<Mutex<Things>>,
    metrics: Arc<Metrics>,
    ca_pem: Option<Vec<u8>>,
}

fn dynsec_error(operation: &'static str, e: DynsecError) -> BackendFailure {
    match e {
        DynsecError::Timeout { .. } | DynsecError::Send { .. } => BackendFailure::Transport {
            backend: BACKEND,
            operation,
            message: e.to_string(),
        },
        DynsecError::Foreign(_) => BackendFailure::Rejected(e.to_string()),
        DynsecError::Command { error, .. } => BackendFailure::Service {
            backend: BACKEND,
            operation,
            code: "DynsecError".into(),
            message: error,
            retryable: true,
        },
    }
}

fn generate_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(PASSWORD_CHARS)
        .map(char::from)
        .collect()
}

/// What marks a broker client as belonging to a Thing.
fn owner_mark(namespace: &str, name: &str) -> String {
    format!("thing-operator {namespace}/{name}")
}

fn role_name(thing_name: &str) -> String {
    format!("thing:{thing_name}")
}

impl MosquittoProvider {
    /// Connects to the broker (in the background; reconnecting forever) and starts the
    /// shadow service.
    pub fn start(
        config: MosquittoConfig,
        feed: Arc<dyn StateFeed>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let tls = if config.address.tls {
            Some(connection::tls_config(config.ca_file.as_deref())?)
        } else {
            None
        };
        let ca_pem =
            match &config.ca_file {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    ConfigError::File(p.display().to_string(), e.kind().to_string())
                })?),
                None => None,
            };
        let status_topic = config.layout.operator_status_topic();
        let (client, eventloop) = connection::build(ConnectionSettings {
            address: config.address.clone(),
            tls,
            username: config.username.clone(),
            password: config.password.clone(),
            // Unique per process: two operators sharing the admin account must not kick each
            // other off the broker.
            client_id: format!(
                "thing-operator-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            last_will: Some((status_topic.clone(), b"offline".to_vec())),
        });
        let dynsec = Arc::new(Dynsec::new(client.clone(), DYNSEC_TIMEOUT));
        let things = Arc::new(Mutex::new(Things::default()));

        // On every connect: make sure the operator may publish on its topic trees (the admin
        // account `dynsec init` makes can only subscribe), then announce itself. One fixed role
        // for every operator sharing the account: the plugin disconnects every session of a
        // client whose roles change, so the grant must happen once per broker, not per process
        // or per topic prefix. It adds no privilege: this account administers the broker.
        let on_connect = {
            let (dynsec, client, username, feed) = (
                dynsec.clone(),
                client.clone(),
                config.username.clone(),
                feed.clone(),
            );
            move || {
                feed.broker_online(false);
                let (dynsec, client, username, status_topic, feed) = (
                    dynsec.clone(),
                    client.clone(),
                    username.clone(),
                    status_topic.clone(),
                    feed.clone(),
                );
                tokio::spawn(async move {
                    let acls = [
                        Acl::allow("publishClientSend", "#"),
                        Acl::allow("publishClientSend", "$aws/things/#"),
                        Acl::allow("subscribePattern", "$aws/things/#"),
                    ];
                    let granted = async {
                        dynsec.ensure_role(SERVICE_ROLE, &acls).await?;
                        dynsec.ensure_client_role(&username, SERVICE_ROLE).await
                    };
                    match granted.await {
                        Ok(()) => {
                            feed.broker_online(true);
                            let _ = client
                                .publish(status_topic, QoS::AtLeastOnce, true, b"online".to_vec())
                                .await;
                        }
                        // After a first-time grant the plugin disconnects us; the reconnect
                        // runs this again and finds the role in place.
                        Err(e) => {
                            tracing::info!(error = %e, "operator ACLs not confirmed yet; retrying on reconnect")
                        }
                    }
                });
            }
        };
        let service = Arc::new(Service {
            layout: config.layout.clone(),
            limits: config.limits,
            status_interval: config.status_interval,
            things: things.clone(),
            feed: feed.clone(),
            dynsec: dynsec.clone(),
            stats: Default::default(),
            on_connect: Box::new(on_connect),
            active: Default::default(),
            client: client.clone(),
        });
        connection::spawn_driver(
            eventloop,
            client.clone(),
            service.clone(),
            CancellationToken::new(),
        );
        Ok(Self {
            config,
            client,
            dynsec,
            service,
            things,
            metrics,
            ca_pem,
        })
    }

    /// Loads the shadows of already provisioned Things from their status, so reports that
    /// arrive right after a restart, before the first reconcile, are neither lost nor refused.
    pub async fn seed_from(&self, api: Api<Thing>) {
        let list = match api.list(&Default::default()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list Things to restore shadows; the first reconciles will");
                return;
            }
        };
        let mut things = self.lock();
        for thing in list.items {
            if thing.spec.broker != Broker::Mosquitto {
                continue;
            }
            let Some(status) = &thing.status else {
                continue;
            };
            let Some(thing_name) = status.device.as_ref().and_then(|d| d.thing_name.clone()) else {
                continue;
            };
            let key = (thing.namespace().unwrap_or_default(), thing.name_any());
            let entry = Entry::new(
                thing.uid().unwrap_or_default(),
                thing_name.clone(),
                seed_shadow(&thing, status),
            );
            let mut entry = entry;
            entry.labels = thing.labels().clone();
            things.by_name.insert(thing_name, key.clone());
            things.by_key.insert(key, entry);
        }
        tracing::info!(
            things = things.by_key.len(),
            "shadows restored from Thing status"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Things> {
        self.things.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepted and rejected shadow updates so far.
    /// The operator's connection to the broker, for the REST broker's state publisher.
    pub fn mqtt_client(&self) -> AsyncClient {
        self.client.clone()
    }

    pub fn layout(&self) -> &TopicLayout {
        &self.config.layout
    }

    pub fn shadow_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.service.stats.accepted.load(Relaxed),
            self.service.stats.rejected.load(Relaxed),
        )
    }

    async fn publish(&self, topic: String, payload: &serde_json::Value) {
        if let Err(e) = self
            .client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_string().into_bytes(),
            )
            .await
        {
            tracing::warn!(error = %e, "shadow notification not queued");
        }
    }

    /// Reads the device password from the Secret, or makes one and writes the Secret first:
    /// the broker only ever learns a password the Secret already holds.
    async fn ensure_secret(
        &self,
        req: &DeviceRequest<'_>,
        topic: &str,
        status: &mut ThingStatus,
    ) -> Result<String, BackendFailure> {
        let thing_name = &req.backend_name;
        let existing = req.secret.read().await?;
        let password = existing
            .as_ref()
            .filter(|d| {
                DeviceSecret::text(d, keys::USERNAME).as_deref() == Some(thing_name.as_str())
            })
            .and_then(|d| DeviceSecret::text(d, keys::PASSWORD))
            .filter(|p| !p.is_empty());
        let password = match password {
            Some(p) => p,
            None => generate_password(),
        };
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::from([
            (
                keys::ENDPOINT.into(),
                self.config.device_endpoint.clone().into_bytes(),
            ),
            (keys::THING_NAME.into(), thing_name.clone().into_bytes()),
            (keys::CLIENT_ID.into(), thing_name.clone().into_bytes()),
            (keys::USERNAME.into(), thing_name.clone().into_bytes()),
            (keys::PASSWORD.into(), password.clone().into_bytes()),
            (TOPIC_KEY.into(), topic.as_bytes().to_vec()),
        ]);
        if let Some(ca) = &self.ca_pem {
            data.insert(keys::CA.into(), ca.clone());
        }
        if let (Some(ca), Some(endpoint)) =
            (&self.config.device_ca, &self.config.device_tls_endpoint)
        {
            let (cert, key) = self.ensure_certificate(req, existing.as_ref(), ca, status)?;
            data.insert(keys::CERTIFICATE.into(), cert.into_bytes());
            data.insert(keys::PRIVATE_KEY.into(), key.into_bytes());
            data.insert(TLS_ENDPOINT_KEY.into(), endpoint.clone().into_bytes());
            // The broker's CA when configured, else the device CA (one CA for both, as in the
            // test environment).
            if self.ca_pem.is_none() {
                data.insert(keys::CA.into(), ca.certificate_pem().as_bytes().to_vec());
            }
        }
        if existing.as_ref() != Some(&data) {
            req.secret.write(data).await?;
        }
        Ok(password)
    }

    /// The device certificate and key to keep: the Secret's, while they match, are not near
    /// expiry and not older than `rotateAfter`; otherwise a new pair from the device CA (the key
    /// is generated here and only ever written into the Secret).
    fn ensure_certificate(
        &self,
        req: &DeviceRequest<'_>,
        existing: Option<&BTreeMap<String, Vec<u8>>>,
        ca: &OperatorCa,
        status: &mut ThingStatus,
    ) -> Result<(String, String), BackendFailure> {
        use crate::credentials::pki;
        let now = Utc::now();
        let current = existing.and_then(|d| {
            let cert = DeviceSecret::text(d, keys::CERTIFICATE)?;
            let key = DeviceSecret::text(d, keys::PRIVATE_KEY)?;
            pki::key_matches_certificate(&key, &cert)
                .ok()?
                .then_some((cert, key))
        });
        let rotate_after = req
            .thing
            .spec
            .credentials
            .rotate_after
            .as_deref()
            .and_then(|d| crate::api::validation::parse_duration(d).ok())
            .and_then(|d| chrono::Duration::from_std(d).ok());
        let issued_at = status.credentials.as_ref().and_then(|c| c.issued_at);
        if let Some((cert, key)) = current {
            let info = pki::inspect_certificate(&cert).ok();
            let not_after = info.as_ref().and_then(|i| i.not_after);
            let fresh =
                not_after.is_some_and(|na| na - now > chrono::Duration::days(CERT_RENEW_DAYS));
            let due = matches!((rotate_after, issued_at), (Some(r), Some(at)) if now - at >= r);
            if fresh && !due {
                let creds = status.credentials.get_or_insert_with(Default::default);
                creds.not_after = not_after;
                if creds.issued_at.is_none() {
                    creds.issued_at = info.and_then(|i| i.not_before);
                }
                return Ok((cert, key));
            }
        }
        let issued = ca
            .issue_client(
                &req.backend_name,
                chrono::Duration::days(CERT_VALIDITY_DAYS),
                now,
            )
            .map_err(|e| BackendFailure::Secret(e.to_string()))?;
        tracing::info!(thing = %format!("{}/{}", req.namespace, req.name), "device certificate issued");
        let creds = status.credentials.get_or_insert_with(Default::default);
        creds.issued_at = Some(now);
        creds.not_after = Some(issued.not_after);
        Ok((issued.certificate_pem, issued.private_key_pem))
    }

    async fn provision(
        &self,
        req: &DeviceRequest<'_>,
        topic: &crate::mqtt::ThingTopic,
        status: &mut ThingStatus,
    ) -> Result<(), BackendFailure> {
        let now = Utc::now();
        let thing_name = &req.backend_name;
        let password = self.ensure_secret(req, topic.base(), status).await?;
        crate::failpoints::step!("mosquitto-after-secret-written");
        status.conditions.set(
            Condition::new(
                types::CREDENTIALS_READY,
                ConditionStatus::True,
                "PasswordIssued",
                format!("username and password in Secret {}", req.secret.name()),
            ),
            now,
        );
        let aws_root =
            aws_shadow_root(thing_name).map_err(|e| BackendFailure::Rejected(e.to_string()))?;
        let acls = [
            Acl::allow(
                "publishClientSend",
                format!("{}/update", topic.shadow_root()),
            ),
            Acl::allow("publishClientSend", format!("{}/get", topic.shadow_root())),
            Acl::allow("publishClientSend", format!("{aws_root}/update")),
            Acl::allow("publishClientSend", format!("{aws_root}/get")),
            Acl::allow("subscribePattern", topic.all()),
            Acl::allow("subscribePattern", format!("{aws_root}/#")),
            Acl::allow(
                "subscribePattern",
                self.config.layout.operator_status_topic(),
            ),
        ];
        let role = role_name(thing_name);
        let result = async {
            self.dynsec
                .ensure_role(&role, &acls)
                .await
                .map_err(|e| dynsec_error("ensureRole", e))?;
            let mark = owner_mark(req.namespace, req.name);
            let spec = ClientSpec {
                username: thing_name,
                password: &password,
                client_id: thing_name,
                role: &role,
                owner_mark: &mark,
            };
            self.dynsec
                .ensure_client(&spec)
                .await
                .map_err(|e| dynsec_error("ensureClient", e))
        }
        .await;
        self.metrics.count_backend_call(
            BACKEND,
            "provision",
            if result.is_ok() { "ok" } else { "error" },
        );
        let created = match result {
            Ok(created) => {
                crate::failpoints::step!("mosquitto-after-client-created");
                created
            }
            Err(e) => {
                status.conditions.set(
                    Condition::new(
                        types::PROVISIONED,
                        ConditionStatus::False,
                        e.reason(),
                        e.to_string(),
                    ),
                    now,
                );
                return Err(e);
            }
        };
        if created {
            tracing::info!(thing = %format!("{}/{}", req.namespace, req.name), client = %thing_name, "broker client created");
        }
        status.conditions.set(
            Condition::new(
                types::PROVISIONED,
                ConditionStatus::True,
                "ClientProvisioned",
                format!("broker client {thing_name} with role {role}"),
            ),
            now,
        );
        Ok(())
    }
}

/// A shadow restored from what the Thing's status recorded.
fn seed_shadow(thing: &Thing, status: &ThingStatus) -> Shadow {
    Shadow::seed(
        thing.spec.desired.clone().map(|d| d.0).unwrap_or_default(),
        status.reported.clone().map(|r| r.0).unwrap_or_default(),
        status.version.unwrap_or(0),
        status.last_reported_time,
    )
}

#[async_trait]
impl IotProvider for MosquittoProvider {
    fn broker(&self) -> Broker {
        Broker::Mosquitto
    }

    /// Serves shadow requests and grants the operator its publish ACLs as soon as this replica
    /// leads, not only at its first Mosquitto Thing: Observer sinks and the REST broker's state
    /// topics publish on this broker for every backend.
    fn activate(&self) {
        self.service.activate();
    }

    async fn reconcile(
        &self,
        req: &DeviceRequest<'_>,
        status: &mut ThingStatus,
        outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        self.service.activate();
        let now = Utc::now();
        let thing_name = req.backend_name.clone();
        let topic = self
            .config
            .layout
            .thing(req.namespace, req.name)
            .map_err(|e| BackendFailure::Rejected(e.to_string()))?;
        check_thing_name(&thing_name).map_err(|e| BackendFailure::Rejected(e.to_string()))?;
        if thing_name == self.config.username {
            return Err(BackendFailure::Rejected(format!(
                "thing name {thing_name} is the operator's own broker account"
            ))
            .into());
        }
        let key: Key = (req.namespace.to_string(), req.name.to_string());
        let uid = req.thing.uid().unwrap_or_default();
        let generation = req.thing.metadata.generation;
        let secret_name = req.secret.name().to_string();

        let device = status.device.get_or_insert_with(DeviceStatus::default);
        device.broker = Some(Broker::Mosquitto);
        device.thing_name = Some(thing_name.clone());
        device.client_id = Some(thing_name.clone());
        device.topic = Some(topic.base().to_string());
        device.endpoint = Some(self.config.device_endpoint.clone());
        device.secret_name = Some(secret_name.clone());

        // The in-memory shadow: restored from status after a restart, desired from the spec.
        let desired: Map<String, serde_json::Value> = req
            .thing
            .spec
            .desired
            .clone()
            .map(|d| d.0)
            .unwrap_or_default();
        let (changed, verified) = {
            let mut things = self.lock();
            if let Some(owner) = things.by_name.get(&thing_name)
                && owner != &key
            {
                return Err(BackendFailure::Rejected(format!(
                    "thing name {thing_name} is already used by Thing {}/{}",
                    owner.0, owner.1
                ))
                .into());
            }
            let reseed = things
                .by_key
                .get(&key)
                .is_none_or(|e| e.uid != uid || e.thing_name != thing_name);
            if reseed {
                things.remove(&key);
                let entry = Entry::new(
                    uid.clone(),
                    thing_name.clone(),
                    seed_shadow(req.thing, status),
                );
                things.by_key.insert(key.clone(), entry);
                things.by_name.insert(thing_name.clone(), key.clone());
            }
            let Some(entry) = things.by_key.get_mut(&key) else {
                return Err(BackendFailure::Rejected("shadow vanished".into()).into());
            };
            entry.labels = req.thing.labels().clone();
            let changed = entry.shadow.set_desired(desired, now);
            if changed.is_some() {
                entry.refresh_snapshot();
            }
            let verified = entry.verified.as_ref().is_some_and(|(g, s, at)| {
                *g == generation && *s == secret_name && at.elapsed() < VERIFY_EVERY
            });
            (changed, verified)
        };
        if let Some(change) = changed {
            let aws_root = aws_shadow_root(&thing_name)
                .map_err(|e| BackendFailure::Rejected(e.to_string()))?;
            for root in [topic.shadow_root(), aws_root] {
                if let Some(delta) = &change.delta {
                    self.publish(
                        format!("{root}/update/{}", ShadowReply::Delta.as_str()),
                        delta,
                    )
                    .await;
                }
                self.publish(
                    format!("{root}/update/{}", ShadowReply::Documents.as_str()),
                    &change.documents,
                )
                .await;
            }
        }

        if !verified {
            self.provision(req, &topic, status).await?;
            if let Some(entry) = self.lock().by_key.get_mut(&key) {
                entry.verified = Some((generation, secret_name, Instant::now()));
            }
        }

        let snapshot = self
            .lock()
            .by_key
            .get(&key)
            .map(|e| e.snapshot.clone())
            .unwrap_or_default();
        if status.version != Some(snapshot.version) {
            tracing::debug!(thing = %format!("{}/{}", key.0, key.1), from = ?status.version, to = snapshot.version, "shadow snapshot to status");
        }
        status.reported = (!snapshot.reported.is_empty()).then_some(JsonObject(snapshot.reported));
        let pending: Vec<String> = snapshot.delta.keys().cloned().collect();
        status.delta = (!snapshot.delta.is_empty()).then_some(JsonObject(snapshot.delta));
        status.version = Some(snapshot.version);
        status.last_reported_time = snapshot.last_reported;
        let message = if pending.is_empty() {
            "desired state published; the device reported all of it".to_string()
        } else {
            format!(
                "desired state published; waiting for the device to report: {}",
                pending.join(", ")
            )
        };
        status.conditions.set(
            Condition::new(
                types::IN_SYNC,
                ConditionStatus::True,
                "DesiredPublished",
                message,
            ),
            now,
        );
        outcome.requeue_after = None;
        Ok(())
    }

    async fn cleanup(
        &self,
        req: &DeviceRequest<'_>,
        status: &ThingStatus,
        _outcome: &mut DeviceOutcome,
    ) -> Result<(), ProviderError> {
        self.service.activate();
        let thing_name = status
            .device
            .as_ref()
            .and_then(|d| d.thing_name.clone())
            .unwrap_or_else(|| req.backend_name.clone());
        let mark = owner_mark(req.namespace, req.name);
        let result = async {
            match self.dynsec.delete_client(&thing_name, &mark).await {
                Ok(()) => {}
                // Not ours: nothing of ours is left under that name.
                Err(DynsecError::Foreign(_)) => {
                    tracing::warn!(client = %thing_name, "broker client not managed by this Thing, left alone")
                }
                Err(e) => return Err(dynsec_error("deleteClient", e)),
            }
            self.dynsec.delete_role(&role_name(&thing_name)).await.map_err(|e| dynsec_error("deleteRole", e))
        }
        .await;
        self.metrics.count_backend_call(
            BACKEND,
            "cleanup",
            if result.is_ok() { "ok" } else { "error" },
        );
        result?;
        self.lock()
            .remove(&(req.namespace.to_string(), req.name.to_string()));
        self.service.feed.thing_removed(req.namespace, req.name);
        Ok(())
    }
}
