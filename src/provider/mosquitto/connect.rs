//! The operator's own session on the broker: the MQTT connection (admin credentials,
//! reconnecting forever), the shadow service on it, and, on every connect, the grant of the
//! operator's own publish ACLs and its `online` announcement.

use std::{sync::Arc, time::Duration};

use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;

use super::{
    MosquittoConfig, MosquittoProvider,
    dynsec::{Acl, Dynsec, DynsecError},
    naming::SERVICE_ROLE,
    registry::SharedRegistry,
    service::Service,
};
use crate::{
    feed::StateFeed,
    metrics::Metrics,
    mqtt::connection::{self, ConfigError, ConnectionSettings},
};

const DYNSEC_TIMEOUT: Duration = Duration::from_secs(10);

impl MosquittoProvider {
    /// Connects to the broker (in the background; reconnecting forever) and starts the
    /// shadow service.
    pub fn start(
        config: MosquittoConfig,
        feed: Arc<dyn StateFeed>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ConfigError> {
        let tls = if config.address.tls {
            Some(connection::tls_config(config.ca_file.as_deref())?)
        } else {
            None
        };
        let ca_pem =
            match &config.ca_file {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    ConfigError::File(p.display().to_string(), e.kind().to_string())
                })?),
                None => None,
            };
        let status_topic = config.layout.operator_status_topic();
        let (client, eventloop) = connection::build(ConnectionSettings {
            address: config.address.clone(),
            tls,
            username: config.username.clone(),
            password: config.password.clone(),
            // Unique per process: two operators sharing the admin account must not kick each
            // other off the broker.
            client_id: format!(
                "thing-operator-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ),
            last_will: Some((status_topic.clone(), b"offline".to_vec())),
            session: Default::default(),
            keep_alive: None,
        });
        let dynsec = Arc::new(Dynsec::new(client.clone(), DYNSEC_TIMEOUT));
        let registry = SharedRegistry::default();

        let on_connect = {
            let (dynsec, client, username, feed) = (
                dynsec.clone(),
                client.clone(),
                config.username.clone(),
                feed.clone(),
            );
            move || {
                feed.broker_online(false);
                let (dynsec, client, username, status_topic, feed) = (
                    dynsec.clone(),
                    client.clone(),
                    username.clone(),
                    status_topic.clone(),
                    feed.clone(),
                );
                tokio::spawn(async move {
                    match grant_operator_acls(&dynsec, &username).await {
                        Ok(()) => {
                            feed.broker_online(true);
                            let _ = client
                                .publish(status_topic, QoS::AtLeastOnce, true, b"online".to_vec())
                                .await;
                        }
                        // After a first-time grant the plugin disconnects us; the reconnect
                        // runs this again and finds the role in place.
                        Err(e) => {
                            tracing::info!(error = %e, "operator ACLs not confirmed yet; retrying on reconnect")
                        }
                    }
                });
            }
        };
        let service = Arc::new(Service {
            layout: config.layout.clone(),
            limits: config.limits,
            status_interval: config.status_interval,
            registry: registry.clone(),
            feed: feed.clone(),
            dynsec: dynsec.clone(),
            on_connect: Box::new(on_connect),
            active: Default::default(),
            client: client.clone(),
        });
        connection::spawn_driver(
            eventloop,
            client.clone(),
            service.clone(),
            metrics.mqtt_connection("backend"),
            CancellationToken::new(),
        );
        Ok(Self {
            config,
            client,
            dynsec,
            service,
            registry,
            feed,
            metrics,
            ca_pem,
        })
    }

    /// The operator's connection to the broker, for the REST broker's state publisher.
    pub fn mqtt_client(&self) -> AsyncClient {
        self.client.clone()
    }

    /// Issues the broker accounts namespaces' Observers and Subscribers act with.
    pub fn namespace_accounts(
        &self,
        cluster_id: Option<String>,
    ) -> std::sync::Arc<dyn crate::mqtt::identity::NamespaceIdentities> {
        std::sync::Arc::new(super::namespace_accounts::NamespaceAccounts::new(
            self.dynsec.clone(),
            cluster_id,
        ))
    }
}

/// Makes sure the operator may publish on its topic trees (the admin account `dynsec init`
/// makes can only subscribe). One fixed role for every operator sharing the account (see
/// [`SERVICE_ROLE`]). It adds no privilege: this account administers the broker.
async fn grant_operator_acls(dynsec: &Dynsec, username: &str) -> Result<(), DynsecError> {
    let acls = [
        Acl::allow("publishClientSend", "#"),
        Acl::allow("publishClientSend", "$aws/things/#"),
        Acl::allow("subscribePattern", "$aws/things/#"),
    ];
    // Shared by every operator on the broker, whatever its cluster: no owner mark.
    dynsec.ensure_role(SERVICE_ROLE, &acls, None).await?;
    dynsec.ensure_client_role(username, SERVICE_ROLE).await
}
