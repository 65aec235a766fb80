//! `crds/` must hold exactly what `thing-operator crds` prints.

use std::path::Path;

#[test]
fn crds_directory_is_in_sync_with_the_code() {
    let expected = thing_operator::api::crds_yaml().expect("CRDs serialize");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/crds.yaml");
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} is stale: regenerate with `cargo run -- crds > crds/crds.yaml`",
        path.display()
    );
}

#[test]
fn helm_chart_ships_the_same_crds() {
    let expected = thing_operator::api::helm_crds_yaml().expect("CRDs serialize");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/thing-operator/files/crds.yaml");
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} is stale: regenerate with `cargo run -- crds --helm > charts/thing-operator/files/crds.yaml`",
        path.display()
    );
}

#[test]
fn crds_carry_the_api_users_rely_on() {
    let crds = thing_operator::api::all_crds();
    let names: Vec<_> = crds.iter().map(|c| c.spec.names.kind.clone()).collect();
    assert_eq!(
        names,
        ["Thing", "Observer", "Subscriber", "BrokerConnection"]
    );
    for crd in &crds {
        assert_eq!(crd.spec.group, "iot.thing-operator.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["iot".to_string()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let schema = serde_json::to_value(version.schema.as_ref().unwrap()).unwrap();
        let conditions =
            &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{}",
            crd.spec.names.kind
        );
        assert_eq!(conditions["x-kubernetes-list-map-keys"][0], "type");
    }
    let short: Vec<_> = crds
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap()[0].clone())
        .collect();
    assert_eq!(short, ["th", "obs", "sub", "brokerconn"]);
}
