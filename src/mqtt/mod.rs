//! The MQTT connection the operator keeps to the broker, shared by the Mosquitto backend, the
//! Observer/Subscriber tasks and the REST message broker (none of them owns it).
//!
//! `identity` is the seam through which a namespace's Observers and Subscribers get a broker
//! account of their own. `topic` is the pure layout of the topic space (Thing URL <-> topic, shadow topics).

pub mod connection;
pub mod identity;
pub mod topic;

pub use topic::{ShadowOp, ThingTopic, TopicError, TopicLayout};
