//! Where an Observer sends what passes its filter: an MQTT topic, an HTTP endpoint (as a
//! CloudEvent), or another Thing's desired state.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};

use super::{ThingUpdate, filter::set_pointer};
use crate::api::{Thing, observer::SinkSpec, observer::StateSection};

/// Why a delivery failed. Never carries header values (they may be tokens).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub retryable: bool,
    pub message: String,
}

impl SinkError {
    fn retryable(message: impl Into<String>) -> Self {
        Self {
            retryable: true,
            message: message.into(),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            message: message.into(),
        }
    }
}

pub enum Sink {
    Mqtt {
        client: AsyncClient,
        topic: String,
        qos: QoS,
        retain: bool,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: HeaderMap,
    },
    Thing {
        api: Api<Thing>,
        name: String,
        path: Option<String>,
    },
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn section_name(section: StateSection) -> &'static str {
    match section {
        StateSection::Reported => "reported",
        StateSection::Desired => "desired",
        StateSection::Delta => "delta",
    }
}

/// The Kubernetes path of a Thing: the CloudEvent `source`, as the REST broker names it.
pub fn thing_path(namespace: &str, name: &str) -> String {
    format!("/apis/iot.thing-operator.dev/v1alpha1/namespaces/{namespace}/things/{name}")
}

/// The message every sink but `thing` sends: a CloudEvents 1.0 structured-mode JSON document.
pub fn cloud_event(update: &ThingUpdate, section: StateSection, data: &Value) -> Value {
    let name = section_name(section);
    json!({
        "specversion": "1.0",
        "id": format!("{}/{}/{}-{}", update.namespace, update.name, update.version.unwrap_or(0), update.time.timestamp_micros()),
        "source": thing_path(&update.namespace, &update.name),
        "type": format!("dev.thing-operator.thing.{name}"),
        "subject": update.name,
        "time": update.time.to_rfc3339(),
        "datacontenttype": "application/json",
        "data": {
            "thing": update.name,
            "namespace": update.namespace,
            "section": name,
            "version": update.version,
            "state": data,
        },
    })
}

/// Reads an Observer's header Secret into request headers.
async fn headers_from_secret(
    client: &Client,
    namespace: &str,
    secret: &str,
) -> Result<HeaderMap, SinkError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get(secret)
        .await
        .map_err(|e| SinkError::retryable(format!("reading header Secret {secret}: {e}")))?;
    let mut headers = HeaderMap::new();
    for (key, value) in secret.data.unwrap_or_default() {
        let name = HeaderName::from_bytes(key.as_bytes()).map_err(|_| {
            SinkError::permanent(format!("header Secret key {key:?} is not a header name"))
        })?;
        let mut value = HeaderValue::from_bytes(&value.0).map_err(|_| {
            SinkError::permanent(format!(
                "header Secret value of {key:?} is not a header value"
            ))
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(headers)
}

impl Sink {
    /// Builds the sink of `spec` for an Observer in `namespace`.
    pub async fn build(
        spec: &SinkSpec,
        namespace: &str,
        client: &Client,
        mqtt: Option<&AsyncClient>,
    ) -> Result<Sink, SinkError> {
        if let Some(m) = &spec.mqtt {
            let client = mqtt.ok_or_else(|| {
                SinkError::permanent("sink.mqtt needs the operator's MQTT broker (--mqtt-url), which is not configured")
            })?;
            return Ok(Sink::Mqtt {
                client: client.clone(),
                topic: m.topic.clone(),
                qos: qos(m.qos),
                retain: m.retain,
            });
        }
        if let Some(h) = &spec.http {
            let headers = match &h.headers_secret {
                Some(s) => headers_from_secret(client, namespace, s).await?,
                None => HeaderMap::new(),
            };
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| SinkError::permanent(format!("building the HTTP client: {e}")))?;
            return Ok(Sink::Http {
                client: http,
                url: h.url.clone(),
                headers,
            });
        }
        if let Some(t) = &spec.thing {
            return Ok(Sink::Thing {
                api: Api::namespaced(client.clone(), namespace),
                name: t.name.clone(),
                path: t.path.clone(),
            });
        }
        Err(SinkError::permanent("no sink set"))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Mqtt { .. } => "mqtt",
            Sink::Http { .. } => "http",
            Sink::Thing { .. } => "thing",
        }
    }

    /// Delivers one update. At-least-once: the caller retries retryable errors.
    pub async fn deliver(
        &self,
        update: &ThingUpdate,
        section: StateSection,
        data: &Value,
    ) -> Result<(), SinkError> {
        match self {
            Sink::Mqtt {
                client,
                topic,
                qos,
                retain,
            } => {
                let payload = serde_json::to_vec(&cloud_event(update, section, data))
                    .map_err(|e| SinkError::permanent(format!("encoding: {e}")))?;
                client
                    .publish(topic.clone(), *qos, *retain, payload)
                    .await
                    .map_err(|e| SinkError::retryable(format!("MQTT publish to {topic}: {e}")))
            }
            Sink::Http {
                client,
                url,
                headers,
            } => {
                let resp = client
                    .post(url)
                    .headers(headers.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/cloudevents+json; charset=utf-8",
                    )
                    .json(&cloud_event(update, section, data))
                    .send()
                    .await
                    .map_err(|e| {
                        SinkError::retryable(format!("POST {url}: {}", e.without_url()))
                    })?;
                let code = resp.status();
                if code.is_success() {
                    Ok(())
                } else if code.is_server_error() || code.as_u16() == 429 || code.as_u16() == 408 {
                    Err(SinkError::retryable(format!("POST {url}: HTTP {code}")))
                } else {
                    Err(SinkError::permanent(format!("POST {url}: HTTP {code}")))
                }
            }
            Sink::Thing { api, name, path } => {
                let mut desired = Value::Object(Default::default());
                set_pointer(&mut desired, path.as_deref().unwrap_or(""), data.clone());
                if !desired.is_object() {
                    return Err(SinkError::permanent(
                        "sink.thing without path needs an object to merge",
                    ));
                }
                let patch = json!({"spec": {"desired": desired}});
                api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| match &e {
                        kube::Error::Api(s) if s.code == 404 => {
                            SinkError::retryable(format!("target Thing {name} not found"))
                        }
                        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                            SinkError::permanent(format!(
                                "target Thing {name} refused the update: {}",
                                s.message
                            ))
                        }
                        _ => SinkError::retryable(format!("patching Thing {name}: {e}")),
                    })
            }
        }
    }
}
