//! Which BrokerConnection may use a client id on a broker. An MQTT broker gives a client id to
//! one connection at a time: a second connection under the same id takes the session over,
//! with whatever the broker kept in it for the first. Two BrokerConnections of this cluster
//! naming the same broker and client id (two tenants, or one by mistake) would take it from
//! each other forever, and the taker would receive the other's messages: through the
//! operator, a tenant could reach a session its own pods cannot. So the oldest
//! BrokerConnection (by creation time, then namespace/name) holds the pair; a newer one is
//! refused until the pair is free. Derived client ids cannot be claimed from another
//! namespace at all (validation reserves `thing-operator.<namespace>.` to that namespace).
//!
//! The broker is named by the URL's host and port: two names (or a name and an address) of
//! one broker are not recognised as the same broker.

use std::sync::OnceLock;

use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};

use crate::{
    api::{BrokerConnection, validation::validate_broker_connection},
    mqtt::connection::BrokerAddress,
};

/// The BrokerConnections of the cluster, as the controller's cache holds them.
#[derive(Default)]
pub struct ClientIdClaims {
    objects: OnceLock<Store<BrokerConnection>>,
}

/// The session a BrokerConnection asks a broker for: broker host (lower case), port, client id.
type SessionIdentity = (String, u16, String);

fn identity(connection: &BrokerConnection) -> Option<SessionIdentity> {
    let address = BrokerAddress::parse(&connection.spec.url).ok()?;
    let namespace = connection.namespace()?;
    Some((
        address.host.to_ascii_lowercase(),
        address.port,
        connection.client_id(&namespace, &connection.name_any()),
    ))
}

/// Older first: creation time, then `namespace/name`.
fn seniority(
    connection: &BrokerConnection,
) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        connection.creation_timestamp().map(|t| t.0),
        connection.namespace().unwrap_or_default(),
        connection.name_any(),
    )
}

/// What [`ClientIdClaims::check`] found.
#[derive(Debug, Default, PartialEq)]
pub struct ClaimCheck {
    /// An older BrokerConnection holds the pair: this one must not connect.
    pub held_by_older: bool,
    /// Newer BrokerConnections naming the same pair (they must stop: told to reconcile).
    pub newer: Vec<ObjectRef<BrokerConnection>>,
}

impl ClientIdClaims {
    /// Installs the controller's cache (once, when the controllers start).
    pub fn install(&self, objects: Store<BrokerConnection>) {
        let _ = self.objects.set(objects);
    }

    /// Who else asks for `connection`'s broker and client id. Waits until the cache has listed
    /// every BrokerConnection (a newer one reconciled first after a restart must not connect
    /// for the moment the older one is not yet known). Without a cache (tests of one object):
    /// nobody.
    pub async fn check(&self, connection: &BrokerConnection) -> ClaimCheck {
        let (Some(objects), Some(mine)) = (self.objects.get(), identity(connection)) else {
            return ClaimCheck::default();
        };
        if objects.wait_until_ready().await.is_err() {
            return ClaimCheck::default();
        }
        Self::compare(objects, connection, &mine)
    }

    /// The newer BrokerConnections waiting for `connection`'s pair, from the cache as it is
    /// (for one that goes: they may connect now).
    pub fn waiting_behind(
        &self,
        connection: &BrokerConnection,
    ) -> Vec<ObjectRef<BrokerConnection>> {
        match (self.objects.get(), identity(connection)) {
            (Some(objects), Some(mine)) => Self::compare(objects, connection, &mine).newer,
            _ => Vec::new(),
        }
    }

    fn compare(
        objects: &Store<BrokerConnection>,
        connection: &BrokerConnection,
        mine: &SessionIdentity,
    ) -> ClaimCheck {
        let my_seniority = seniority(connection);
        let mut check = ClaimCheck::default();
        for other in objects.state() {
            // One going away, or one whose spec cannot be served, connects nowhere.
            if other.uid() == connection.uid()
                || other.metadata.deletion_timestamp.is_some()
                || validate_broker_connection(&other).is_err()
                || identity(&other).as_ref() != Some(mine)
            {
                continue;
            }
            if seniority(&other) < my_seniority {
                check.held_by_older = true;
            } else {
                check.newer.push(ObjectRef::from_obj(other.as_ref()));
            }
        }
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};
    use serde_json::json;

    fn connection(
        ns: &str,
        name: &str,
        created: &str,
        spec: serde_json::Value,
    ) -> BrokerConnection {
        serde_json::from_value(json!({
            "apiVersion": "iot.thing-operator.dev/v1alpha1",
            "kind": "BrokerConnection",
            "metadata": {"namespace": ns, "name": name, "uid": format!("{ns}-{name}"),
                         "creationTimestamp": created},
            "spec": spec,
        }))
        .expect("a BrokerConnection")
    }

    #[tokio::test]
    async fn the_oldest_holds_a_client_id_on_a_broker() {
        let older = connection(
            "team-a",
            "hub",
            "2026-01-01T00:00:00Z",
            json!({"url": "mqtt://Broker.example:1883", "clientId": "shared"}),
        );
        let newer = connection(
            "team-b",
            "grab",
            "2026-02-01T00:00:00Z",
            json!({"url": "mqtt://broker.example", "clientId": "shared"}),
        );
        let elsewhere = connection(
            "team-c",
            "other",
            "2025-01-01T00:00:00Z",
            json!({"url": "mqtt://broker.example:1884", "clientId": "shared"}),
        );
        let derived = connection(
            "team-d",
            "hub",
            "2025-01-01T00:00:00Z",
            json!({"url": "mqtt://broker.example"}),
        );
        // Older, but its spec is refused (keepAliveSeconds): it holds nothing.
        let invalid = connection(
            "team-e",
            "broken",
            "2024-01-01T00:00:00Z",
            json!({"url": "mqtt://broker.example", "clientId": "shared", "keepAliveSeconds": 1}),
        );
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for c in [&older, &newer, &elsewhere, &derived, &invalid] {
            writer.apply_watcher_event(&watcher::Event::InitApply(c.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let claims = ClientIdClaims::default();
        claims.install(store);

        let check = claims.check(&newer).await;
        assert!(
            check.held_by_older,
            "the same host (any case) and default port"
        );
        assert!(check.newer.is_empty());

        let check = claims.check(&older).await;
        assert!(!check.held_by_older);
        assert_eq!(check.newer, vec![ObjectRef::from_obj(&newer)]);

        // Another port, or another client id, is another session.
        assert_eq!(claims.check(&elsewhere).await, ClaimCheck::default());
        assert_eq!(claims.check(&derived).await, ClaimCheck::default());
    }
}
