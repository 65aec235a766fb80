//! Self-hosted Things on Mosquitto 2.x, through its dynamic-security plugin.
//!
//! Each Thing gets one broker client (username = client id = the Thing's backend name, password
//! generated here and kept only in the device Secret) and one role allowing exactly its own
//! topics. The operator itself runs the Thing's shadow on the AWS IoT shadow topic layout, both
//! under the Thing's topic tree and at `$aws/things/{thingName}/shadow/…`.
//!
//! Split by job, as `provider/aws/` is:
//! - [`config`]: the `--mqtt-*` flags and the device CA;
//! - [`connect`]: the operator's own session (connection, shadow service, its ACL grant);
//! - [`seed`]: shadows restored from Thing status at start-up;
//! - [`credentials`]: the device password and certificate, written into the Secret;
//! - [`naming`], [`provision`]: the Thing's role and broker client, over [`dynsec`]
//!   (dynamic-security commands on `$CONTROL/dynamic-security/v1`);
//! - [`reconcile`]: reconcile and cleanup of one Thing;
//! - [`registry`]: the in-memory shadows; [`service`]: device shadow requests and the pacing
//!   of status writes; [`shadow`]: shadow document semantics, pure;
//! - [`namespace_accounts`]: the broker account each namespace's Observers and Subscribers
//!   act with (ACL: that namespace's topic roots only);
//! - [`error`]: [`MosquittoError`] and its classification.

pub mod config;
pub mod connect;
pub mod credentials;
pub mod dynsec;
pub mod error;
pub mod namespace_accounts;
pub mod naming;
pub mod provision;
pub mod reconcile;
pub mod registry;
pub mod seed;
pub mod service;
pub mod shadow;

pub use config::MosquittoConfig;
pub use error::MosquittoError;

use std::sync::Arc;

use rumqttc::AsyncClient;

use self::{dynsec::Dynsec, registry::SharedRegistry, service::Service};
use crate::{feed::StateFeed, metrics::Metrics, mqtt::topic::TopicLayout};

/// The backend label of metrics.
const BACKEND: &str = "mosquitto";

pub struct MosquittoProvider {
    config: MosquittoConfig,
    /// The operator's own MQTT session (see [`connect`]).
    client: AsyncClient,
    dynsec: Arc<Dynsec>,
    service: Arc<Service>,
    registry: SharedRegistry,
    feed: Arc<dyn StateFeed>,
    metrics: Arc<Metrics>,
    /// The broker's CA (`--mqtt-ca-file`), written into every device Secret.
    ca_pem: Option<Vec<u8>>,
}

impl MosquittoProvider {
    pub fn layout(&self) -> &TopicLayout {
        &self.config.layout
    }

    /// Counts one backend call (a whole provisioning or cleanup) by outcome.
    fn count_call<T, E>(&self, operation: &str, result: &Result<T, E>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.count_backend_call(BACKEND, operation, outcome);
    }
}
