//! Two replicas with leader election: exactly one reconciles; when it dies the standby takes
//! over and finishes the work.

mod common;

use std::time::Duration;

use common::{Setup, thing};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn one_leader_reconciles_and_a_standby_takes_over() {
    let s = Setup::new("leader").await.timeout(WAIT);
    let replica = s.operator().leader_elect(&format!("lease-{}", s.ns));
    let mut a = replica.clone().env("POD_NAME", "replica-a").start();
    let mut b = replica.env("POD_NAME", "replica-b").start();
    // Both are ready (a standby must not block a rolling update); exactly one leads.
    a.wait_ready().await;
    b.wait_ready().await;
    let leader_count = || async {
        a.metric("thing_operator_leader", &[]).await + b.metric("thing_operator_leader", &[]).await
    };
    s.wait_for("a leader", || async {
        (leader_count().await == 1.0).then_some(())
    })
    .await;
    let a_leads = a.metric("thing_operator_leader", &[]).await == 1.0;

    let api = s.things();
    thing("one").broker("Azure").create(&api).await;
    s.wait_condition(&api, "one", "Ready", |_| true).await;
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
    thing("two").broker("Azure").create(&api).await;
    s.wait_condition(&api, "two", "Ready", |_| true).await;
    assert_eq!(survivor.metric("thing_operator_leader", &[]).await, 1.0);
}
