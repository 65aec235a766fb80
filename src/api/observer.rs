//! The `Observer` kind: forwards filtered Thing updates to a destination.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::conditions::Conditions;

/// Which Things to watch: one by name, or all matching labels (in the Observer's namespace).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.thingName) != has(self.matchLabels)").message("set exactly one of thingName or matchLabels"))]
pub struct ThingSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub thing_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
}

/// Which part of the Thing's state an update is read from.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum StateSection {
    #[default]
    Reported,
    Desired,
    Delta,
}

/// Which updates pass. Without a filter, every change of the watched section passes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.changedBy) || (has(self.fields) && size(self.fields) > 0)").message("changedBy needs at least one field"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.changedByPercent) || (has(self.fields) && size(self.fields) > 0)").message("changedByPercent needs at least one field"))]
#[x_kube(validation = kube::core::Rule::new("!(has(self.changedBy) && has(self.changedByPercent))").message("set at most one of changedBy and changedByPercent"))]
pub struct FilterSpec {
    #[serde(default)]
    pub section: StateSection,
    /// JSON pointers (e.g. `/temp`) into the section; only changes of these fields pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub fields: Vec<String>,
    /// Numeric fields pass only when they moved by more than this since the last forwarded value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub changed_by: Option<f64>,
    /// Numeric fields pass only when they moved by more than this percentage of the last
    /// forwarded value (any change passes when that value was 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub changed_by_percent: Option<f64>,
    /// A CEL boolean that must also hold for an update to pass, over `state` (the section now),
    /// `previous` (the section at this Thing's previous update) and `last` (what was last
    /// forwarded for this Thing; `{}` before the first). E.g. `state.temp > 30.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub expression: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MqttSink {
    /// A `BrokerConnection` of this namespace to publish through. Default: the operator's broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub connection: Option<String>,
    /// Topic to publish to (no wildcards).
    #[schemars(length(min = 1, max = 1024))]
    pub topic: String,
    #[serde(default = "default_qos")]
    #[schemars(range(min = 0, max = 2))]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
}

fn default_qos() -> u8 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSink {
    /// URL the update is POSTed to, as a CloudEvent in structured JSON mode.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
    /// A Secret in the Observer's namespace whose keys become request headers (e.g. Authorization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_secret: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingSink {
    /// The Thing whose desired state receives the update.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// JSON pointer in the target's desired state where the value is written. Default: merged at the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("(has(self.mqtt) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.thing) ? 1 : 0) == 1").message("set exactly one of mqtt, http or thing"))]
pub struct SinkSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing: Option<ThingSink>,
}

/// Watches Things and forwards the updates that pass its filter.
// The printcolumns repeat `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "iot.thing-operator.dev",
    version = "v1alpha1",
    kind = "Observer",
    namespaced,
    status = "ObserverStatus",
    shortname = "obs",
    category = "iot",
    cel,
    derive = "PartialEq",
    printcolumn(name = "Thing", type_ = "string", json_path = ".spec.source.thingName"),
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
    printcolumn(name = "Forwarded", type_ = "integer", json_path = ".status.forwarded"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ObserverSpec {
    pub source: ThingSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,
    pub sink: SinkSpec,
    /// Which updates are delivered when they come faster than the sink takes them.
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// Deliveries in flight at once (default 32). Each Thing's updates still go out one at a
    /// time and in order; this bounds how many Things' deliveries run side by side. `1` sends
    /// one update at a time across all Things.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_in_flight: Option<u16>,
    /// How a failing delivery is tried again before it counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Where an update goes when every try failed: its CloudEvent and the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterSpec>,
}

/// How a failing delivery is tried again. Defaults: 5 tries, 200ms doubling up to 10s, within 60s.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub attempts: Option<u32>,
    /// The wait before the second try; it doubles after each (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub initial_backoff: Option<String>,
    /// The longest wait between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub max_backoff: Option<String>,
    /// No try starts later than this after the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub deadline: Option<String>,
}

/// A dead-letter destination: an MQTT topic (under the namespace's tree) or an HTTP endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("(has(self.mqtt) ? 1 : 0) + (has(self.http) ? 1 : 0) == 1").message("set exactly one of mqtt or http"))]
pub struct DeadLetterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSink>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
}

/// How an Observer delivers a stream of updates.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum DeliveryMode {
    /// Every accepted update, in order per Thing (telemetry: each reading counts). When the
    /// sink falls more than the state bus's capacity behind, the oldest are dropped and counted.
    #[default]
    Every,
    /// Only the newest state: a slow sink skips what it missed and resumes from the latest.
    Latest,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObserverStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Things the Observer's source selects now (those the state bus knows).
    pub matched_things: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_forwarded_time: Option<DateTime<Utc>>,
    /// Updates dropped after every delivery attempt failed (dead letters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<i64>,
    /// The last delivery or sink error, cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Filter memory: per Thing, the last forwarded value of each filtered field (JSON pointer).
    /// Kept here so "changed by more than X" survives a restart of the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_forwarded: Option<std::collections::BTreeMap<String, crate::api::JsonObject>>,
}
