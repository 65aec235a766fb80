//! Helpers of the Mosquitto integration tests, on top of `tests/common`: a `Setup` with an
//! operator wired to the test broker under a topic prefix of its own, and a device (a rumqttc
//! client using the Thing's Secret).
#![allow(dead_code)]

use std::{ops::Deref, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Incoming, MqttOptions, QoS, SubscribeFilter};
use serde_json::Value;
use thing_operator::api::Thing;
use tokio::sync::{mpsc, watch};

pub use crate::common::WAIT;
use crate::common::{OperatorBuilder, OperatorProcess, Setup, TestEnv};

/// A test's `Setup` (reached through `Deref`) with an operator on the test broker.
pub struct MosquittoSetup {
    /// First, so that the namespace is deleted while the operator still runs.
    setup: Setup,
    pub prefix: String,
    pub operator: OperatorProcess,
    pub things: Api<Thing>,
    /// How the operator was started, to start it again.
    builder: OperatorBuilder,
}

impl Deref for MosquittoSetup {
    type Target = Setup;

    fn deref(&self) -> &Setup {
        &self.setup
    }
}

/// A topic prefix of one test: operators and devices of other tests never see its topics.
pub fn topic_prefix() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

/// A namespace, and an operator on the test broker with a topic prefix of its own.
pub async fn setup(test: &str, extra_args: &[&str]) -> MosquittoSetup {
    let setup = Setup::new(test).await;
    let prefix = topic_prefix();
    let builder = setup
        .operator()
        .mqtt(&prefix)
        .args(extra_args.iter().copied());
    let operator = builder.ready().await;
    let things = setup.things();
    MosquittoSetup {
        setup,
        prefix,
        operator,
        things,
        builder,
    }
}

impl MosquittoSetup {
    /// Kills the operator (SIGKILL, a crash) and starts a new one with the same arguments.
    pub async fn restart_operator(&mut self) {
        self.operator.kill();
        self.operator = self.builder.ready().await;
    }

    pub async fn credentials(&self, name: &str) -> Credentials {
        let secrets: Api<Secret> = self.api();
        let s = secrets
            .get(&format!("{name}-device"))
            .await
            .expect("device Secret exists");
        Credentials::from_secret(&s)
    }

    pub fn admin_credentials(&self) -> Credentials {
        Credentials::admin(&self.env)
    }
}

#[derive(Clone, Debug)]
pub struct Credentials {
    pub endpoint: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub thing_name: String,
    pub topic: String,
}

impl Credentials {
    /// What a device reads from its Secret.
    pub fn from_secret(secret: &Secret) -> Credentials {
        let data = secret.data.as_ref().expect("Secret has data");
        let text = |k: &str| {
            String::from_utf8(
                data.get(k)
                    .unwrap_or_else(|| panic!("Secret has {k}"))
                    .0
                    .clone(),
            )
            .unwrap()
        };
        Credentials {
            endpoint: text("endpoint"),
            client_id: text("clientId"),
            username: text("username"),
            password: text("password"),
            thing_name: text("thingName"),
            topic: text("topic"),
        }
    }

    /// The broker's admin account, with a client id of its own.
    pub fn admin(env: &TestEnv) -> Credentials {
        Credentials {
            endpoint: format!("127.0.0.1:{}", env.var("MQTT_PORT")),
            client_id: format!("test-admin-{:08x}", rand::random::<u32>()),
            username: env.var("MQTT_ADMIN_USER"),
            password: env.mqtt_admin_password(),
            thing_name: String::new(),
            topic: String::new(),
        }
    }

    pub fn aws_root(&self) -> String {
        format!("$aws/things/{}/shadow", self.thing_name)
    }
}

/// What the device's event loop saw.
#[derive(Debug)]
pub enum DeviceEvent {
    Connected,
    Refused(String),
    Message(String, Vec<u8>),
    SubAck(Vec<bool>),
    Error(String),
}

/// An MQTT client standing in for a device. Its event loop can be paused after a connection
/// error (`hold`), so a test decides when it reconnects.
pub struct Device {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<DeviceEvent>,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    pub fn start(creds: &Credentials, resubscribe: Vec<String>) -> Device {
        Self::start_with(creds, resubscribe, None)
    }

    /// With `tls`, connects over TLS (client certificate auth when the config carries one);
    /// an empty password means no username/password at all.
    pub fn start_with(
        creds: &Credentials,
        resubscribe: Vec<String>,
        tls: Option<rustls::ClientConfig>,
    ) -> Device {
        let (host, port) = creds.endpoint.rsplit_once(':').unwrap();
        let mut options = MqttOptions::new(creds.client_id.clone(), host, port.parse().unwrap());
        if !creds.password.is_empty() {
            options.set_credentials(creds.username.clone(), creds.password.clone());
        }
        if let Some(tls) = tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
            ));
        }
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, events) = mpsc::unbounded_channel();
        let (hold, mut held) = watch::channel(false);
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        if !resubscribe.is_empty() {
                            let filters = resubscribe
                                .iter()
                                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                            let _ = sub_client.subscribe_many(filters).await;
                        }
                        let _ = tx.send(DeviceEvent::Connected);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(DeviceEvent::Message(p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(Event::Incoming(Incoming::SubAck(s))) => {
                        let ok = s
                            .return_codes
                            .iter()
                            .map(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                            .collect();
                        let _ = tx.send(DeviceEvent::SubAck(ok));
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = tx.send(DeviceEvent::Refused(format!("{code:?}")));
                        if matches!(
                            code,
                            ConnectReturnCode::NotAuthorized
                                | ConnectReturnCode::BadUserNamePassword
                        ) {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(DeviceEvent::Error(e.to_string()));
                        // Paused: wait until the test releases the device.
                        while *held.borrow_and_update() {
                            if held.changed().await.is_err() {
                                return;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        });
        Device {
            client,
            events,
            hold,
            task,
        }
    }

    pub fn hold(&self, on: bool) {
        let _ = self.hold.send(on);
    }

    /// Waits for the first event `pick` accepts, skipping others.
    pub async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&DeviceEvent) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => {
                    if let Some(v) = pick(&ev) {
                        return v;
                    }
                }
                Ok(None) => panic!("device event loop ended while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    pub async fn connected(&mut self) {
        self.next("CONNACK", |e| match e {
            DeviceEvent::Connected => Some(()),
            DeviceEvent::Refused(c) => panic!("connection refused: {c}"),
            _ => None,
        })
        .await
    }

    /// The next SUBACK: whether each filter of the subscription was granted.
    pub async fn suback(&mut self) -> Vec<bool> {
        self.next("SUBACK", |e| match e {
            DeviceEvent::SubAck(ok) => Some(ok.clone()),
            _ => None,
        })
        .await
    }

    /// The next message on `topic`, as JSON.
    pub async fn message(&mut self, topic: &str) -> Value {
        let t = topic.to_string();
        self.next(&format!("a message on {topic}"), |e| match e {
            DeviceEvent::Message(tp, p) if *tp == t => {
                Some(serde_json::from_slice(p).unwrap_or(Value::Null))
            }
            _ => None,
        })
        .await
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish queued");
    }
}

/// Connects with `creds` and returns how the broker answered: `Ok` connected, `Err` refused.
pub async fn try_connect(creds: &Credentials) -> Result<(), String> {
    let mut d = Device::start(creds, vec![]);
    d.next("CONNACK or refusal", |e| match e {
        DeviceEvent::Connected => Some(Ok(())),
        DeviceEvent::Refused(c) => Some(Err(c.clone())),
        _ => None,
    })
    .await
}
