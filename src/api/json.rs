//! A free-form JSON object field (device state documents), with the schema Kubernetes needs
//! to keep unknown fields instead of pruning them.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Any JSON object. Kubernetes keeps every field inside (`x-kubernetes-preserve-unknown-fields`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct JsonObject(pub Map<String, Value>);

impl JsonObject {
    pub fn new() -> Self {
        Self(Map::new())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Size of the compact JSON encoding, which is what cloud document limits count.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(&self.0)
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

impl From<Map<String, Value>> for JsonObject {
    fn from(map: Map<String, Value>) -> Self {
        Self(map)
    }
}

impl JsonSchema for JsonObject {
    fn schema_name() -> Cow<'static, str> {
        "JsonObject".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}
