//! The shadow of one Mosquitto Thing: pure state and the AWS IoT shadow document semantics
//! (no I/O, so every rule is unit-tested).
//!
//! `desired` comes from the Thing's spec (the device cannot write it: the spec is the one source
//! of desired state, edited with kubectl or GitOps); `reported` comes from the device over MQTT.
//! Every accepted change increments `version`; an update that names a `version` other than the
//! current one is refused (optimistic concurrency). Each leaf of desired/reported carries the
//! time it was last written (`metadata`, as AWS IoT does). A bad request gets a rejection
//! document and leaves the state as it was.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::api::validation::{MAX_DOCUMENT_DEPTH, json_depth};

/// Limits on device requests; AWS IoT's shadow limits by default.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request payload accepted (bytes), checked before parsing.
    pub max_payload: usize,
    /// Largest encoded `reported` document after the merge.
    pub max_state: usize,
    /// Deepest nesting of a `reported` object (`{"a":1}` is depth 1).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 8 * 1024,
            max_state: 8 * 1024,
            max_depth: MAX_DOCUMENT_DEPTH,
        }
    }
}

/// A rejected request: the AWS error document (`code`, `message`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: u16,
    pub message: String,
    pub client_token: Option<String>,
}

impl Rejection {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            client_token: None,
        }
    }

    pub fn document(&self, now: DateTime<Utc>) -> Value {
        let mut doc =
            json!({"code": self.code, "message": self.message, "timestamp": now.timestamp()});
        if let Some(t) = &self.client_token {
            doc["clientToken"] = Value::String(t.clone());
        }
        doc
    }
}

/// What an accepted update produces: the replies to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// For `…/update/accepted`.
    pub accepted: Value,
    /// For `…/update/documents`, encoded.
    pub documents: Vec<u8>,
}

/// What a desired-state change from the spec produces.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredChanged {
    /// For `…/update/delta`, when desired and reported now differ.
    pub delta: Option<Value>,
    /// For `…/update/documents`, encoded.
    pub documents: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Shadow {
    desired: Map<String, Value>,
    reported: Map<String, Value>,
    meta_desired: Map<String, Value>,
    meta_reported: Map<String, Value>,
    version: i64,
    last_reported: Option<DateTime<Utc>>,
    /// At least the encoded size of `reported`: a report that cannot reach the limit skips
    /// encoding the whole state to measure it (the most frequent request, made cheap).
    reported_size_bound: usize,
    /// The `current` document of the last change, which is the next change's `previous`,
    /// encoded: a report's `documents` reply is two whole shadow documents, and building them
    /// as `Value` trees to encode them once was a quarter of the operator's CPU under a storm.
    last_doc: Option<Vec<u8>>,
}

/// `{"state":{"desired":…,"reported":…},"metadata":{…},"version":n}`, encoded straight from
/// the shadow's maps.
#[derive(Serialize)]
struct StateDocument<'a> {
    state: Sides<'a>,
    metadata: Sides<'a>,
    version: i64,
}

#[derive(Serialize)]
struct Sides<'a> {
    desired: &'a Map<String, Value>,
    reported: &'a Map<String, Value>,
}

/// The `…/update/documents` payload around two encoded state documents.
fn documents_payload(previous: &[u8], current: &[u8], ts: i64, token: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(previous.len() + current.len() + 96);
    out.extend_from_slice(b"{\"previous\":");
    out.extend_from_slice(previous);
    out.extend_from_slice(b",\"current\":");
    out.extend_from_slice(current);
    out.extend_from_slice(format!(",\"timestamp\":{ts}").as_bytes());
    if let Some(token) = token {
        out.extend_from_slice(b",\"clientToken\":");
        // A &str always encodes.
        out.extend_from_slice(Value::String(token.to_string()).to_string().as_bytes());
    }
    out.push(b'}');
    out
}

fn encoded_size(state: &Map<String, Value>) -> usize {
    serde_json::to_vec(state).map_or(usize::MAX, |v| v.len())
}

/// `{"a":{"b":1},"c":2}` -> `{"a":{"b":{"timestamp":t}},"c":{"timestamp":t}}`.
fn stamp(v: &Value, ts: i64) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), stamp(v, ts))).collect())
        }
        _ => json!({ "timestamp": ts }),
    }
}

/// Writes numbers the way the Kubernetes API server gives them back: a float with an integral
/// value (`21.0`) becomes an integer (`21`). Without this the state read back from status never
/// equals the state in memory, and every reconcile writes the status again.
pub fn normalize_numbers(v: &mut Value) {
    match v {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9_007_199_254_740_992.0
            {
                *v = Value::from(f as i64);
            }
        }
        Value::Object(m) => m.values_mut().for_each(normalize_numbers),
        Value::Array(a) => a.iter_mut().for_each(normalize_numbers),
        _ => {}
    }
}

/// The AWS shadow merge, which is JSON Merge Patch (RFC 7386): objects merge key by key, null
/// deletes, anything else (arrays too) replaces, and nulls inside a value that lands where no
/// object was are dropped. `json_patch::merge` implements exactly that on a `Value`; this is its
/// top level on a `Map`.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            json_patch::merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Desired keys whose value the reported state does not match (recursively for objects).
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, d) in desired {
        if d.is_null() {
            continue;
        }
        match (d, reported.get(k)) {
            (Value::Object(dm), Some(Value::Object(rm))) => {
                let sub = delta(dm, rm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Value::Object(sub));
                }
            }
            (d, Some(r)) if d == r => {}
            (d, _) => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

/// The metadata subtree matching `delta`'s keys.
fn meta_for(delta: &Map<String, Value>, meta: &Map<String, Value>) -> Map<String, Value> {
    delta
        .iter()
        .filter_map(|(k, d)| {
            let m = meta.get(k)?;
            match (d, m) {
                (Value::Object(dm), Value::Object(mm)) if !mm.contains_key("timestamp") => {
                    Some((k.clone(), Value::Object(meta_for(dm, mm))))
                }
                _ => Some((k.clone(), m.clone())),
            }
        })
        .collect()
}

fn client_token(req: &Map<String, Value>) -> Option<String> {
    // AWS limits client tokens to 64 bytes; a longer one is not echoed (it may be junk).
    req.get("clientToken")
        .and_then(Value::as_str)
        .filter(|t| t.len() <= 64)
        .map(str::to_string)
}

impl Shadow {
    /// Restores a shadow from what the Thing's status recorded (after an operator restart).
    pub fn seed(
        desired: Map<String, Value>,
        reported: Map<String, Value>,
        version: i64,
        last_reported: Option<DateTime<Utc>>,
    ) -> Self {
        let ts = last_reported.unwrap_or_else(Utc::now).timestamp();
        let meta = |m: &Map<String, Value>| match stamp(&Value::Object(m.clone()), ts) {
            Value::Object(o) => o,
            _ => Map::new(),
        };
        Self {
            meta_desired: meta(&desired),
            meta_reported: meta(&reported),
            reported_size_bound: encoded_size(&reported),
            desired,
            reported,
            version,
            last_reported,
            last_doc: None,
        }
    }

    pub fn version(&self) -> i64 {
        self.version
    }

    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired
    }

    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported
    }

    pub fn last_reported(&self) -> Option<DateTime<Utc>> {
        self.last_reported
    }

    pub fn delta(&self) -> Map<String, Value> {
        delta(&self.desired, &self.reported)
    }

    /// The document before a change, encoded: the last change's `current`, or encoded now.
    fn previous_doc(&mut self) -> Vec<u8> {
        self.last_doc
            .take()
            .unwrap_or_else(|| self.encoded_state_doc())
    }

    /// The document after a change, encoded, kept as the next change's `previous`.
    fn current_doc(&mut self) -> Vec<u8> {
        let doc = self.encoded_state_doc();
        self.last_doc = Some(doc.clone());
        doc
    }

    /// The state document (without delta or timestamp), borrowing the shadow's maps.
    fn state_document(&self) -> StateDocument<'_> {
        StateDocument {
            state: Sides {
                desired: &self.desired,
                reported: &self.reported,
            },
            metadata: Sides {
                desired: &self.meta_desired,
                reported: &self.meta_reported,
            },
            version: self.version,
        }
    }

    fn encoded_state_doc(&self) -> Vec<u8> {
        // Maps of JSON values with string keys always encode.
        serde_json::to_vec(&self.state_document()).unwrap_or_default()
    }

    fn state_doc(&self) -> Value {
        serde_json::to_value(self.state_document()).unwrap_or_default()
    }

    /// The full document, as `…/get/accepted` carries it.
    pub fn document(&self, now: DateTime<Utc>) -> Value {
        let mut doc = self.state_doc();
        let d = self.delta();
        if !d.is_empty() {
            doc["state"]["delta"] = Value::Object(d);
        }
        doc["timestamp"] = json!(now.timestamp());
        doc
    }

    fn delta_doc(&self, now: DateTime<Utc>) -> Option<Value> {
        let d = self.delta();
        if d.is_empty() {
            return None;
        }
        let meta = meta_for(&d, &self.meta_desired);
        Some(
            json!({"state": d, "metadata": meta, "version": self.version, "timestamp": now.timestamp()}),
        )
    }

    /// Sets desired from the spec. `None` when nothing changed (no version bump, no replies).
    pub fn set_desired(
        &mut self,
        desired: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Option<DesiredChanged> {
        // A null in desired state means "no such key" (it cannot be reported back).
        let mut stripped = Map::new();
        merge(&mut stripped, &desired);
        let desired = stripped;
        if desired == self.desired {
            return None;
        }
        let previous = self.previous_doc();
        let ts = now.timestamp();
        self.meta_desired.retain(|k, _| desired.contains_key(k));
        for (k, v) in &desired {
            if self.desired.get(k) != Some(v) {
                self.meta_desired.insert(k.clone(), stamp(v, ts));
            }
        }
        self.desired = desired;
        self.version += 1;
        Some(DesiredChanged {
            delta: self.delta_doc(now),
            documents: documents_payload(&previous, &self.current_doc(), ts, None),
        })
    }

    /// Handles a device's `…/shadow/update`. On rejection the state is untouched.
    pub fn update(
        &mut self,
        payload: &[u8],
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Accepted, Rejection> {
        if payload.len() > limits.max_payload {
            return Err(Rejection::new(
                413,
                "The payload exceeds the maximum size allowed",
            ));
        }
        let value: Value = serde_json::from_slice(payload)
            .map_err(|_| Rejection::new(400, "Payload contains invalid json"))?;
        let Value::Object(req) = value else {
            return Err(Rejection::new(400, "Payload must be a JSON object"));
        };
        let token = client_token(&req);
        let reject = |code, msg: &str| Rejection {
            code,
            message: msg.to_string(),
            client_token: token.clone(),
        };
        let Some(Value::Object(state)) = req.get("state") else {
            return Err(reject(400, "Missing required node: state"));
        };
        if state.contains_key("desired") {
            return Err(reject(
                400,
                "desired state is owned by the Thing's spec; edit the Thing instead",
            ));
        }
        if let Some(v) = req.get("version") {
            let Some(v) = v.as_i64() else {
                return Err(reject(400, "Invalid version"));
            };
            if v != self.version {
                return Err(reject(409, "Version conflict"));
            }
        }
        let patch = match state.get("reported") {
            None => return Err(reject(400, "Missing required node: state.reported")),
            Some(Value::Null) => None,
            Some(r @ Value::Object(m)) => {
                if json_depth(r) > limits.max_depth {
                    return Err(reject(
                        400,
                        &format!(
                            "JSON contains too many levels of nesting; maximum is {}",
                            limits.max_depth
                        ),
                    ));
                }
                Some(m)
            }
            Some(_) => return Err(reject(400, "state.reported must be an object or null")),
        };
        let mut reported = self.reported.clone();
        match patch {
            Some(p) => {
                let mut p = Value::Object(p.clone());
                normalize_numbers(&mut p);
                if let Value::Object(p) = &p {
                    merge(&mut reported, p);
                }
            }
            None => reported.clear(),
        }
        // Merging a patch adds at most the patch's encoding and a separator per key to the
        // state's: twice the payload bounds both.
        let mut size_bound = self.reported_size_bound.saturating_add(payload.len() * 2);
        if patch.is_none() {
            size_bound = 2;
        } else if size_bound > limits.max_state {
            size_bound = encoded_size(&reported);
            if size_bound > limits.max_state {
                return Err(reject(
                    413,
                    "The reported state would exceed the maximum size allowed",
                ));
            }
        }

        // Accepted: only from here on is the state changed.
        self.reported_size_bound = size_bound;
        let previous = self.previous_doc();
        let ts = now.timestamp();
        let request_reported = state.get("reported").cloned().unwrap_or(Value::Null);
        let request_meta = stamp(&request_reported, ts);
        match (&request_meta, patch) {
            (Value::Object(m), Some(_)) => merge(&mut self.meta_reported, m),
            _ => self.meta_reported.clear(),
        }
        // Metadata of deleted keys goes too.
        prune_meta(&mut self.meta_reported, &reported);
        self.reported = reported;
        self.version += 1;
        self.last_reported = Some(now);

        let mut accepted = json!({
            "state": {"reported": request_reported},
            "metadata": {"reported": request_meta},
            "version": self.version,
            "timestamp": ts,
        });
        let documents = documents_payload(&previous, &self.current_doc(), ts, token.as_deref());
        if let Some(t) = token {
            accepted["clientToken"] = Value::String(t);
        }
        Ok(Accepted {
            accepted,
            documents,
        })
    }

    /// Handles a device's `…/shadow/get` (the payload may carry a clientToken, or be empty).
    pub fn get(
        &self,
        payload: &[u8],
        limits: &Limits,
        now: DateTime<Utc>,
    ) -> Result<Value, Rejection> {
        if payload.len() > limits.max_payload {
            return Err(Rejection::new(
                413,
                "The payload exceeds the maximum size allowed",
            ));
        }
        let token = if payload.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            match serde_json::from_slice::<Value>(payload) {
                Ok(Value::Object(m)) => client_token(&m),
                Ok(_) => return Err(Rejection::new(400, "Payload must be a JSON object")),
                Err(_) => return Err(Rejection::new(400, "Payload contains invalid json")),
            }
        };
        let mut doc = self.document(now);
        if let Some(t) = token {
            doc["clientToken"] = Value::String(t);
        }
        Ok(doc)
    }
}

/// Drops metadata entries whose key no longer exists in `state`.
fn prune_meta(meta: &mut Map<String, Value>, state: &Map<String, Value>) {
    meta.retain(|k, _| state.contains_key(k));
    for (k, m) in meta.iter_mut() {
        if let (Value::Object(mm), Some(Value::Object(sm))) = (m, state.get(k))
            && !mm.contains_key("timestamp")
        {
            prune_meta(mm, sm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn report_merges_and_bumps_version() {
        let mut s = Shadow::default();
        let a = s
            .update(
                br#"{"state":{"reported":{"temp":24,"cfg":{"a":1}}},"clientToken":"c1"}"#,
                &lim(),
                t(10),
            )
            .unwrap();
        assert_eq!(s.version(), 1);
        assert_eq!(a.accepted["version"], 1);
        assert_eq!(a.accepted["clientToken"], "c1");
        assert_eq!(a.accepted["metadata"]["reported"]["temp"]["timestamp"], 10);
        assert_eq!(
            a.accepted["metadata"]["reported"]["cfg"]["a"]["timestamp"],
            10
        );
        let docs: Value = serde_json::from_slice(&a.documents).unwrap();
        assert_eq!(docs["previous"]["version"], 0);
        assert_eq!(docs["previous"]["state"]["reported"], json!({}));
        assert_eq!(docs["current"]["version"], 1);
        assert_eq!(docs["current"]["state"]["reported"]["cfg"], json!({"a": 1}));
        assert_eq!(
            docs["current"]["metadata"]["reported"]["temp"]["timestamp"],
            10
        );
        assert_eq!(docs["timestamp"], 10);
        assert_eq!(docs["clientToken"], "c1");
        let b = s
            .update(
                br#"{"state":{"reported":{"cfg":{"b":2},"temp":null}}}"#,
                &lim(),
                t(11),
            )
            .unwrap();
        // The previous document is the last change's current one.
        let docs_b: Value = serde_json::from_slice(&b.documents).unwrap();
        assert_eq!(docs_b["previous"], docs["current"]);
        assert_eq!(
            docs_b["current"]["state"]["reported"],
            json!({"cfg": {"a": 1, "b": 2}})
        );
        assert!(docs_b.get("clientToken").is_none());
        assert_eq!(
            Value::Object(s.reported().clone()),
            json!({"cfg":{"a":1,"b":2}})
        );
        assert_eq!(s.version(), 2);
        assert_eq!(s.last_reported(), Some(t(11)));
        let doc = s.document(t(12));
        assert_eq!(doc["metadata"]["reported"]["cfg"]["a"]["timestamp"], 10);
        assert_eq!(doc["metadata"]["reported"]["cfg"]["b"]["timestamp"], 11);
        assert!(doc["metadata"]["reported"].get("temp").is_none());
    }

    #[test]
    fn desired_change_produces_delta_and_documents() {
        let mut s = Shadow::default();
        s.update(
            br#"{"state":{"reported":{"temp":24,"mode":"eco"}}}"#,
            &lim(),
            t(1),
        )
        .unwrap();
        let c = s
            .set_desired(obj(json!({"temp": 26, "mode": "eco"})), t(2))
            .unwrap();
        assert_eq!(c.delta.as_ref().unwrap()["state"], json!({"temp": 26}));
        assert_eq!(
            c.delta.as_ref().unwrap()["metadata"]["temp"]["timestamp"],
            2
        );
        assert_eq!(c.delta.as_ref().unwrap()["version"], 2);
        let documents: Value = serde_json::from_slice(&c.documents).unwrap();
        assert_eq!(documents["previous"]["version"], 1);
        assert_eq!(documents["current"]["state"]["desired"]["temp"], 26);
        // Same desired again: nothing happens.
        assert!(
            s.set_desired(obj(json!({"temp": 26, "mode": "eco"})), t(3))
                .is_none()
        );
        assert_eq!(s.version(), 2);
        // The device catches up: delta empties.
        s.update(br#"{"state":{"reported":{"temp":26}}}"#, &lim(), t(4))
            .unwrap();
        assert!(s.delta().is_empty());
        assert!(s.document(t(5))["state"].get("delta").is_none());
    }

    #[test]
    fn integral_floats_are_stored_as_integers() {
        let mut s = Shadow::default();
        s.update(
            br#"{"state":{"reported":{"t":21.0,"u":21.5,"n":{"x":[1.0,2.5]}}}}"#,
            &lim(),
            t(1),
        )
        .unwrap();
        assert_eq!(
            Value::Object(s.reported().clone()),
            json!({"t": 21, "u": 21.5, "n": {"x": [1, 2.5]}})
        );
        // What the API server returns for it compares equal.
        let back: Value = serde_json::from_str(r#"{"t":21,"u":21.5,"n":{"x":[1,2.5]}}"#).unwrap();
        assert_eq!(Value::Object(s.reported().clone()), back);
    }

    #[test]
    fn merge_is_json_merge_patch() {
        // (target, patch, result): RFC 7386's examples that apply to an object target.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
            // Arrays replace whole, nulls inside them included.
            (json!({}), json!({"a": [null, 1]}), json!({"a": [null, 1]})),
        ];
        for (target, patch, want) in cases {
            let mut t = obj(target.clone());
            merge(&mut t, &obj(patch.clone()));
            assert_eq!(Value::Object(t), want, "{target} + {patch}");
        }
    }

    #[test]
    fn nested_delta_only_names_differences() {
        let d = obj(json!({"a": {"x": 1, "y": 2}, "b": [1, 2], "c": null}));
        let r = obj(json!({"a": {"x": 1, "y": 3}, "b": [1, 2]}));
        assert_eq!(Value::Object(delta(&d, &r)), json!({"a": {"y": 2}}));
    }

    #[test]
    fn malformed_requests_are_rejected_and_change_nothing() {
        let mut s = Shadow::default();
        s.update(br#"{"state":{"reported":{"temp":1}}}"#, &lim(), t(1))
            .unwrap();
        let before = s.clone();
        let deep = format!(
            r#"{{"state":{{"reported":{}1{}}}}}"#,
            r#"{"a":"#.repeat(7),
            "}".repeat(7)
        );
        let ok_deep = format!(
            r#"{{"state":{{"reported":{}1{}}}}}"#,
            r#"{"a":"#.repeat(6),
            "}".repeat(6)
        );
        let big = format!(
            r#"{{"state":{{"reported":{{"x":"{}"}}}}}}"#,
            "a".repeat(9000)
        );
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"not json".to_vec(), 400),
            (b"\xff\xfe".to_vec(), 400),
            (b"[1,2]".to_vec(), 400),
            (b"42".to_vec(), 400),
            (br#"{"nostate":1}"#.to_vec(), 400),
            (br#"{"state":[1]}"#.to_vec(), 400),
            (br#"{"state":{}}"#.to_vec(), 400),
            (br#"{"state":{"reported":5}}"#.to_vec(), 400),
            (br#"{"state":{"desired":{"temp":3}}}"#.to_vec(), 400),
            (
                br#"{"state":{"reported":{"temp":2}},"version":7}"#.to_vec(),
                409,
            ),
            (
                br#"{"state":{"reported":{"temp":2}},"version":"1"}"#.to_vec(),
                400,
            ),
            (deep.into_bytes(), 400),
            (big.into_bytes(), 413),
            ("[".repeat(100_000).into_bytes(), 413),
        ];
        for (payload, code) in cases {
            let r = s.update(&payload, &lim(), t(2)).unwrap_err();
            assert_eq!(
                r.code,
                code,
                "{}",
                String::from_utf8_lossy(&payload[..payload.len().min(60)])
            );
            assert_eq!(s, before);
        }
        // Within the size limit but the merged state too large.
        let mut small = lim();
        small.max_state = 20;
        let r = s
            .update(
                br#"{"state":{"reported":{"y":"0123456789abcdef"}}}"#,
                &small,
                t(2),
            )
            .unwrap_err();
        assert_eq!(r.code, 413);
        assert_eq!(s, before);
        // Exactly at the depth limit is fine; a matching version is fine.
        s.update(ok_deep.as_bytes(), &lim(), t(3)).unwrap();
        s.update(
            br#"{"state":{"reported":{"temp":2}},"version":2}"#,
            &lim(),
            t(4),
        )
        .unwrap();
        assert_eq!(s.version(), 3);
    }

    #[test]
    fn rejection_echoes_client_token() {
        let mut s = Shadow::default();
        let r = s
            .update(
                br#"{"state":{"reported":{}},"version":5,"clientToken":"tok"}"#,
                &lim(),
                t(1),
            )
            .unwrap_err();
        let doc = r.document(t(1));
        assert_eq!(doc["code"], 409);
        assert_eq!(doc["clientToken"], "tok");
    }

    #[test]
    fn reported_null_clears_state() {
        let mut s = Shadow::default();
        s.update(br#"{"state":{"reported":{"a":1,"b":2}}}"#, &lim(), t(1))
            .unwrap();
        s.update(br#"{"state":{"reported":null}}"#, &lim(), t(2))
            .unwrap();
        assert!(s.reported().is_empty());
        assert!(
            s.document(t(3))["metadata"]["reported"]
                .as_object()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn get_returns_document_with_delta() {
        let mut s = Shadow::seed(
            obj(json!({"temp": 26})),
            obj(json!({"temp": 24})),
            7,
            Some(t(5)),
        );
        let doc = s.get(b"", &lim(), t(6)).unwrap();
        assert_eq!(doc["version"], 7);
        assert_eq!(doc["state"]["delta"], json!({"temp": 26}));
        assert_eq!(doc["metadata"]["reported"]["temp"]["timestamp"], 5);
        let doc = s.get(br#"{"clientToken":"x"}"#, &lim(), t(6)).unwrap();
        assert_eq!(doc["clientToken"], "x");
        assert_eq!(s.get(b"nope", &lim(), t(6)).unwrap_err().code, 400);
        // Seeded state continues its version sequence.
        s.update(br#"{"state":{"reported":{"temp":26}}}"#, &lim(), t(7))
            .unwrap();
        assert_eq!(s.version(), 8);
    }
}
