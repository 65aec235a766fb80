//! The `BrokerConnection` kind: an MQTT broker of the user's own (URL, TLS, login from Secrets
//! of the same namespace) that Observer sinks and Subscriber sources name instead of the
//! operator's broker. One MQTT session per BrokerConnection, shared by everything naming it.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::conditions::Conditions;

/// A Secret key in the BrokerConnection's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret, in the BrokerConnection's own namespace (there is no namespace field: a
    /// connection can use only its own namespace's Secrets).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key; default `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// TLS for `mqtts://` URLs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerTls {
    /// The CA bundle (PEM) the broker's certificate must chain to. Default: the Mozilla roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls`-shaped Secret (`tls.crt`, `tls.key`): the client certificate the
    /// operator presents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_certificate_secret: Option<String>,
}

/// The login.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerAuth {
    /// A Secret with keys `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub username_password_secret: Option<String>,
}

/// A broker Observers publish to and Subscribers subscribe from.
// The printcolumns repeat `type_ = "string"`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[kube(
    group = "iot.thing-operator.dev",
    version = "v1alpha1",
    kind = "BrokerConnection",
    namespaced,
    status = "BrokerConnectionStatus",
    shortname = "brokerconn",
    category = "iot",
    derive = "PartialEq",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
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
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerConnectionSpec {
    /// `mqtt://host[:1883]` or `mqtts://host[:8883]`; no credentials in the URL.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^mqtts?://"))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BrokerTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<BrokerAuth>,
    /// The MQTT client id (the broker keeps the session, and with it unacknowledged messages,
    /// under it). Default: derived from the namespace and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    pub client_id: Option<String>,
    /// MQTT keepalive, seconds. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub keep_alive_seconds: Option<u16>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerConnectionStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Conditions,
}

/// Longest client id the operator derives (MQTT 3.1.1 brokers must take 23; Mosquitto and the
/// clouds take far more, and 64 keeps it readable).
pub const MAX_CLIENT_ID: usize = 64;

/// How derived client ids start: `thing-operator.<namespace>.<name>`.
pub const DERIVED_CLIENT_ID_PREFIX: &str = "thing-operator.";

impl BrokerConnection {
    /// `spec.clientId`, or `thing-operator.<namespace>.<name>` cut with a hash suffix when
    /// longer than [`MAX_CLIENT_ID`]: the same on every start, so the broker's persistent
    /// session (and what it kept unacknowledged) is found again.
    pub fn client_id(&self, namespace: &str, name: &str) -> String {
        if let Some(id) = &self.spec.client_id {
            return id.clone();
        }
        let full = format!("{DERIVED_CLIENT_ID_PREFIX}{namespace}.{name}");
        if full.len() <= MAX_CLIENT_ID {
            return full;
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(full.as_bytes());
        let suffix: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{suffix}", &full[..MAX_CLIENT_ID - suffix.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_client_ids_are_stable_bounded_and_distinct() {
        let c = BrokerConnection::new("b", BrokerConnectionSpec::default());
        assert_eq!(c.client_id("ns", "b"), "thing-operator.ns.b");
        let long_a = c.client_id(&"n".repeat(63), &"a".repeat(253));
        let long_b = c.client_id(&"n".repeat(63), &format!("{}b", "a".repeat(252)));
        assert_eq!(long_a.len(), MAX_CLIENT_ID);
        assert_ne!(
            long_a, long_b,
            "names that differ past the cut differ in the hash"
        );
        assert_eq!(long_a, c.client_id(&"n".repeat(63), &"a".repeat(253)));
        let explicit = BrokerConnection::new(
            "b",
            BrokerConnectionSpec {
                client_id: Some("mine".into()),
                ..Default::default()
            },
        );
        assert_eq!(explicit.client_id("ns", "b"), "mine");
    }
}
