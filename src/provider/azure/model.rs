//! The IoT Hub documents the client exchanges (api-version 2021-04-12): a device identity and a
//! twin. Only the fields the operator uses; `Debug` never shows keys.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A device identity (the registry's view). `Debug` leaves keys out.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default)]
    pub authentication: Authentication,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("device_id", &self.device_id)
            .field("etag", &self.etag)
            .field("auth", &self.authentication.type_)
            .field("thumbprints", &self.authentication.x509_thumbprint)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub x509_thumbprint: Thumbprints,
    #[serde(default)]
    pub symmetric_key: SymmetricKeys,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Thumbprints {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeys {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

impl Authentication {
    /// Whether `thumbprint` is one of the device's registered thumbprints.
    pub fn has_thumbprint(&self, thumbprint: &str) -> bool {
        let t = &self.x509_thumbprint;
        [&t.primary_thumbprint, &t.secondary_thumbprint]
            .into_iter()
            .flatten()
            .any(|have| have.eq_ignore_ascii_case(thumbprint))
    }
}

/// A device twin: tags and desired/reported properties, each with its own `$version`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    pub device_id: String,
    pub etag: Option<String>,
    #[serde(default)]
    pub version: Option<i64>,
    #[serde(default)]
    pub tags: Map<String, Value>,
    #[serde(default)]
    pub properties: TwinProperties,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct TwinProperties {
    #[serde(default)]
    pub desired: Map<String, Value>,
    #[serde(default)]
    pub reported: Map<String, Value>,
}
