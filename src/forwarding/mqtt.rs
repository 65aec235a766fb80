//! The MQTT access of Observer and Subscriber tasks: which client acts for a namespace, and the
//! QoS a spec's level means.
//!
//! Today every namespace shares the operator's one events connection (its own client id, so a
//! slow sink never stalls the shadow service). Giving each namespace a broker identity whose
//! ACL covers only its own topics (issue 8) changes [`MqttAccess::client_for`], not the tasks.

use rumqttc::{AsyncClient, QoS};

/// The MQTT clients the forwarding tasks may use; empty without a configured broker.
#[derive(Clone, Default)]
pub struct MqttAccess {
    shared: Option<AsyncClient>,
}

impl MqttAccess {
    /// Every namespace acts through `client` (or nobody has MQTT, with `None`).
    pub fn shared(client: Option<AsyncClient>) -> Self {
        Self { shared: client }
    }

    /// Whether MQTT sources and sinks can be served at all.
    pub fn is_configured(&self) -> bool {
        self.shared.is_some()
    }

    /// The client that acts for `namespace`'s Observers and Subscribers.
    pub fn client_for(&self, _namespace: &str) -> Option<&AsyncClient> {
        self.shared.as_ref()
    }
}

/// The QoS of a spec's `qos` level; the CRD schema admits only 0 to 2, anything else is taken
/// as the default, 1.
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}
