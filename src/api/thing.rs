//! The `Thing` kind: one IoT device.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{JsonObject, conditions::Conditions};

/// Where the device lives.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, schemars::JsonSchema,
)]
pub enum Broker {
    #[serde(rename = "AWS")]
    Aws,
    Azure,
    /// A self-hosted Mosquitto broker; the default, needs no cloud account.
    #[default]
    Mosquitto,
}

impl Broker {
    pub fn as_str(self) -> &'static str {
        match self {
            Broker::Aws => "AWS",
            Broker::Azure => "Azure",
            Broker::Mosquitto => "Mosquitto",
        }
    }
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who makes the device's private key.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum CredentialSource {
    /// The operator generates the key; it never leaves the cluster.
    #[default]
    InCluster,
    /// The backend issues the credential: on AWS, key and certificate from
    /// CreateKeysAndCertificate; on Azure, a symmetric-key device (keys in the Secret).
    CloudIssued,
}

/// What happens to the backend's resources when the Thing is deleted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    /// Keep every cloud resource; only the Kubernetes side goes away.
    Orphan,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSpec {
    /// Name of the Secret that receives the device credentials. Default: `<thing>-device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: Option<String>,
    #[serde(default)]
    pub source: CredentialSource,
    /// Issue a new certificate after this long (Go duration, e.g. `720h`). Unset: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub rotate_after: Option<String>,
    /// How long the previous credential (certificate, or Azure symmetric key) stays valid after a
    /// rotation. Default: `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub rotation_overlap: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// A policy document template replacing the least-privilege default. Placeholders:
    /// `${thingName}`, `${clientId}`, `${topicPrefix}`, `${region}`, `${account}`.
    #[schemars(length(min = 2, max = 20480))]
    pub template: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowSpec {
    /// Use this named shadow instead of the classic (unnamed) one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-zA-Z0-9:_-]+$"))]
    pub name: Option<String>,
    /// How often the reported state is read back when no push channel delivers it. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"))]
    pub poll_interval: Option<String>,
}

/// A device, provisioned in an IoT backend and kept in sync with its shadow or twin.
// The printcolumns repeat `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "iot.thing-operator.dev",
    version = "v1alpha1",
    kind = "Thing",
    namespaced,
    status = "ThingStatus",
    shortname = "th",
    category = "iot",
    cel,
    derive = "PartialEq",
    printcolumn(name = "Broker", type_ = "string", json_path = ".spec.broker"),
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
    printcolumn(
        name = "Reported",
        type_ = "string",
        json_path = ".status.reportedSummary"
    ),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.version",
        priority = 1
    ),
    printcolumn(
        name = "Device",
        type_ = "string",
        json_path = ".status.device.thingName",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ThingSpec {
    /// The backend the device lives in. Cannot change after creation.
    #[serde(default)]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("broker is immutable"))]
    pub broker: Broker,
    /// Name of the device in the backend. Default: derived from namespace and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[a-zA-Z0-9:_-]+$"))]
    pub thing_name: Option<String>,
    /// Registry attributes (AWS thing attributes, Azure twin tags).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 50))]
    pub attributes: BTreeMap<String, String>,
    /// Desired device state, any JSON object, at most 8 KiB encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<JsonObject>,
    #[serde(default)]
    pub credentials: CredentialsSpec,
    /// Optional replacement of the least-privilege default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Where the device lives in its backend: identifiers, never secrets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The broker this device was provisioned in (guards against a changed spec.broker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<Broker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_arn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The MQTT topic tree of this Thing (the REST message broker's mapping of its URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

/// State of the device's credentials (identifiers and dates only).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<DateTime<Utc>>,
    /// A certificate replaced by rotation, still valid until `previousRevokeAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_certificate_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_revoke_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThingStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialStatus>,
    /// Last state the device reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<JsonObject>,
    /// Desired keys whose value the device has not reported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<JsonObject>,
    /// Shadow / twin version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reported_time: Option<DateTime<Utc>>,
    /// `reported`, shortened for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_summary: Option<String>,
}

/// Encoded size limit of `spec.desired` (AWS IoT's shadow state limit).
pub const MAX_DESIRED_BYTES: usize = 8 * 1024;

impl ThingSpec {
    /// The name of the device in its backend: `spec.thingName`, or `<namespace>_<name>` with
    /// dots mapped to colons (Kubernetes names never contain `_` or `:`, so the mapping is
    /// injective), cut to 128 characters with a hash suffix when longer.
    pub fn backend_name(&self, namespace: &str, name: &str) -> String {
        self.backend_name_in(None, namespace, name)
    }

    /// [`Self::backend_name`] for an operator with a cluster id: derived names become
    /// `<cluster>:<namespace>_<name>`, so two clusters sharing an AWS account or a broker never
    /// derive the same name (`:` never appears in a namespace, so the mapping stays injective).
    pub fn backend_name_in(&self, cluster_id: Option<&str>, namespace: &str, name: &str) -> String {
        if let Some(explicit) = &self.thing_name {
            return explicit.clone();
        }
        let local = format!("{namespace}_{}", name.replace('.', ":"));
        let full = match cluster_id {
            Some(cluster) => format!("{cluster}:{local}"),
            None => local,
        };
        if full.len() <= 128 {
            return full;
        }
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(full.as_bytes()));
        format!("{}-{}", &full[..119], &digest[..8])
    }

    /// Name of the Secret holding the device credentials.
    pub fn secret_name(&self, thing_name: &str) -> String {
        self.credentials
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{thing_name}-device"))
    }
}

impl CredentialsSpec {
    /// `rotateAfter`, parsed: `None` when unset. A value that does not parse never reaches a
    /// backend (validation refuses it first), so here it counts as unset.
    pub fn rotate_after_duration(&self) -> Option<std::time::Duration> {
        parse_optional(self.rotate_after.as_deref())
    }

    /// `rotationOverlap`, parsed: `None` when unset (the backend's default applies).
    pub fn rotation_overlap_duration(&self) -> Option<std::time::Duration> {
        parse_optional(self.rotation_overlap.as_deref())
    }

    /// When a certificate issued at `issued_at` falls due for rotation by `rotateAfter`;
    /// `None` when it never does.
    pub fn rotation_due_at(&self, issued_at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let after = chrono::Duration::from_std(self.rotate_after_duration()?).ok()?;
        issued_at.checked_add_signed(after)
    }
}

impl ShadowSpec {
    /// `pollInterval`, parsed: `None` when unset (the backend's default applies).
    pub fn poll_interval_duration(&self) -> Option<std::time::Duration> {
        parse_optional(self.poll_interval.as_deref())
    }
}

fn parse_optional(value: Option<&str>) -> Option<std::time::Duration> {
    value.and_then(|v| super::validation::parse_duration(v).ok())
}

/// A short, single-line rendering of a JSON object for a printer column.
pub fn summarize(obj: &JsonObject, max_chars: usize) -> String {
    let full = serde_json::to_string(&obj.0).unwrap_or_default();
    if full.chars().count() <= max_chars {
        return full;
    }
    let mut cut: String = full.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_name_is_injective_and_bounded() {
        let spec = ThingSpec::default();
        assert_eq!(spec.backend_name("ns", "a.b"), "ns_a:b");
        assert_eq!(spec.backend_name_in(Some("c1"), "ns", "a.b"), "c1:ns_a:b");
        assert_ne!(
            spec.backend_name_in(Some("c1"), "ns", "a"),
            spec.backend_name_in(Some("c2"), "ns", "a")
        );
        assert_ne!(
            spec.backend_name("ns", "a.b"),
            spec.backend_name("ns", "a-b")
        );
        let long = "x".repeat(250);
        let n = spec.backend_name("ns", &long);
        assert_eq!(n.len(), 128);
        assert_ne!(n, spec.backend_name("ns", &format!("{long}y")));
    }

    #[test]
    fn durations_are_parsed_once_here() {
        let creds = CredentialsSpec {
            rotate_after: Some("1h30m".into()),
            rotation_overlap: Some("not a duration".into()),
            ..Default::default()
        };
        assert_eq!(
            creds.rotate_after_duration(),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(creds.rotation_overlap_duration(), None);
        let issued = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            creds.rotation_due_at(issued),
            DateTime::from_timestamp(1_700_005_400, 0)
        );
        assert_eq!(CredentialsSpec::default().rotation_due_at(issued), None);
        let shadow = ShadowSpec {
            poll_interval: Some("90s".into()),
            ..Default::default()
        };
        assert_eq!(
            shadow.poll_interval_duration(),
            Some(std::time::Duration::from_secs(90))
        );
    }

    #[test]
    fn summary_is_cut_with_ellipsis() {
        let obj: JsonObject =
            serde_json::from_str(r#"{"temp":24,"humidity":55,"mode":"eco"}"#).unwrap();
        let s = summarize(&obj, 16);
        assert_eq!(s.chars().count(), 16);
        assert!(s.ends_with('…'));
        assert_eq!(
            summarize(&obj, 100),
            r#"{"humidity":55,"mode":"eco","temp":24}"#
        );
    }
}
