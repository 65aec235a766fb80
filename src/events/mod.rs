//! Events brought to Things: the in-memory state stream ([`bus`]), Observer filters
//! ([`filter`]), destinations ([`sink`]) and the tasks that connect them ([`observers`]).

pub mod bus;
pub mod filter;
pub mod observers;
pub mod sink;
pub mod subscribers;

pub use bus::{StateBus, ThingUpdate};
pub use observers::ObserverManager;
pub use subscribers::SubscriberManager;
