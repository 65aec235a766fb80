//! Shared helpers of the Mosquitto integration tests: an operator wired to the test broker, a
//! Thing, and a device (a rumqttc client using the Thing's Secret).
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, Incoming, MqttOptions, QoS, SubscribeFilter};
use serde_json::{Value, json};
use thing_operator::api::Thing;
use tokio::sync::{mpsc, watch};

use crate::common::{OperatorProcess, TestEnv, wait_for};

pub const WAIT: Duration = Duration::from_secs(60);

pub struct Setup {
    pub env: TestEnv,
    pub client: Client,
    pub ns: String,
    pub prefix: String,
    pub operator: OperatorProcess,
    pub things: Api<Thing>,
    /// The operator's command line, to start it again.
    pub args: Vec<String>,
}

/// A namespace, and an operator on the test broker with a topic prefix of its own.
pub async fn setup(test: &str, extra_args: &[&str]) -> Setup {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = crate::common::create_namespace(&client, test).await;
    let prefix = format!("t{:08x}", rand::random::<u32>());
    let mut args: Vec<String> = vec![
        "--mqtt-url".into(),
        env.var("MQTT_URL"),
        "--mqtt-username".into(),
        env.var("MQTT_ADMIN_USER"),
        "--mqtt-password-file".into(),
        env.var("MQTT_ADMIN_PASSWORD_FILE"),
        "--mqtt-topic-prefix".into(),
        prefix.clone(),
    ];
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = OperatorProcess::start(&env, &ns, &arg_refs, &[]);
    operator.wait_ready().await;
    let things = Api::namespaced(client.clone(), &ns);
    Setup {
        env,
        client,
        ns,
        prefix,
        operator,
        things,
        args,
    }
}

impl Setup {
    /// Kills the operator (SIGKILL, a crash) and starts a new one with the same arguments.
    pub async fn restart_operator(&mut self) {
        self.operator.kill();
        let arg_refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.operator = OperatorProcess::start(&self.env, &self.ns, &arg_refs, &[]);
        self.operator.wait_ready().await;
    }

    pub async fn create_thing(&self, name: &str, desired: Value) -> Thing {
        let thing: Thing = serde_json::from_value(json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1",
            "kind": "Thing",
            "metadata": {"name": name},
            "spec": {"desired": desired},
        }))
        .unwrap();
        self.things
            .create(&PostParams::default(), &thing)
            .await
            .expect("Thing created")
    }

    pub async fn set_desired(&self, name: &str, desired: Value) {
        self.things
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"desired": desired}})),
            )
            .await
            .expect("desired patched");
    }

    /// Waits until `check` holds on the Thing.
    pub async fn wait_thing<F>(&self, name: &str, what: &str, check: F) -> Thing
    where
        F: Fn(&Thing) -> bool,
    {
        wait_for(what, WAIT, || async {
            let t = self.things.get_opt(name).await.ok().flatten()?;
            check(&t).then_some(t)
        })
        .await
    }

    pub async fn wait_ready(&self, name: &str) -> Thing {
        self.wait_thing(name, &format!("Thing {name} Ready"), |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true("Ready"))
        })
        .await
    }

    pub async fn credentials(&self, name: &str) -> Credentials {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let s = secrets
            .get(&format!("{name}-device"))
            .await
            .expect("device Secret exists");
        let data = s.data.expect("Secret has data");
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

    pub fn admin_credentials(&self) -> Credentials {
        let password = std::fs::read_to_string(self.env.var("MQTT_ADMIN_PASSWORD_FILE")).unwrap();
        Credentials {
            endpoint: format!("127.0.0.1:{}", self.env.var("MQTT_PORT")),
            client_id: format!("test-admin-{:08x}", rand::random::<u32>()),
            username: self.env.var("MQTT_ADMIN_USER"),
            password: password.trim().to_string(),
            thing_name: String::new(),
            topic: String::new(),
        }
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
