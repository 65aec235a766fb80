//! The Mosquitto backend's configuration: the `--mqtt-*` flags, read once at start-up, and the
//! device CA they point to.

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::shadow::Limits;
use crate::{
    config::RunArgs,
    credentials::ca::{CaError, OperatorCa},
    mqtt::{
        connection::{self, BrokerAddress, ConfigError},
        topic::TopicLayout,
    },
};

/// Everything the backend needs from the configuration.
pub struct MosquittoConfig {
    pub address: BrokerAddress,
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: String,
    pub device_endpoint: String,
    pub layout: TopicLayout,
    pub status_interval: Duration,
    pub limits: Limits,
    /// The mTLS listener devices may use with their certificate.
    pub device_tls_endpoint: Option<String>,
    /// Where the device CA lives: (namespace, Secret name).
    pub ca_secret: (String, String),
    /// Loaded by [`MosquittoConfig::load_device_ca`] when `device_tls_endpoint` is set.
    pub device_ca: Option<Arc<OperatorCa>>,
}

impl MosquittoConfig {
    /// `None` when no `--mqtt-url` is set (the backend is off).
    pub fn from_args(args: &RunArgs) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &args.mqtt.url else {
            return Ok(None);
        };
        let address = BrokerAddress::parse(url)?;
        let username = args
            .mqtt
            .username
            .clone()
            .ok_or(ConfigError::Missing("username"))?;
        let password_file = args
            .mqtt
            .password_file
            .as_ref()
            .ok_or(ConfigError::Missing("password-file"))?;
        let password = connection::read_password(password_file)?;
        let layout = TopicLayout::new(&args.mqtt.topic_prefix)
            .map_err(|e| ConfigError::Url(args.mqtt.topic_prefix.clone(), e.to_string()))?;
        Ok(Some(Self {
            device_endpoint: args
                .mqtt
                .device_endpoint
                .clone()
                .unwrap_or_else(|| address.endpoint()),
            address,
            ca_file: args.mqtt.ca_file.clone(),
            username,
            password,
            layout,
            status_interval: args.status_write_interval,
            limits: Limits::default(),
            device_tls_endpoint: args.mqtt.device_tls_endpoint.clone(),
            ca_secret: (args.operator_namespace(), args.mqtt.ca_secret.clone()),
            device_ca: None,
        }))
    }

    /// Loads (or creates) the device CA when devices get certificates.
    pub async fn load_device_ca(&mut self, client: kube::Client) -> Result<(), CaError> {
        if self.device_tls_endpoint.is_some() {
            let (ns, name) = &self.ca_secret;
            self.device_ca = Some(Arc::new(
                OperatorCa::load_or_create(client, ns, name).await?,
            ));
        }
        Ok(())
    }
}
