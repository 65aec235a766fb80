//! Custom resource types. Pure data and pure validation: nothing in here does I/O.

pub mod broker_connection;
pub mod conditions;
pub mod filter_expression;
pub mod json;
pub mod observer;
pub mod subscriber;
pub mod thing;
pub mod update;
pub mod validation;

pub use broker_connection::{BrokerConnection, BrokerConnectionSpec, BrokerConnectionStatus};
pub use conditions::{Condition, ConditionStatus};
pub use json::JsonObject;
pub use observer::{Observer, ObserverSpec, ObserverStatus};
pub use subscriber::{Subscriber, SubscriberSpec, SubscriberStatus};
pub use thing::{Thing, ThingSpec, ThingStatus};
pub use update::ThingUpdate;

/// The API group of every kind this operator serves.
pub const GROUP: &str = "iot.thing-operator.dev";
/// The one served version.
pub const VERSION: &str = "v1alpha1";
/// Finalizer put on every object whose deletion needs work from the operator.
pub const FINALIZER: &str = "iot.thing-operator.dev/cleanup";

/// `namespace/name`: the one way the operator keys and names an object in its maps and logs (the
/// form `kubectl` and kube's `ObjectRef` print), so a key built in one module finds the entry
/// another module made.
pub fn object_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The Kubernetes path of a Thing. It is the Thing's REST identity: the `url` of its state
/// document, the `source` of the CloudEvents Observers send, and what its topic tree mirrors.
pub fn thing_url(namespace: &str, name: &str) -> String {
    format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/things/{name}")
}

/// Every CRD this operator owns, in the order they are printed by `thing-operator crds`.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        Thing::crd(),
        Observer::crd(),
        Subscriber::crd(),
        BrokerConnection::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly what `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    render_crds(all_crds())
}

/// The CRDs as the Helm chart ships them: annotated so that `helm uninstall` keeps them (deleting
/// a CRD deletes every Thing, and with it every device).
pub fn helm_crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut crds = all_crds();
    for crd in &mut crds {
        crd.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert("helm.sh/resource-policy".into(), "keep".into());
    }
    render_crds(crds)
}

fn render_crds(
    crds: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thing_url_is_its_kubernetes_path() {
        // The form docs/broker.md documents and clients rely on.
        assert_eq!(
            thing_url("prod", "lamp"),
            "/apis/iot.thing-operator.dev/v1alpha1/namespaces/prod/things/lamp"
        );
        assert_eq!(object_key("prod", "lamp"), "prod/lamp");
    }
}
