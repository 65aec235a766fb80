//! The REST message broker: every Thing's Kubernetes URL is also an MQTT topic tree.
//!
//! `topic` is the pure mapping between the two (no I/O, heavily unit-tested); `publisher`
//! publishes each Thing's state, retained, under its topic, for any backend.

pub mod publisher;
pub mod topic;

pub use publisher::StatePublisher;
pub use topic::{ShadowOp, ThingTopic, TopicError, TopicLayout};
