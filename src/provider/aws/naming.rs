//! Names derived from a Thing and the least-privilege policy document. Pure functions.

use serde_json::{Value, json};

use crate::api::validation::render_policy_template;

/// Root of the MQTT topic tree of the REST message broker; a Thing owns `things/<ns>/<name>/#`.
pub const TOPIC_ROOT: &str = "things";

/// The policy of one Thing. Policy names allow `[\w+=,.@-]` but not `:`, which thing names may
/// hold; thing names never hold `.`, so mapping `:` to `.` keeps names distinct.
pub fn policy_name(thing_name: &str) -> String {
    let mapped = thing_name.replace(':', ".");
    let full = format!("{mapped}-policy");
    if full.len() <= 128 {
        return full;
    }
    use sha2::{Digest, Sha256};
    let digest = hex::encode(Sha256::digest(full.as_bytes()));
    format!("{}-{}", &mapped[..110], &digest[..10])
}

/// The device's MQTT topic prefix (no trailing slash); with a cluster id, under it, so devices
/// of two clusters sharing an account never share topics.
pub fn topic_prefix(cluster_id: Option<&str>, namespace: &str, name: &str) -> String {
    match cluster_id {
        Some(cluster) => format!("{TOPIC_ROOT}/{cluster}/{namespace}/{name}"),
        None => format!("{TOPIC_ROOT}/{namespace}/{name}"),
    }
}

/// Partition, region and account parsed from an ARN like `arn:aws:iot:us-east-1:123:thing/x`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArnParts {
    pub partition: String,
    pub region: String,
    pub account: String,
}

pub fn parse_arn(arn: &str) -> Option<ArnParts> {
    let mut it = arn.splitn(6, ':');
    let (_, partition, _service, region, account) =
        (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    Some(ArnParts {
        partition: partition.into(),
        region: region.into(),
        account: account.into(),
    })
}

/// What a policy is rendered from.
pub struct PolicyVars<'a> {
    pub thing_name: &'a str,
    pub client_id: &'a str,
    pub topic_prefix: &'a str,
    pub arn: &'a ArnParts,
}

/// The default policy: connect only as its own client id; publish, receive and subscribe only
/// on its own topic tree and its own shadow topics.
pub fn default_policy(v: &PolicyVars<'_>) -> Value {
    let base = format!(
        "arn:{}:iot:{}:{}",
        v.arn.partition, v.arn.region, v.arn.account
    );
    let topics = [
        format!("{base}:topic/{}/*", v.topic_prefix),
        format!("{base}:topic/$aws/things/{}/shadow/*", v.thing_name),
    ];
    let filters = [
        format!("{base}:topicfilter/{}/*", v.topic_prefix),
        format!("{base}:topicfilter/$aws/things/{}/shadow/*", v.thing_name),
    ];
    json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("{base}:client/{}", v.client_id)},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": topics},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": filters},
        ]
    })
}

/// Renders the policy document: the user's template when given (validated by the controller
/// before any call), else the default.
pub fn render_policy(template: Option<&str>, v: &PolicyVars<'_>) -> Result<Value, String> {
    match template {
        None => Ok(default_policy(v)),
        Some(t) => {
            let rendered = render_policy_template(
                t,
                &[
                    ("thingName", v.thing_name),
                    ("clientId", v.client_id),
                    ("topicPrefix", v.topic_prefix),
                    ("region", &v.arn.region),
                    ("account", &v.arn.account),
                ],
            );
            serde_json::from_str(&rendered)
                .map_err(|e| format!("policy.template does not render to JSON: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arn() -> ArnParts {
        parse_arn("arn:aws:iot:us-east-1:123456789012:thing/ns_a").unwrap()
    }

    #[test]
    fn policy_names_are_valid_and_distinct() {
        assert_eq!(policy_name("ns_a:b"), "ns_a.b-policy");
        assert_ne!(policy_name("ns_a:b"), policy_name("ns_a-b"));
        let long = "x".repeat(128);
        let n = policy_name(&long);
        assert!(n.len() <= 128);
        assert!(
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        );
    }

    #[test]
    fn default_policy_is_scoped_to_the_thing() {
        let a = arn();
        assert_eq!(a.account, "123456789012");
        let v = PolicyVars {
            thing_name: "ns_a",
            client_id: "ns_a",
            topic_prefix: "things/ns/a",
            arn: &a,
        };
        let doc = default_policy(&v).to_string();
        assert!(doc.contains("arn:aws:iot:us-east-1:123456789012:client/ns_a"));
        assert!(doc.contains("topic/things/ns/a/*"));
        assert!(doc.contains("topicfilter/$aws/things/ns_a/shadow/*"));
        assert!(!doc.contains("\"*\""), "no wildcard resource: {doc}");
    }

    #[test]
    fn template_placeholders_are_filled() {
        let a = arn();
        let v = PolicyVars {
            thing_name: "t",
            client_id: "c",
            topic_prefix: "p",
            arn: &a,
        };
        let t = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:${region}:${account}:client/${clientId}"}]}"#;
        let doc = render_policy(Some(t), &v).unwrap().to_string();
        assert!(doc.contains("arn:aws:iot:us-east-1:123456789012:client/c"));
    }
}
