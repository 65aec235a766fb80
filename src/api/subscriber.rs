//! The `Subscriber` kind: writes what arrives on a source into a Thing.

use chrono::{DateTime, Utc};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::conditions::Conditions;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttSource {
    /// A `BrokerConnection` of this namespace to subscribe through. Default: the operator's
    /// broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub connection: Option<String>,
    /// MQTT topic filter (wildcards allowed) on the broker.
    #[schemars(length(min = 1, max = 1024))]
    pub topic_filter: String,
    #[serde(default = "default_qos")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: u8,
}

fn default_qos() -> u8 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Path segment under `/subscribers/<namespace>/` that the operator serves for this Subscriber.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub path: String,
    /// A Secret in the Subscriber's namespace with key `token`: requests must then carry
    /// `Authorization: Bearer <token>`. Without it the endpoint accepts any caller that can
    /// reach the operator's HTTP port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.mqtt) != has(self.http)").message("set exactly one of mqtt or http"))]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
}

/// Which part of the target Thing receives the message.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum TargetField {
    #[default]
    Reported,
    Desired,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// The Thing (in the Subscriber's namespace) that receives the messages.
    #[schemars(length(min = 1, max = 253))]
    pub thing_name: String,
    #[serde(default)]
    pub field: TargetField,
    /// JSON pointer inside the field where the payload is written. Default: merged at the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Subscribes to a source and writes what arrives into a Thing.
// The printcolumns repeat `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "iot.thing-operator.dev",
    version = "v1alpha1",
    kind = "Subscriber",
    namespaced,
    status = "SubscriberStatus",
    shortname = "sub",
    category = "iot",
    cel,
    derive = "PartialEq",
    printcolumn(name = "Thing", type_ = "string", json_path = ".spec.target.thingName"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Received", type_ = "integer", json_path = ".status.received"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberSpec {
    pub source: SourceSpec,
    pub target: TargetSpec,
    /// Largest accepted message, bytes. Default 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_message_bytes: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscriberStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_received_time: Option<DateTime<Utc>>,
    /// Why the last message was rejected or could not be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
