//! The operator's own enforcement of every spec rule.
//!
//! Kubernetes 1.25+ enforces the CEL rules in the CRDs at admission; older API servers drop them
//! silently. So the operator evaluates the same CEL rules client-side (kube's `cel` feature, the
//! rules compiled from the CRD schema itself, so the two can never disagree) and adds the rules
//! no schema can express (encoded sizes, JSON depth, template syntax, topic grammar).

use std::{str::FromStr, time::Duration};

use serde_json::Value;

use super::{
    BrokerConnection, JsonObject, Observer, Subscriber, Thing,
    broker_connection::DERIVED_CLIENT_ID_PREFIX,
    thing::{Broker, MAX_DESIRED_BYTES},
};

/// The AWS thing attribute that records which Thing owns the thing (`provider::aws::ownership`
/// sets and checks it); a spec may not set it.
pub const OWNER_ATTRIBUTE: &str = "thing-operator-owner";

/// Deepest nesting accepted in a desired document. AWS IoT counts 8 levels for the whole
/// shadow document, two of which are `state` and `desired`.
pub const MAX_DOCUMENT_DEPTH: usize = 6;

/// What the operator's configuration lets a spec do beyond the schema: floors for every interval
/// a spec sets (each one is a rate of backend calls or certificate issuance, billed and
/// rate-limited per account, so one namespace must not spend everybody's quota) and whether AWS
/// policy templates may reach beyond the Thing's own identity.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecLimits {
    pub min_poll_interval: Duration,
    pub min_rotate_after: Duration,
    pub min_rotation_overlap: Duration,
    /// Allow policy templates any action on any resource (off: only the Thing's own client,
    /// thing, topics and shadow).
    pub unrestricted_policies: bool,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            min_poll_interval: Duration::from_secs(10),
            min_rotate_after: Duration::from_secs(3600),
            min_rotation_overlap: Duration::from_secs(60),
            unrestricted_policies: false,
        }
    }
}

/// Every problem found in a spec, in a message a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<String>,
}

impl InvalidSpec {
    fn from_problems(problems: Vec<String>) -> Result<(), InvalidSpec> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InvalidSpec { problems })
        }
    }
}

fn cel_problems(result: Result<(), kube::core::cel::ValidationErrors>, problems: &mut Vec<String>) {
    if let Err(errors) = result {
        for e in errors.iter() {
            problems.push(e.to_string());
        }
    }
}

/// Parses a Go-style duration (`720h`, `1h30m`, `90s`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = kube::core::Duration::from_str(s)
        .map_err(|e| format!("{s:?} is not a duration like 720h or 90s: {e}"))?;
    if d.is_negative() {
        return Err(format!("{s:?} is negative"));
    }
    Ok(std::time::Duration::from(d))
}

/// Nesting depth of a JSON value: a scalar is 0, `{"a":1}` is 1.
pub fn json_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Checks a state document against the size and depth limits shared by every backend.
pub fn check_document(what: &str, doc: &JsonObject, max_bytes: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let len = doc.encoded_len();
    if len > max_bytes {
        problems.push(format!(
            "{what} is {len} bytes encoded, over the limit of {max_bytes}"
        ));
    }
    let depth = doc.0.values().map(json_depth).max().unwrap_or(0) + 1;
    if depth > MAX_DOCUMENT_DEPTH {
        problems.push(format!(
            "{what} nests {depth} levels deep, over the limit of {MAX_DOCUMENT_DEPTH}"
        ));
    }
    problems
}

fn is_attr_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.,@/:#-".contains(c)
}

fn is_attr_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.,@/:#=[]-".contains(c)
}

/// Fills a policy template's placeholders with the given values.
pub fn render_policy_template(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (key, value) in vars {
        out = out.replace(&format!("${{{key}}}"), value);
    }
    out
}

/// Checks that a policy template renders to an IAM-style policy document.
pub fn check_policy_template(template: &str) -> Result<(), String> {
    let rendered = render_policy_template(
        template,
        &[
            ("thingName", "t"),
            ("clientId", "c"),
            ("topicPrefix", "p"),
            ("region", "r"),
            ("account", "0"),
        ],
    );
    if let Some(pos) = rendered.find("${") {
        let rest: String = rendered[pos..].chars().take(24).collect();
        return Err(format!(
            "policy.template has an unknown placeholder at {rest:?}"
        ));
    }
    let doc: Value = serde_json::from_str(&rendered)
        .map_err(|e| format!("policy.template is not valid JSON: {e}"))?;
    let statements = doc
        .get("Statement")
        .and_then(Value::as_array)
        .ok_or_else(|| "policy.template needs a \"Statement\" array".to_string())?;
    if statements.is_empty() {
        return Err("policy.template has an empty \"Statement\" array".into());
    }
    for (i, s) in statements.iter().enumerate() {
        let effect = s.get("Effect").and_then(Value::as_str);
        if !matches!(effect, Some("Allow") | Some("Deny")) {
            return Err(format!(
                "policy.template Statement[{i}] needs Effect Allow or Deny"
            ));
        }
        if s.get("Action").is_none() || s.get("Resource").is_none() {
            return Err(format!(
                "policy.template Statement[{i}] needs Action and Resource"
            ));
        }
    }
    Ok(())
}

/// Placeholders that stand for the Thing's own identity in a policy resource.
const OWN_IDENTITY: [&str; 3] = ["${clientId}", "${thingName}", "${topicPrefix}"];

/// Whether a policy resource names only the Thing's own client, thing, topics or shadow:
/// `arn:aws:iot:${region}:${account}:<type>/<path>` where the path starts with an identity
/// placeholder (optionally under `$aws/things/`) that ends the path or is followed by `/`, so
/// neither a wildcard nor a longer name can reach another device's resources.
fn is_own_resource(resource: &str) -> bool {
    let Some(path) = resource
        .strip_prefix("arn:aws:iot:${region}:${account}:")
        .and_then(|r| r.split_once('/'))
        .map(|(_, path)| path)
    else {
        return false;
    };
    let path = path.strip_prefix("$aws/things/").unwrap_or(path);
    OWN_IDENTITY.iter().any(|own| {
        path.strip_prefix(own)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Refuses Allow statements that reach beyond the Thing's own identity (another device's
/// topics, `*`, control-plane actions on other resources).
pub fn check_policy_scope(template: &str) -> Vec<String> {
    let Ok(doc) = serde_json::from_str::<Value>(template) else {
        return Vec::new(); // reported by check_policy_template
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut problems = Vec::new();
    let statements = doc.get("Statement").and_then(Value::as_array);
    for (i, s) in statements.into_iter().flatten().enumerate() {
        if s.get("Effect").and_then(Value::as_str) != Some("Allow") {
            continue; // Deny only takes away
        }
        for action in strings(s.get("Action")) {
            if !action.starts_with("iot:") {
                problems.push(format!(
                    "policy.template Statement[{i}] allows {action:?}: only iot: actions are allowed"
                ));
            }
        }
        for resource in strings(s.get("Resource")) {
            if !is_own_resource(&resource) {
                problems.push(format!(
                    "policy.template Statement[{i}] allows resource {resource:?}: resources must be \
                     arn:aws:iot:${{region}}:${{account}}:<type>/ followed by ${{clientId}}, ${{thingName}} \
                     or ${{topicPrefix}} (the Thing's own identity)"
                ));
            }
        }
    }
    problems
}

/// Checks an interval a spec sets: a duration, and not below the operator's floor.
fn check_interval(field: &str, value: Option<&str>, min: Duration, problems: &mut Vec<String>) {
    let Some(value) = value else { return };
    match parse_duration(value) {
        Err(e) => problems.push(format!("{field}: {e}")),
        Ok(d) if d < min => problems.push(format!(
            "{field}: {value} is below this operator's minimum of {}",
            humantime::format_duration(min)
        )),
        Ok(_) => {}
    }
}

/// All of a Thing's rules. `Ok` means the operator may call its backend.
pub fn validate_thing(thing: &Thing, limits: &SpecLimits) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    cel_problems(thing.validate_cel(), &mut problems);
    let spec = &thing.spec;

    if let Some(name) = &spec.thing_name
        && (name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ":_-".contains(c)))
    {
        problems.push(format!(
            "thingName {name:?} must be 1-128 characters of letters, digits, ':', '_' or '-'"
        ));
    }
    // `_` separates namespace and name in the names the operator derives: a thingName that
    // looks like another namespace's derived name would squat on that namespace's devices.
    if let Some(name) = &spec.thing_name
        && let Some((prefix, _)) = name.split_once('_')
    {
        let namespace = thing.metadata.namespace.as_deref().unwrap_or_default();
        if prefix != namespace {
            problems.push(format!(
                "thingName {name:?}: '_' is reserved for derived names (<namespace>_<name>); a thingName with '_' must start with \"{namespace}_\""
            ));
        }
    }
    if spec.attributes.len() > 50 {
        problems.push(format!(
            "attributes has {} entries, over the limit of 50",
            spec.attributes.len()
        ));
    }
    if spec.attributes.contains_key(OWNER_ATTRIBUTE) {
        problems.push(format!(
            "attribute {OWNER_ATTRIBUTE:?} is reserved: the operator records the thing's owner there"
        ));
    }
    for (key, value) in &spec.attributes {
        if key.is_empty() || key.len() > 128 || !key.chars().all(is_attr_name_char) {
            problems.push(format!(
                "attribute name {key:?} must be 1-128 characters of letters, digits or _.,@/:#-"
            ));
        }
        if value.len() > 800 || !value.chars().all(is_attr_value_char) {
            problems.push(format!(
                "attribute {key:?}: value must be at most 800 characters of letters, digits or _.,@/:#=[]-"
            ));
        }
    }
    if let Some(desired) = &spec.desired {
        problems.extend(check_document("desired", desired, MAX_DESIRED_BYTES));
    }
    check_interval(
        "credentials.rotateAfter",
        spec.credentials.rotate_after.as_deref(),
        limits.min_rotate_after,
        &mut problems,
    );
    check_interval(
        "credentials.rotationOverlap",
        spec.credentials.rotation_overlap.as_deref(),
        limits.min_rotation_overlap,
        &mut problems,
    );
    check_interval(
        "shadow.pollInterval",
        spec.shadow
            .as_ref()
            .and_then(|s| s.poll_interval.as_deref()),
        limits.min_poll_interval,
        &mut problems,
    );
    if let Some(policy) = &spec.policy {
        if spec.broker == Broker::Aws {
            match check_policy_template(&policy.template) {
                Err(e) => problems.push(e),
                Ok(()) if !limits.unrestricted_policies => {
                    problems.extend(check_policy_scope(&policy.template))
                }
                Ok(()) => {}
            }
        } else {
            problems.push(format!(
                "policy applies to broker AWS only, not {}",
                spec.broker
            ));
        }
    }
    // AWS: CreateKeysAndCertificate; Azure: a symmetric-key device.
    if spec.credentials.source == super::thing::CredentialSource::CloudIssued
        && !matches!(spec.broker, Broker::Aws | Broker::Azure)
    {
        problems.push(format!(
            "credentials.source CloudIssued needs broker AWS or Azure, not {}",
            spec.broker
        ));
    }
    InvalidSpec::from_problems(problems)
}

/// Checks a JSON pointer (RFC 6901) used to address a field.
pub fn check_json_pointer(field: &str, pointer: &str) -> Option<String> {
    if pointer.is_empty() || !pointer.starts_with('/') {
        return Some(format!(
            "{field} {pointer:?} must be a JSON pointer starting with '/'"
        ));
    }
    let bad_escape = pointer.split('/').any(|seg| {
        seg.match_indices('~')
            .any(|(i, _)| !matches!(seg.as_bytes().get(i + 1), Some(b'0' | b'1')))
    });
    if bad_escape {
        return Some(format!(
            "{field} {pointer:?} has a '~' not followed by 0 or 1"
        ));
    }
    None
}

/// Checks an MQTT topic a message is published to (no wildcards).
pub fn check_publish_topic(field: &str, topic: &str) -> Option<String> {
    if topic.is_empty() || topic.len() > 65535 {
        return Some(format!("{field} must be 1-65535 bytes"));
    }
    if topic.contains(['+', '#', '\0']) {
        return Some(format!(
            "{field} {topic:?} must not contain '+', '#' or NUL"
        ));
    }
    None
}

/// Checks an MQTT topic filter: `#` only as the whole last level, `+` only as a whole level.
pub fn check_topic_filter(field: &str, filter: &str) -> Option<String> {
    if filter.is_empty() || filter.len() > 65535 || filter.contains('\0') {
        return Some(format!("{field} must be 1-65535 bytes without NUL"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Some(format!(
                "{field} {filter:?}: '#' must be the whole last level"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Some(format!("{field} {filter:?}: '+' must be a whole level"));
        }
    }
    None
}

/// Where a namespace's Observers and Subscribers may publish and subscribe on the operator's
/// broker: their namespace's own subtree `{prefix}/namespaces/{namespace}/` (which holds its
/// Things' topic trees too), plus prefixes the operator's configuration grants to named
/// namespaces (bridges, shared feeds). `$`-topics (broker internals, the AWS shadow layout) and
/// other namespaces' subtrees are out of reach.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicScope {
    pub prefix: String,
    /// Extra topic prefixes per namespace.
    pub grants: std::collections::BTreeMap<String, Vec<String>>,
    /// Accept every topic. Only the failpoint `validation-topic-scope-off` sets it, for the test
    /// that proves the broker's ACL still confines a namespace when validation fails to.
    pub unchecked: bool,
}

impl Default for TopicScope {
    fn default() -> Self {
        Self {
            prefix: "things".into(),
            grants: Default::default(),
            unchecked: false,
        }
    }
}

impl TopicScope {
    /// The namespace's own subtree, with its trailing `/`.
    pub fn subtree(&self, namespace: &str) -> String {
        format!("{}/namespaces/{namespace}/", self.prefix)
    }

    /// Refuses a topic or filter outside the namespace's reach. A root matches literally, so a
    /// wildcard can never stand in for the namespace level.
    pub fn check(&self, field: &str, namespace: &str, topic: &str) -> Option<String> {
        if self.unchecked {
            return None;
        }
        if topic.starts_with('$') {
            return Some(format!(
                "{field} {topic:?}: $-topics are reserved for the broker and the backends"
            ));
        }
        let own = self.subtree(namespace);
        let granted = self.grants.get(namespace).into_iter().flatten();
        let inside = std::iter::once(own.as_str())
            .chain(granted.map(String::as_str))
            .any(|root| {
                let root = root.trim_end_matches('/');
                topic
                    .strip_prefix(root)
                    .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
            });
        (!inside)
            .then(|| format!("{field} {topic:?} must lie under this namespace's topic tree {own}"))
    }
}

pub fn validate_observer(observer: &Observer, topics: &TopicScope) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    cel_problems(observer.validate_cel(), &mut problems);
    let spec = &observer.spec;
    if let Some(filter) = &spec.filter {
        for f in &filter.fields {
            problems.extend(check_json_pointer("filter.fields", f));
        }
        if filter.changed_by.is_some_and(|d| !d.is_finite() || d < 0.0) {
            problems.push("filter.changedBy must be a finite number >= 0".into());
        }
        if filter
            .changed_by_percent
            .is_some_and(|d| !d.is_finite() || d < 0.0)
        {
            problems.push("filter.changedByPercent must be a finite number >= 0".into());
        }
        if let Some(source) = &filter.expression
            && let Err(e) = super::filter_expression::FilterExpression::compile(source)
        {
            problems.push(e.to_string());
        }
    }
    if let Some(m) = &spec.sink.mqtt {
        problems.extend(check_publish_topic("sink.mqtt.topic", &m.topic));
        // The operator's broker is shared by every tenant: its topics are scoped. A broker a
        // BrokerConnection names is the tenant's own: its topics are theirs.
        if m.connection.is_none() {
            let namespace = observer.metadata.namespace.as_deref().unwrap_or_default();
            problems.extend(topics.check("sink.mqtt.topic", namespace, &m.topic));
        }
        if m.qos > 2 {
            problems.push("sink.mqtt.qos must be 0, 1 or 2".into());
        }
    }
    if let Some(h) = &spec.sink.http {
        match url::Url::parse(&h.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            Ok(u) => problems.push(format!(
                "sink.http.url scheme {:?} must be http or https",
                u.scheme()
            )),
            Err(e) => problems.push(format!("sink.http.url is not a URL: {e}")),
        }
    }
    if let Some(t) = &spec.sink.thing
        && let Some(p) = &t.path
    {
        problems.extend(check_json_pointer("sink.thing.path", p));
    }
    if let Some(retry) = &spec.retry {
        for (field, value) in [
            ("retry.initialBackoff", &retry.initial_backoff),
            ("retry.maxBackoff", &retry.max_backoff),
            ("retry.deadline", &retry.deadline),
        ] {
            if let Some(v) = value
                && let Err(e) = parse_duration(v)
            {
                problems.push(format!("{field}: {e}"));
            }
        }
    }
    if let Some(dead) = &spec.dead_letter {
        if let Some(m) = &dead.mqtt {
            problems.extend(check_publish_topic("deadLetter.mqtt.topic", &m.topic));
            if m.connection.is_none() {
                let namespace = observer.metadata.namespace.as_deref().unwrap_or_default();
                problems.extend(topics.check("deadLetter.mqtt.topic", namespace, &m.topic));
            }
        }
        if let Some(h) = &dead.http
            && !url::Url::parse(&h.url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            problems.push("deadLetter.http.url must be an http or https URL".into());
        }
    }
    InvalidSpec::from_problems(problems)
}

pub fn validate_subscriber(
    subscriber: &Subscriber,
    topics: &TopicScope,
) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    cel_problems(subscriber.validate_cel(), &mut problems);
    let spec = &subscriber.spec;
    if let Some(m) = &spec.source.mqtt {
        problems.extend(check_topic_filter(
            "source.mqtt.topicFilter",
            &m.topic_filter,
        ));
        if m.connection.is_none() {
            let namespace = subscriber.metadata.namespace.as_deref().unwrap_or_default();
            problems.extend(topics.check("source.mqtt.topicFilter", namespace, &m.topic_filter));
        }
        if m.qos > 2 {
            problems.push("source.mqtt.qos must be 0, 1 or 2".into());
        }
    }
    if let Some(p) = &spec.target.path {
        problems.extend(check_json_pointer("target.path", p));
    }
    InvalidSpec::from_problems(problems)
}

/// The rules of a BrokerConnection beyond its schema (which older API servers may not enforce
/// in full): a URL the operator can use without putting credentials in it, and a client id a
/// broker takes. Where the URL may point is the egress policy's question, asked at connect.
pub fn validate_broker_connection(connection: &BrokerConnection) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    let spec = &connection.spec;
    match url::Url::parse(&spec.url) {
        Ok(u) => {
            let tls = match u.scheme() {
                "mqtt" => false,
                "mqtts" => true,
                other => {
                    problems.push(format!("url scheme {other:?} must be mqtt or mqtts"));
                    false
                }
            };
            if !u.username().is_empty() || u.password().is_some() {
                // Never echo the URL: it holds a credential.
                problems
                    .push("url must not carry credentials; use auth.usernamePasswordSecret".into());
            }
            if u.host_str().is_none_or(str::is_empty) {
                problems.push("url has no host".into());
            }
            if !matches!(u.path(), "" | "/") || u.query().is_some() || u.fragment().is_some() {
                problems.push("url must be scheme://host[:port] only".into());
            }
            if spec.tls.is_some() && !tls {
                problems.push("tls is set but the url is mqtt://; use mqtts://".into());
            }
        }
        // The parser's message may quote the URL; it holds no credential we accept, but say
        // only what is wrong.
        Err(e) => problems.push(format!("url is not a URL: {e}")),
    }
    if let Some(id) = &spec.client_id
        && (id.is_empty()
            || id.len() > super::broker_connection::MAX_CLIENT_ID
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        problems.push("clientId must be 1-64 characters of A-Z a-z 0-9 . _ : -".into());
    }
    // Derived ids (`thing-operator.<namespace>.<name>`) belong to their namespace: another
    // namespace naming one could hold it first and keep its owner off the broker.
    if let Some(id) = &spec.client_id
        && id.starts_with(DERIVED_CLIENT_ID_PREFIX)
        && !id.starts_with(&format!(
            "{DERIVED_CLIENT_ID_PREFIX}{}.",
            connection.metadata.namespace.as_deref().unwrap_or_default()
        ))
    {
        problems.push(format!(
            "clientId {DERIVED_CLIENT_ID_PREFIX}* is reserved for derived ids; only \
             {DERIVED_CLIENT_ID_PREFIX}<this namespace>.* may be set"
        ));
    }
    if spec
        .keep_alive_seconds
        .is_some_and(|k| !(5..=3600).contains(&k))
    {
        problems.push("keepAliveSeconds must be 5-3600".into());
    }
    InvalidSpec::from_problems(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenants_own_broker_has_no_topic_scope_but_no_wildcard_sinks() {
        let observer: Observer = serde_json::from_value(json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "Observer",
            "metadata": {"name": "o", "namespace": "team-a"},
            "spec": {"source": {"thingName": "t"},
                     "sink": {"mqtt": {"connection": "mine", "topic": "plant/line-1/temp"}}}
        }))
        .unwrap();
        assert!(validate_observer(&observer, &TopicScope::default()).is_ok());
        let mut wild = observer.clone();
        if let Some(m) = wild.spec.sink.mqtt.as_mut() {
            m.topic = "plant/+/temp".into();
        }
        assert!(validate_observer(&wild, &TopicScope::default()).is_err());
        let mut own_broker = observer;
        if let Some(m) = own_broker.spec.sink.mqtt.as_mut() {
            m.connection = None;
        }
        assert!(
            validate_observer(&own_broker, &TopicScope::default()).is_err(),
            "without a connection the operator's scope applies"
        );
        let subscriber: Subscriber = serde_json::from_value(json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "Subscriber",
            "metadata": {"name": "s", "namespace": "team-a"},
            "spec": {"source": {"mqtt": {"connection": "mine", "topicFilter": "plant/#"}},
                     "target": {"thingName": "t"}}
        }))
        .unwrap();
        assert!(validate_subscriber(&subscriber, &TopicScope::default()).is_ok());
    }

    #[test]
    fn broker_connection_rules() {
        let conn = |spec: Value| {
            let mut c = BrokerConnection::new("b", serde_json::from_value(spec).expect("a spec"));
            c.metadata.namespace = Some("team-a".into());
            c
        };
        for ok in [
            json!({"url": "mqtt://broker.example"}),
            json!({"url": "mqtts://broker.example:8883", "tls": {}}),
            json!({"url": "mqtt://10.0.0.1:1883/", "clientId": "plant-7"}),
            json!({"url": "mqtt://broker", "clientId": "thing-operator.team-a.line-2"}),
        ] {
            assert!(
                validate_broker_connection(&conn(ok.clone())).is_ok(),
                "{ok}"
            );
        }
        for (bad, says) in [
            (json!({"url": "http://broker"}), "scheme"),
            (json!({"url": "mqtt://admin:hunter2@broker"}), "credentials"),
            (json!({"url": "mqtt://broker/topic"}), "host[:port] only"),
            (json!({"url": "mqtt://broker", "tls": {}}), "mqtts"),
            (
                json!({"url": "mqtt://broker", "clientId": "a b"}),
                "clientId",
            ),
            (
                json!({"url": "mqtt://broker", "keepAliveSeconds": 1}),
                "keepAlive",
            ),
            // Another namespace's derived id (team-b's BrokerConnection "hub").
            (
                json!({"url": "mqtt://broker", "clientId": "thing-operator.team-b.hub"}),
                "reserved",
            ),
            (
                json!({"url": "mqtt://broker", "clientId": "thing-operator.team-ab"}),
                "reserved",
            ),
        ] {
            let err = validate_broker_connection(&conn(bad.clone()))
                .expect_err("refused")
                .to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
    use crate::api::{ObserverSpec, SubscriberSpec, ThingSpec};
    use serde_json::json;

    fn thing(spec: Value) -> Thing {
        Thing::new(
            "t1",
            serde_json::from_value::<ThingSpec>(spec).expect("spec parses"),
        )
    }

    fn validate_thing_default(t: &Thing) -> Result<(), InvalidSpec> {
        validate_thing(t, &SpecLimits::default())
    }

    #[test]
    fn the_owner_attribute_is_reserved() {
        let err = validate_thing_default(&thing(json!({
            "broker": "AWS",
            "attributes": {OWNER_ATTRIBUTE: "team-a/lamp/uid-1"}
        })))
        .unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
        assert_eq!(
            validate_thing_default(&thing(
                json!({"broker": "AWS", "attributes": {"owner": "me"}})
            )),
            Ok(())
        );
    }

    #[test]
    fn a_thing_name_cannot_look_like_another_namespaces_derived_name() {
        let in_ns = |spec: Value| {
            let mut t = thing(spec);
            t.metadata.namespace = Some("team-b".into());
            validate_thing_default(&t)
        };
        assert!(in_ns(json!({"thingName": "team-a_lamp"})).is_err());
        assert!(in_ns(json!({"thingName": "_lamp"})).is_err());
        assert_eq!(in_ns(json!({"thingName": "team-b_lamp"})), Ok(()));
        assert_eq!(in_ns(json!({"thingName": "shared-lamp-7"})), Ok(()));
    }

    #[test]
    fn intervals_below_the_floor_are_refused() {
        let limits = SpecLimits::default();
        let table = [
            (
                json!({"shadow": {"pollInterval": "0s"}}),
                Some("shadow.pollInterval"),
            ),
            (
                json!({"shadow": {"pollInterval": "9s"}}),
                Some("shadow.pollInterval"),
            ),
            (json!({"shadow": {"pollInterval": "10s"}}), None),
            (
                json!({"credentials": {"rotateAfter": "1ms"}}),
                Some("credentials.rotateAfter"),
            ),
            (
                json!({"credentials": {"rotateAfter": "59m"}}),
                Some("credentials.rotateAfter"),
            ),
            (json!({"credentials": {"rotateAfter": "720h"}}), None),
            (
                json!({"credentials": {"rotationOverlap": "1s"}}),
                Some("credentials.rotationOverlap"),
            ),
            (json!({"credentials": {"rotationOverlap": "24h"}}), None),
        ];
        for (spec, refused) in table {
            let result = validate_thing(&thing(spec.clone()), &limits);
            match refused {
                Some(field) => {
                    let err = result.expect_err(&spec.to_string());
                    assert!(err.to_string().contains(field), "{spec}: {err}");
                    assert!(err.to_string().contains("minimum"), "{spec}: {err}");
                }
                None => assert_eq!(result, Ok(()), "{spec}"),
            }
        }
        // The operator's configuration sets the floor.
        let lowered = SpecLimits {
            min_poll_interval: Duration::from_secs(1),
            ..SpecLimits::default()
        };
        assert_eq!(
            validate_thing(&thing(json!({"shadow": {"pollInterval": "1s"}})), &lowered),
            Ok(())
        );
    }

    #[test]
    fn policy_templates_stay_on_the_things_own_identity() {
        let template = |action: &str, resource: &str| {
            json!({"broker": "AWS", "policy": {"template": json!({"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": action, "Resource": resource}]}).to_string()}})
        };
        let own = [
            (
                "iot:Connect",
                "arn:aws:iot:${region}:${account}:client/${clientId}",
            ),
            (
                "iot:*",
                "arn:aws:iot:${region}:${account}:client/${clientId}",
            ),
            (
                "iot:Publish",
                "arn:aws:iot:${region}:${account}:topic/${topicPrefix}/*",
            ),
            (
                "iot:Subscribe",
                "arn:aws:iot:${region}:${account}:topicfilter/$aws/things/${thingName}/shadow/*",
            ),
            (
                "iot:GetThingShadow",
                "arn:aws:iot:${region}:${account}:thing/${thingName}",
            ),
        ];
        for (action, resource) in own {
            assert_eq!(
                validate_thing_default(&thing(template(action, resource))),
                Ok(()),
                "{action} {resource}"
            );
        }
        let foreign = [
            ("iot:*", "*"),
            ("iot:Publish", "arn:aws:iot:${region}:${account}:topic/*"),
            (
                "iot:Publish",
                "arn:aws:iot:${region}:${account}:topic/$aws/things/other/shadow/*",
            ),
            // A prefix match would reach every Thing whose name starts with this one's.
            (
                "iot:Connect",
                "arn:aws:iot:${region}:${account}:client/${clientId}*",
            ),
            ("iot:Connect", "arn:aws:iot:*:*:client/${clientId}"),
            (
                "iam:PassRole",
                "arn:aws:iot:${region}:${account}:client/${clientId}",
            ),
        ];
        for (action, resource) in foreign {
            let err = validate_thing_default(&thing(template(action, resource)))
                .expect_err(&format!("{action} {resource}"));
            assert!(err.to_string().contains("policy.template"), "{err}");
            // Allowed when the operator's configuration says so.
            let open = SpecLimits {
                unrestricted_policies: true,
                ..SpecLimits::default()
            };
            assert_eq!(
                validate_thing(&thing(template(action, resource)), &open),
                Ok(())
            );
        }
    }

    #[test]
    fn minimal_thing_is_valid() {
        assert_eq!(validate_thing_default(&thing(json!({}))), Ok(()));
        assert_eq!(thing(json!({})).spec.broker, Broker::Mosquitto);
    }

    #[test]
    fn oversized_and_deep_desired_is_rejected() {
        let big = "x".repeat(MAX_DESIRED_BYTES);
        let err = validate_thing_default(&thing(json!({"desired": {"blob": big}}))).unwrap_err();
        assert!(err.to_string().contains("over the limit of 8192"), "{err}");
        let deep = json!({"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}});
        let err = validate_thing_default(&thing(deep)).unwrap_err();
        assert!(err.to_string().contains("nests 7 levels"), "{err}");
    }

    #[test]
    fn bad_attributes_and_durations_are_reported_together() {
        let err = validate_thing_default(&thing(json!({
            "attributes": {"bad key!": "v", "ok": "spaces not allowed"},
            "credentials": {"rotateAfter": "forever"}
        })))
        .unwrap_err();
        assert_eq!(err.problems.len(), 3, "{err}");
    }

    #[test]
    fn policy_template_rules() {
        assert!(check_policy_template(r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:${region}:${account}:client/${clientId}"}]}"#).is_ok());
        assert!(
            check_policy_template("{not json")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(check_policy_template(r#"{"Statement":[]}"#).is_err());
        assert!(
            check_policy_template(
                r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"${nope}"}]}"#
            )
            .unwrap_err()
            .contains("unknown placeholder")
        );
        let t = thing(json!({"broker": "Mosquitto", "policy": {"template": "{}"}}));
        assert!(
            validate_thing_default(&t)
                .unwrap_err()
                .to_string()
                .contains("AWS only")
        );
    }

    #[test]
    fn cel_rules_are_enforced_by_the_operator() {
        let spec: ObserverSpec = serde_json::from_value(json!({
            "source": {"thingName": "a", "matchLabels": {"x": "y"}},
            "sink": {"mqtt": {"topic": "t"}, "http": {"url": "http://x"}}
        }))
        .unwrap();
        let err = validate_observer(&Observer::new("o", spec), &TopicScope::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("exactly one of thingName or matchLabels"),
            "{msg}"
        );
        assert!(msg.contains("exactly one of mqtt, http or thing"), "{msg}");
    }

    #[test]
    fn retry_and_dead_letter_rules() {
        let spec: ObserverSpec = serde_json::from_value(json!({
            "source": {"thingName": "a"},
            "sink": {"http": {"url": "https://example.com/x"}},
            "retry": {"initialBackoff": "soon", "deadline": "30s"},
            "deadLetter": {"mqtt": {"topic": "things/namespaces/other/dead"}},
        }))
        .unwrap();
        let mut observer = Observer::new("o", spec);
        observer.metadata.namespace = Some("mine".into());
        let err = validate_observer(&observer, &TopicScope::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("retry.initialBackoff"), "{msg}");
        assert!(msg.contains("deadLetter.mqtt.topic"), "{msg}");
        assert!(!msg.contains("retry.deadline"), "{msg}");
        assert_eq!(err.problems.len(), 2, "{err}");
    }

    #[test]
    fn topic_rules() {
        assert!(check_topic_filter("f", "a/+/b/#").is_none());
        assert!(check_topic_filter("f", "a/#/b").is_some());
        assert!(check_topic_filter("f", "a/b+").is_some());
        assert!(check_publish_topic("t", "a/+").is_some());
        let spec: SubscriberSpec = serde_json::from_value(json!({
            "source": {"mqtt": {"topicFilter": "x/#/y"}},
            "target": {"thingName": "t", "path": "nope"}
        }))
        .unwrap();
        let err =
            validate_subscriber(&Subscriber::new("s", spec), &TopicScope::default()).unwrap_err();
        // Bad filter grammar, outside the namespace, bad pointer.
        assert_eq!(err.problems.len(), 3, "{err}");
    }

    #[test]
    fn topics_stay_in_their_namespace() {
        let scope = TopicScope {
            prefix: "things".into(),
            grants: [("bridge".to_string(), vec!["feeds/shared".to_string()])].into(),
            unchecked: false,
        };
        let table = [
            ("team-a", "things/namespaces/team-a/alerts", true),
            ("team-a", "things/namespaces/team-a/#", true),
            ("team-a", "things/namespaces/team-a/things/+/state", true),
            ("team-a", "things/namespaces/team-b/alerts", false),
            ("team-a", "things/namespaces/+/alerts", false),
            ("team-a", "things/namespaces/#", false),
            ("team-a", "things/#", false),
            ("team-a", "#", false),
            ("team-a", "things/namespaces/team-a", false),
            ("team-a", "things/namespaces/team-a/", false),
            // A longer namespace name is not this namespace.
            ("team", "things/namespaces/team-a/alerts", false),
            ("team-a", "$SYS/#", false),
            ("team-a", "$aws/things/team-a_lamp/shadow/update", false),
            ("team-a", "feeds/shared/x", false),
            ("bridge", "feeds/shared/x", true),
            ("bridge", "feeds/shared/#", true),
            ("bridge", "feeds/sharedother/x", false),
        ];
        for (namespace, topic, allowed) in table {
            let refused = scope.check("f", namespace, topic);
            assert_eq!(
                refused.is_none(),
                allowed,
                "{namespace} {topic}: {refused:?}"
            );
        }
    }

    #[test]
    fn json_pointer_rules() {
        assert!(check_json_pointer("p", "/a/b~1c").is_none());
        assert!(check_json_pointer("p", "/a~2").is_some());
        assert!(check_json_pointer("p", "a").is_some());
    }
}
