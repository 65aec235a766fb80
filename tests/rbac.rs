//! The operator runs under deploy/rbac.yaml (the chart's rules) in every integration test; this
//! shows that what those rules leave out is really refused to its service account, not merely
//! unused.

mod common;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, ListParams},
};

fn is_forbidden(result: Result<impl std::fmt::Debug, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test]
async fn the_operator_account_cannot_list_watch_or_delete_secrets() {
    let operator = common::TestEnv::load().operator_client().await;
    let secrets: Api<Secret> = Api::namespaced(operator.clone(), "default");

    assert!(
        is_forbidden(secrets.list(&ListParams::default()).await),
        "list secrets must be refused"
    );
    assert!(
        is_forbidden(
            Api::<Secret>::all(operator)
                .list(&ListParams::default())
                .await
        ),
        "cluster-wide list secrets must be refused"
    );
    assert!(
        is_forbidden(secrets.delete("anything", &DeleteParams::default()).await),
        "delete secrets must be refused"
    );
    // What it is granted still works: a get of a missing Secret is a 404, not a 403.
    match secrets.get("thing-operator-rbac-probe").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("get secret: {other:?}"),
    }
}
