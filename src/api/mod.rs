//! Custom resource types. Pure data and pure validation: nothing in here does I/O.

pub mod conditions;
pub mod json;
pub mod observer;
pub mod subscriber;
pub mod thing;
pub mod update;
pub mod validation;

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

/// Every CRD this operator owns, in the order they are printed by `thing-operator crds`.
pub fn all_crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![Thing::crd(), Observer::crd(), Subscriber::crd()]
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
