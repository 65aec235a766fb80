//! Thing URL <-> MQTT topic mapping. Pure functions, no I/O.
//!
//! A Thing's Kubernetes URL is
//! `/apis/iot.thing-operator.dev/v1alpha1/namespaces/{ns}/things/{name}`; its topic tree is the
//! same resource path under a configurable prefix, without the constant group/version part:
//! `{prefix}/namespaces/{ns}/things/{name}`. Under it:
//!
//! - `…/state`: the Thing's state document, retained, published by the operator for any backend;
//! - `…/shadow/update`, `…/shadow/get` and their `/accepted`, `/rejected`, `/delta`,
//!   `/documents` replies: the shadow service, in the AWS IoT shadow layout.
//!
//! Devices written for AWS IoT also find the shadow at `$aws/things/{thingName}/shadow/…`.
//!
//! Safety: MQTT gives `+`, `#` and `/` meaning, and an empty level (`a//b`) is a distinct
//! topic. Every segment placed into a topic is therefore checked against the Kubernetes name
//! grammar (lowercase alphanumerics, `-`, `.`), which contains none of them; anything else is
//! refused, never escaped, so one topic can only ever belong to one Thing and a role's ACL
//! built from it can never match another Thing's topics.

use std::fmt;

/// Why a topic could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic prefix {0:?} is invalid: {1}")]
    Prefix(String, &'static str),
    #[error("{what} {value:?} cannot be part of a topic: {why}")]
    Segment {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// Longest prefix accepted; MQTT allows 65535 bytes per topic, ACL tables like them short.
const MAX_PREFIX: usize = 200;
/// Kubernetes names are at most 253 characters (namespaces 63).
const MAX_NAME: usize = 253;
/// AWS IoT thing names are at most 128 characters.
const MAX_THING_NAME: usize = 128;

/// The shadow requests a device can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowOp {
    Update,
    Get,
}

impl ShadowOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowOp::Update => "update",
            ShadowOp::Get => "get",
        }
    }
}

/// Replies the shadow service publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowReply {
    Accepted,
    Rejected,
    /// Only after `update`.
    Delta,
    /// Only after `update`.
    Documents,
}

impl ShadowReply {
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowReply::Accepted => "accepted",
            ShadowReply::Rejected => "rejected",
            ShadowReply::Delta => "delta",
            ShadowReply::Documents => "documents",
        }
    }
}

/// Which Thing a shadow request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShadowTarget {
    /// `{prefix}/namespaces/{ns}/things/{name}/shadow/…`
    Path { namespace: String, name: String },
    /// `$aws/things/{thingName}/shadow/…`
    AwsName(String),
}

/// A parsed shadow request topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowRequest {
    pub target: ShadowTarget,
    pub op: ShadowOp,
    /// The topic the request came in on, without the op: replies go under it, so a device
    /// gets its answers on the layout it used.
    pub shadow_root: String,
}

impl ShadowRequest {
    pub fn reply_topic(&self, reply: ShadowReply) -> String {
        format!(
            "{}/{}/{}",
            self.shadow_root,
            self.op.as_str(),
            reply.as_str()
        )
    }
}

/// Checks a Kubernetes namespace or object name for use as one topic level.
fn check_k8s_segment(what: &'static str, value: &str) -> Result<(), TopicError> {
    let err = |why| {
        Err(TopicError::Segment {
            what,
            value: value.to_string(),
            why,
        })
    };
    if value.is_empty() {
        return err("empty level");
    }
    if value.len() > MAX_NAME {
        return err("too long");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    Ok(())
}

/// Checks a backend thing name (`spec.thingName` or derived) for `$aws/things/{name}`.
pub fn check_thing_name(value: &str) -> Result<(), TopicError> {
    let err = |why| {
        Err(TopicError::Segment {
            what: "thing name",
            value: value.to_string(),
            why,
        })
    };
    if value.is_empty() {
        return err("empty level");
    }
    if value.len() > MAX_THING_NAME {
        return err("too long");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
    {
        return err("only letters, digits, ':', '_' and '-' are allowed");
    }
    Ok(())
}

/// Under a Thing's topic: where MQTT clients publish JSON merge patches of its desired state.
pub const DESIRED_PATCH: &str = "desired/patch";

/// The validated topic prefix and everything built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    prefix: String,
}

impl TopicLayout {
    pub fn new(prefix: &str) -> Result<Self, TopicError> {
        let err = |why| Err(TopicError::Prefix(prefix.to_string(), why));
        if prefix.is_empty() {
            return err("empty");
        }
        if prefix.len() > MAX_PREFIX {
            return err("too long");
        }
        if prefix.starts_with('$') {
            // `$` topics are the broker's own ($SYS, $CONTROL) or the AWS alias.
            return err("must not start with '$'");
        }
        if prefix.split('/').any(str::is_empty) {
            return err("empty level (leading, trailing or double '/')");
        }
        if prefix.contains(['+', '#', '\0']) {
            return err("must not contain '+', '#' or NUL");
        }
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic tree of one Thing.
    pub fn thing(&self, namespace: &str, name: &str) -> Result<ThingTopic, TopicError> {
        check_k8s_segment("namespace", namespace)?;
        check_k8s_segment("name", name)?;
        Ok(ThingTopic {
            base: format!("{}/namespaces/{namespace}/things/{name}", self.prefix),
        })
    }

    /// The Thing a Kubernetes URL path names (`/apis/<group>/<version>/namespaces/{ns}/things/{name}`
    /// or the short `/namespaces/{ns}/things/{name}`).
    pub fn thing_for_url(&self, path: &str) -> Result<ThingTopic, TopicError> {
        let bad = |why| TopicError::Segment {
            what: "URL",
            value: path.to_string(),
            why,
        };
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| bad("not an absolute path"))?;
        let rest = match rest.strip_prefix("apis/") {
            Some(r) => {
                let r = r
                    .strip_prefix(crate::api::GROUP)
                    .ok_or_else(|| bad("not a Thing URL"))?;
                let r = r.strip_prefix('/').ok_or_else(|| bad("not a Thing URL"))?;
                let r = r
                    .strip_prefix(crate::api::VERSION)
                    .ok_or_else(|| bad("unknown version"))?;
                r.strip_prefix('/').ok_or_else(|| bad("not a Thing URL"))?
            }
            None => rest,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["namespaces", ns, "things", name] => self.thing(ns, name),
            _ => Err(bad("not a Thing URL")),
        }
    }

    /// The Kubernetes URL of the Thing a topic belongs to, if it is one of ours.
    pub fn url_for_topic(&self, topic: &str) -> Option<String> {
        let (ns, name, _) = self.parse_thing_topic(topic)?;
        Some(format!(
            "/apis/{}/{}/namespaces/{ns}/things/{name}",
            crate::api::GROUP,
            crate::api::VERSION
        ))
    }

    /// Splits `{prefix}/namespaces/{ns}/things/{name}[/rest]` into its parts; `None` for any
    /// topic that is not exactly that shape with valid names.
    pub fn parse_thing_topic<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str, &'t str)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/namespaces/")?;
        let (ns, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix("things/")?;
        let (name, rest) = match rest.split_once('/') {
            Some((name, rest)) => (name, rest),
            None => (rest, ""),
        };
        check_k8s_segment("namespace", ns).ok()?;
        check_k8s_segment("name", name).ok()?;
        Some((ns, name, rest))
    }

    /// The filter of every Thing's desired-state patch topic (`…/desired/patch`), the REST
    /// message broker's inbound direction.
    pub fn desired_patch_filter(&self) -> String {
        format!("{}/namespaces/+/things/+/{DESIRED_PATCH}", self.prefix)
    }

    /// The Thing a desired-state patch topic names: `(namespace, name)`.
    pub fn parse_desired_patch<'t>(&self, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let (ns, name, rest) = self.parse_thing_topic(topic)?;
        (rest == DESIRED_PATCH).then_some((ns, name))
    }

    /// Topic filters the shadow service subscribes to.
    pub fn service_filters(&self) -> Vec<String> {
        let mut filters = Vec::new();
        for op in [ShadowOp::Update, ShadowOp::Get] {
            filters.push(format!(
                "{}/namespaces/+/things/+/shadow/{}",
                self.prefix,
                op.as_str()
            ));
            filters.push(format!("$aws/things/+/shadow/{}", op.as_str()));
        }
        filters
    }

    /// Parses a shadow request topic (what [`Self::service_filters`] delivers).
    pub fn parse_shadow_request(&self, topic: &str) -> Option<ShadowRequest> {
        let parse_op = |s: &str| match s {
            "update" => Some(ShadowOp::Update),
            "get" => Some(ShadowOp::Get),
            _ => None,
        };
        if let Some(rest) = topic.strip_prefix("$aws/things/") {
            let (name, rest) = rest.split_once('/')?;
            let op = parse_op(rest.strip_prefix("shadow/")?)?;
            check_thing_name(name).ok()?;
            return Some(ShadowRequest {
                target: ShadowTarget::AwsName(name.to_string()),
                op,
                shadow_root: format!("$aws/things/{name}/shadow"),
            });
        }
        let (ns, name, rest) = self.parse_thing_topic(topic)?;
        let op = parse_op(rest.strip_prefix("shadow/")?)?;
        Some(ShadowRequest {
            target: ShadowTarget::Path {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            op,
            shadow_root: format!("{}/namespaces/{ns}/things/{name}/shadow", self.prefix),
        })
    }

    /// Where the operator announces itself (`online`/`offline`, retained, with a last will):
    /// devices can wait for it before trusting that their reports are heard.
    pub fn operator_status_topic(&self) -> String {
        // `_` never occurs in a namespace, so this cannot collide with a Thing's tree.
        format!("{}/_operator/status", self.prefix)
    }
}

/// One Thing's topic tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThingTopic {
    base: String,
}

impl ThingTopic {
    /// The root of the tree (no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Retained state document.
    pub fn state(&self) -> String {
        format!("{}/state", self.base)
    }

    pub fn shadow_root(&self) -> String {
        format!("{}/shadow", self.base)
    }

    /// Everything under the Thing's tree, for ACLs.
    pub fn all(&self) -> String {
        format!("{}/#", self.base)
    }
}

impl fmt::Display for ThingTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// The AWS-compatible shadow root of a backend thing name.
pub fn aws_shadow_root(thing_name: &str) -> Result<String, TopicError> {
    check_thing_name(thing_name)?;
    Ok(format!("$aws/things/{thing_name}/shadow"))
}

/// MQTT topic-filter matching (`+` one level, `#` the rest), as the broker does it; used to
/// prove in tests that no ACL of one Thing matches another Thing's topics.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    // A wildcard at the first level never matches `$` topics (MQTT 3.1.1, 4.7.2).
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> TopicLayout {
        TopicLayout::new("things").unwrap()
    }

    #[test]
    fn thing_topic_is_the_resource_path_under_the_prefix() {
        let t = layout().thing("prod", "dev1").unwrap();
        assert_eq!(t.base(), "things/namespaces/prod/things/dev1");
        assert_eq!(t.state(), "things/namespaces/prod/things/dev1/state");
        assert_eq!(t.all(), "things/namespaces/prod/things/dev1/#");
        let nested = TopicLayout::new("site/a/k8s")
            .unwrap()
            .thing("ns", "a.b-c")
            .unwrap();
        assert_eq!(nested.base(), "site/a/k8s/namespaces/ns/things/a.b-c");
    }

    #[test]
    fn prefix_rejects_wildcards_empty_levels_and_dollar() {
        for bad in [
            "", "/things", "things/", "a//b", "a/+/b", "a/#", "#", "+", "$aws", "$SYS/x", "a\0b",
        ] {
            assert!(TopicLayout::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(TopicLayout::new(&"x".repeat(MAX_PREFIX + 1)).is_err());
        for good in ["things", "a/b/c", "Things-1", "a.b"] {
            assert!(TopicLayout::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn segments_reject_wildcards_slashes_and_empty() {
        let l = layout();
        for bad in [
            "", "a/b", "a+", "#", "+", "a#b", "A", "a b", "a\0", "$x", "ä",
        ] {
            assert!(l.thing(bad, "dev").is_err(), "namespace {bad:?} accepted");
            assert!(l.thing("ns", bad).is_err(), "name {bad:?} accepted");
        }
        assert!(l.thing("ns", &"a".repeat(254)).is_err());
        assert!(l.thing("ns", &"a".repeat(253)).is_ok());
    }

    #[test]
    fn thing_names_for_the_aws_alias_are_checked() {
        assert_eq!(
            aws_shadow_root("ns_dev:1").unwrap(),
            "$aws/things/ns_dev:1/shadow"
        );
        for bad in ["", "a/b", "a+b", "a#", "a b", &"x".repeat(129)] {
            assert!(aws_shadow_root(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn url_and_topic_round_trip() {
        let l = layout();
        let url = "/apis/iot.thing-operator.dev/v1alpha1/namespaces/prod/things/dev1";
        let t = l.thing_for_url(url).unwrap();
        assert_eq!(t.base(), "things/namespaces/prod/things/dev1");
        assert_eq!(l.url_for_topic(t.base()).as_deref(), Some(url));
        assert_eq!(l.url_for_topic(&t.state()).as_deref(), Some(url));
        assert_eq!(l.thing_for_url("/namespaces/prod/things/dev1").unwrap(), t);
        for bad in [
            "namespaces/prod/things/dev1",
            "/apis/other.group/v1alpha1/namespaces/prod/things/dev1",
            "/apis/iot.thing-operator.dev/v2/namespaces/prod/things/dev1",
            "/namespaces/prod/observers/dev1",
            "/namespaces/prod/things/dev1/extra",
            "/namespaces//things/dev1",
            "/namespaces/prod/things/",
            "/namespaces/pr+od/things/dev1",
        ] {
            assert!(l.thing_for_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parse_thing_topic_is_strict() {
        let l = layout();
        assert_eq!(
            l.parse_thing_topic("things/namespaces/ns/things/d/shadow/update"),
            Some(("ns", "d", "shadow/update"))
        );
        assert_eq!(
            l.parse_thing_topic("things/namespaces/ns/things/d"),
            Some(("ns", "d", ""))
        );
        for bad in [
            "things/namespaces//things/d",
            "things/namespaces/ns/things/",
            "things/namespaces/ns/things//shadow/update",
            "things/namespaces/+/things/d",
            "things/namespaces/ns/things/#",
            "thingsX/namespaces/ns/things/d",
            "other/namespaces/ns/things/d",
            "things/namespaces/ns/observers/d",
        ] {
            assert_eq!(l.parse_thing_topic(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn shadow_requests_parse_in_both_layouts() {
        let l = layout();
        let r = l
            .parse_shadow_request("things/namespaces/ns/things/d/shadow/update")
            .unwrap();
        assert_eq!(
            r.target,
            ShadowTarget::Path {
                namespace: "ns".into(),
                name: "d".into()
            }
        );
        assert_eq!(r.op, ShadowOp::Update);
        assert_eq!(
            r.reply_topic(ShadowReply::Accepted),
            "things/namespaces/ns/things/d/shadow/update/accepted"
        );
        let r = l
            .parse_shadow_request("$aws/things/ns_d/shadow/get")
            .unwrap();
        assert_eq!(r.target, ShadowTarget::AwsName("ns_d".into()));
        assert_eq!(
            r.reply_topic(ShadowReply::Rejected),
            "$aws/things/ns_d/shadow/get/rejected"
        );
        for bad in [
            "$aws/things/ns_d/shadow/update/accepted",
            "$aws/things//shadow/update",
            "$aws/things/a/b/shadow/update",
            "$aws/things/ns_d/shadow/delete",
            "things/namespaces/ns/things/d/shadow/update/accepted",
            "things/namespaces/ns/things/d/state",
        ] {
            assert_eq!(l.parse_shadow_request(bad), None, "{bad:?} parsed");
        }
    }

    #[test]
    fn service_filters_deliver_exactly_the_requests() {
        let l = layout();
        let filters = l.service_filters();
        let matches = |t: &str| filters.iter().any(|f| filter_matches(f, t));
        assert!(matches("things/namespaces/ns/things/d/shadow/update"));
        assert!(matches("$aws/things/x/shadow/get"));
        assert!(!matches(
            "things/namespaces/ns/things/d/shadow/update/accepted"
        ));
        assert!(!matches("things/namespaces/ns/things/d/state"));
    }

    #[test]
    fn no_thing_tree_matches_another_thing() {
        let l = layout();
        let names = ["a", "ab", "a.b", "a-b", "b"];
        for ns1 in ["n", "n2"] {
            for n1 in names {
                let acl = l.thing(ns1, n1).unwrap().all();
                for ns2 in ["n", "n2"] {
                    for n2 in names {
                        let other = l.thing(ns2, n2).unwrap();
                        let same = ns1 == ns2 && n1 == n2;
                        assert_eq!(
                            filter_matches(&acl, &other.state()),
                            same,
                            "{acl} vs {}",
                            other.state()
                        );
                        assert_eq!(filter_matches(&acl, other.base()), same);
                    }
                }
            }
        }
    }

    #[test]
    fn filter_matching_follows_mqtt() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+/c", "a/b/d/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches(
            "$aws/things/+/shadow/update",
            "$aws/things/x/shadow/update"
        ));
        assert!(!filter_matches("a/b", "a/b/"));
    }
}
