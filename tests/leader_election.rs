//! Two replicas with leader election: exactly one reconciles; when it dies the standby takes
//! over and finishes the work.

mod common;

use std::time::Duration;

use common::{OperatorProcess, TestEnv, create_namespace, delete_namespace, wait_for};
use kube::{Api, api::PostParams};
use serde_json::json;
use thing_operator::api::Thing;

const WAIT: Duration = Duration::from_secs(90);

fn thing(name: &str) -> Thing {
    common::resource("Thing", name, json!({"broker": "Azure"}))
}

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let env = TestEnv::load();
    let client = env.admin_client().await;
    let ns = create_namespace(&client, "leader").await;
    let lease = format!("lease-{ns}");
    let args = [
        "--leader-elect",
        "--lease-name",
        &lease,
        "--lease-duration",
        "4s",
        "--lease-namespace",
        "thing-operator-system",
    ];
    let mut a = OperatorProcess::start(&env, &ns, &args, &[("POD_NAME", "replica-a".to_string())]);
    let mut b = OperatorProcess::start(&env, &ns, &args, &[("POD_NAME", "replica-b".to_string())]);
    // Both are ready (a standby must not block a rolling update); exactly one leads.
    a.wait_ready().await;
    b.wait_ready().await;
    let leader_count = || async {
        a.metric("thing_operator_leader", &[]).await + b.metric("thing_operator_leader", &[]).await
    };
    wait_for("a leader", WAIT, || async {
        (leader_count().await == 1.0).then_some(())
    })
    .await;
    let a_leads = a.metric("thing_operator_leader", &[]).await == 1.0;

    let api: Api<Thing> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &thing("one"))
        .await
        .unwrap();
    common::wait_ready_condition(&api, "one", WAIT).await;
    let standby = if a_leads { &b } else { &a };
    assert_eq!(
        standby.metric("thing_operator_reconciles_total", &[]).await,
        0.0,
        "the standby reconciled"
    );

    // The leader crashes; the standby takes the lease and reconciles new work.
    let (dead, survivor) = if a_leads {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    dead.kill();
    api.create(&PostParams::default(), &thing("two"))
        .await
        .unwrap();
    common::wait_ready_condition(&api, "two", WAIT).await;
    assert_eq!(survivor.metric("thing_operator_leader", &[]).await, 1.0);
    delete_namespace(&client, &ns).await;
}
