//! The REST message broker: every Thing's Kubernetes URL is also an MQTT topic tree.
//!
//! The pure mapping between the two is `crate::mqtt::topic` (shared with the Mosquitto backend
//! and the Observer/Subscriber tasks); `publisher` publishes each Thing's state, retained, under
//! its topic, for any backend; `shadow_update` writes reported state into a Thing through its
//! shadow topic, for Subscribers; `desired_inbound` takes desired-state patches MQTT clients
//! publish under a Thing's topic and writes them into `spec.desired`.

pub mod desired_inbound;
pub mod publisher;
pub mod shadow_update;

pub use publisher::StatePublisher;
pub use shadow_update::ShadowUpdateWriter;
