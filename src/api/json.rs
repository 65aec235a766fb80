//! A free-form JSON object field (device state documents), with the schema Kubernetes needs
//! to keep unknown fields instead of pruning them.

use std::borrow::Cow;

use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Number, Value};

/// Deepest nesting the decoder keeps. serde_json refuses documents nested deeper than 128
/// levels, and the API server accepts far deeper ones (no structural schema or CEL rule can bound
/// the depth of a free-form field), so a single such Thing in a watch list would make the whole
/// list fail to decode and stop reconciles for every namespace. Below this depth the decoder
/// skips the value (serde_json skips without recursing) and keeps an empty object in its place:
/// the document still nests deeper than any limit, so validation refuses it with a clear
/// message, and every other object decodes as usual.
pub const MAX_DECODED_DEPTH: usize = 32;

/// Any JSON object. Kubernetes keeps every field inside (`x-kubernetes-preserve-unknown-fields`).
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
#[serde(transparent)]
pub struct JsonObject(pub Map<String, Value>);

impl<'de> Deserialize<'de> for JsonObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_map(BoundedValue { depth: 0 })? {
            Value::Object(map) => Ok(JsonObject(map)),
            _ => Err(serde::de::Error::custom("expected a JSON object")),
        }
    }
}

/// Decodes a JSON value `depth` levels below the document's top, cutting it at
/// [`MAX_DECODED_DEPTH`].
#[derive(Clone, Copy)]
struct BoundedValue {
    depth: usize,
}

impl BoundedValue {
    fn child(self) -> Self {
        BoundedValue {
            depth: self.depth + 1,
        }
    }
}

impl<'de> DeserializeSeed<'de> for BoundedValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.depth >= MAX_DECODED_DEPTH {
            IgnoredAny::deserialize(deserializer)?;
            return Ok(Value::Object(Map::new()));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let value = access.next_value_seed(self.child())?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn ordinary_documents_decode_unchanged() {
        let doc = json!({"t": 21.5, "on": true, "n": null, "list": [1, -2, "x", {"deep": {"er": [u64::MAX]}}]});
        let decoded: JsonObject = serde_json::from_value(doc.clone()).expect("decodes");
        assert_eq!(decoded.into_value(), doc);
        let decoded: JsonObject = serde_json::from_str(&doc.to_string()).expect("decodes");
        assert_eq!(decoded.into_value(), doc);
    }

    #[test]
    fn a_document_too_deep_for_serde_json_still_decodes_and_stays_too_deep() {
        // serde_json alone refuses this (recursion limit 128)...
        let text = nested(500);
        assert!(serde_json::from_str::<Value>(&text).is_err());
        // ...the field decodes, cut at MAX_DECODED_DEPTH, so the rest of the object (and of a
        // watch list) decodes too, and validation still sees a document too deep.
        let decoded: JsonObject = serde_json::from_str(&text).expect("decodes");
        let depth = crate::api::validation::json_depth(&decoded.into_value());
        assert!(depth >= MAX_DECODED_DEPTH, "{depth}");
        assert!(depth <= MAX_DECODED_DEPTH + 1, "{depth}");
    }

    #[test]
    fn a_list_with_one_hostile_thing_decodes_whole() {
        let list = format!(
            r#"{{"items":[{{"desired":{}}},{{"desired":{{"on":true}}}}]}}"#,
            nested(300)
        );
        #[derive(Deserialize)]
        struct Item {
            desired: JsonObject,
        }
        #[derive(Deserialize)]
        struct List {
            items: Vec<Item>,
        }
        let list: List = serde_json::from_str(&list).expect("the list decodes");
        assert_eq!(list.items[1].desired.0.get("on"), Some(&json!(true)));
    }
}
