//! The operator's one MQTT connection to the broker (admin credentials): dynamic-security
//! commands, the shadow service and the retained state publisher all share it.
//!
//! The sessions with tenants' own brokers (`forwarding::broker_connections`) are built and
//! driven here too, with their own keepalive and a longer, jittered backoff ([`Reconnect`]).
//!
//! rumqttc reconnects when its event loop is polled again after an error; this module keeps
//! polling with a capped backoff and tells the handler on every (re)connect, so subscriptions
//! are renewed even when the broker lost its sessions (a restart without persistence).
//! Each connection reports whether it is up through its own gauge
//! (`thing_operator_mqtt_connected{connection}`).

use std::{path::Path, sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, Publish, QoS,
    Transport,
};
use tokio_util::sync::CancellationToken;

/// Why the MQTT settings are unusable. Never carries the password.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--mqtt-url {0:?}: {1}")]
    Url(String, String),
    #[error("reading {0}: {1}")]
    File(String, String),
    #[error("--mqtt-{0} is required with --mqtt-url")]
    Missing(&'static str),
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Where the socket connects, when it must not follow `host`'s name resolution (a
    /// tenant's broker whose address the egress policy checked); TLS still verifies `host`.
    pub connect_to: Option<std::net::SocketAddr>,
}

impl BrokerAddress {
    /// `mqtt://host[:1883]`, `tcp://…`, `mqtts://host[:8883]`, `ssl://…`.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        // A URL with user info may hold a password: never echo it.
        let shown = if url.contains('@') {
            "<redacted>".to_string()
        } else {
            url.to_string()
        };
        let bad = |why: &str| ConfigError::Url(shown.clone(), why.to_string());
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let tls = match parsed.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => return Err(bad(&format!("unsupported scheme {other}"))),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Credentials in a URL end up in process listings and logs.
            return Err(bad(
                "credentials do not belong in the URL; use --mqtt-username/--mqtt-password-file",
            ));
        }
        let host = parsed.host_str().ok_or_else(|| bad("no host"))?.to_string();
        let port = parsed.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(Self {
            host,
            port,
            tls,
            connect_to: None,
        })
    }

    /// `host:port`, what devices get as their endpoint.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Reads a password file, trimming one trailing newline (editors add it).
pub fn read_password(path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File(path.display().to_string(), e.kind().to_string()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// TLS client config trusting the given CA bundle (PEM), or the Mozilla roots without one.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| ConfigError::File(path.display().to_string(), e.kind().to_string()))?;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls::pki_types::CertificateDer<'static> =
                    cert.map_err(|e| ConfigError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ConfigError::Tls(e.to_string()))?;
            }
        }
        None => {
            for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
                let _ = roots.add(cert.clone());
            }
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What the connection calls back into.
pub trait Handler: Send + Sync + 'static {
    /// After every CONNACK: subscribe, announce.
    fn on_connected(&self, client: &AsyncClient);
    /// Every incoming PUBLISH. Must not block: it runs on the event loop.
    fn on_message(&self, client: &AsyncClient, topic: &str, payload: &[u8]);
    /// Every incoming PUBLISH, whole: a connection with [`Session::PersistentManualAcks`]
    /// acknowledges through it (`client.try_ack(publish)`), once the message is durable.
    fn on_publish(&self, client: &AsyncClient, publish: &Publish) {
        self.on_message(client, &publish.topic, &publish.payload)
    }
    /// A SUBACK refused `count` filters (the account's ACL does not allow them).
    fn on_subscriptions_refused(&self, _count: usize) {}
    /// A PUBLISH of this client went out with packet id `pkid` (0 for QoS 0; the same id again
    /// when it is retransmitted after a reconnect).
    fn on_outgoing_publish(&self, _pkid: u16) {}
    /// The broker acknowledged the QoS 1/2 PUBLISH `pkid` (PUBACK, or PUBCOMP for QoS 2).
    fn on_publish_acknowledged(&self, _pkid: u16) {}
    /// Connecting failed or the connection broke; the driver tries again after a backoff.
    fn on_connection_lost(&self, _error: &rumqttc::ConnectionError) {}
}

/// The handler of a connection that only publishes.
pub struct IgnoreMessages;

impl Handler for IgnoreMessages {
    fn on_connected(&self, _client: &AsyncClient) {}
    fn on_message(&self, _client: &AsyncClient, _topic: &str, _payload: &[u8]) {}
}

/// How the broker keeps the connection's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Session {
    /// A fresh session per connection; messages acknowledged on receipt.
    #[default]
    Clean,
    /// The broker keeps subscriptions and undelivered QoS 1/2 messages while the client is
    /// away, and the handler acknowledges each message itself: what was not acknowledged comes
    /// again after a reconnect or a restart. Needs a client id that stays the same.
    PersistentManualAcks,
}

pub struct ConnectionSettings {
    pub address: BrokerAddress,
    pub tls: Option<rustls::ClientConfig>,
    pub username: String,
    pub password: String,
    pub client_id: String,
    /// Published (retained) by the broker if the operator vanishes.
    pub last_will: Option<(String, Vec<u8>)>,
    pub session: Session,
    /// MQTT keepalive; `None`: [`DEFAULT_KEEP_ALIVE`].
    pub keep_alive: Option<Duration>,
}

/// The keepalive of the operator's own connections.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How a connection is tried again after it failed: from 100 ms, doubling up to `max`; with
/// `jitter`, each wait is spread by ±10 % so that many connections to one broker that failed
/// together do not come back in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    pub max: Duration,
    pub jitter: bool,
}

impl Default for Reconnect {
    /// The operator's own broker: a short cap, it is expected back soon.
    fn default() -> Self {
        Self {
            max: Duration::from_secs(2),
            jitter: false,
        }
    }
}

impl Reconnect {
    fn wait(&self, backoff: Duration) -> Duration {
        let spread = backoff / 10;
        if !self.jitter || spread.is_zero() {
            return backoff;
        }
        use rand::Rng;
        backoff - spread + rand::rng().random_range(Duration::ZERO..=spread * 2)
    }
}

/// Largest packet in either direction: Mosquitto's `max_packet_size` in the test environment.
/// Big enough that an oversized device payload reaches the shadow service and gets a
/// rejection, instead of breaking the operator's connection.
const MAX_PACKET: usize = 1024 * 1024;

/// The client handle and its (not yet polled) event loop; nothing connects before
/// [`spawn_driver`] polls it.
pub fn build(settings: ConnectionSettings) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(
        settings.client_id,
        settings.address.host.clone(),
        settings.address.port,
    );
    // No login at all for a broker that takes anonymous clients (a tenant's own).
    if !(settings.username.is_empty() && settings.password.is_empty()) {
        options.set_credentials(settings.username, settings.password);
    }
    options
        .set_keep_alive(settings.keep_alive.unwrap_or(DEFAULT_KEEP_ALIVE))
        .set_clean_session(settings.session == Session::Clean)
        .set_manual_acks(settings.session == Session::PersistentManualAcks)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some(address) = settings.address.connect_to {
        options.set_connect_address(address);
    }
    if let Some(tls) = settings.tls {
        options.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    }
    if let Some((topic, payload)) = settings.last_will {
        options.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
    }
    // A deep request queue: handlers use try_publish and must not stall under a storm.
    let (client, mut eventloop) = AsyncClient::new(options, 16 * 1024);
    // Small request/reply messages: Nagle's algorithm against delayed ACKs adds ~40 ms a hop.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

/// Drives the event loop until `shutdown`, calling `handler`; `connected` is 1 while the
/// connection is up (from its CONNACK to its first error), 0 otherwise.
pub fn spawn_driver(
    eventloop: EventLoop,
    client: AsyncClient,
    handler: Arc<dyn Handler>,
    connected: Gauge,
    shutdown: CancellationToken,
) {
    spawn_driver_with(
        eventloop,
        client,
        handler,
        connected,
        shutdown,
        Reconnect::default(),
    );
}

/// [`spawn_driver`] with its own reconnect policy.
pub fn spawn_driver_with(
    eventloop: EventLoop,
    client: AsyncClient,
    handler: Arc<dyn Handler>,
    connected: Gauge,
    shutdown: CancellationToken,
    reconnect: Reconnect,
) {
    tokio::spawn(drive(
        eventloop, client, handler, connected, shutdown, reconnect,
    ));
}

async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    handler: Arc<dyn Handler>,
    connected: Gauge,
    shutdown: CancellationToken,
    reconnect: Reconnect,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                connected.set(0);
                return;
            }
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                tracing::info!(code = ?ack.code, "connected to the MQTT broker");
                // rumqttc turns a refused CONNACK into an error: this one accepted us.
                connected.set(1);
                backoff = Duration::from_millis(100);
                handler.on_connected(&client);
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => handler.on_publish(&client, &p),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => handler.on_outgoing_publish(pkid),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => handler.on_publish_acknowledged(ack.pkid),
            Ok(Event::Incoming(Incoming::PubComp(comp))) => {
                handler.on_publish_acknowledged(comp.pkid)
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    tracing::warn!(refused, "the broker refused a subscription");
                    handler.on_subscriptions_refused(refused);
                }
            }
            Ok(_) => {}
            Err(e) => {
                connected.set(0);
                // The error names the connection problem, never credentials.
                let wait = reconnect.wait(backoff);
                tracing::warn!(error = %e, retry_in = ?wait, "MQTT connection lost");
                handler.on_connection_lost(&e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(reconnect.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports() {
        assert_eq!(
            BrokerAddress::parse("mqtt://127.0.0.1:1884").unwrap(),
            BrokerAddress {
                host: "127.0.0.1".into(),
                port: 1884,
                tls: false,
                connect_to: None
            }
        );
        assert_eq!(BrokerAddress::parse("mqtt://broker").unwrap().port, 1883);
        let tls = BrokerAddress::parse("mqtts://broker.example").unwrap();
        assert!(tls.tls);
        assert_eq!(tls.endpoint(), "broker.example:8883");
        assert!(BrokerAddress::parse("http://x").is_err());
        assert!(BrokerAddress::parse("not a url").is_err());
        let err = BrokerAddress::parse("mqtt://admin:hunter2@broker")
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials"));
        assert!(!err.contains("hunter2"));
    }

    /// What the socket of a connection to `address` receives first, and whether it came.
    async fn first_bytes(address: BrokerAddress, tls: Option<rustls::ClientConfig>) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = BrokerAddress {
            connect_to: Some(listener.local_addr().unwrap()),
            ..address
        };
        let (_client, mut eventloop) = build(ConnectionSettings {
            address,
            tls,
            username: String::new(),
            password: String::new(),
            client_id: "c".into(),
            last_will: None,
            session: Session::Clean,
            keep_alive: None,
        });
        let driver = tokio::spawn(async move { eventloop.poll().await.is_ok() });
        let accepted = tokio::time::timeout(Duration::from_secs(10), async {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 2048];
            let n = socket.read(&mut buf).await.unwrap();
            buf.truncate(n);
            buf
        })
        .await
        .expect("the connection reached the fixed address");
        driver.abort();
        accepted
    }

    #[tokio::test]
    async fn a_fixed_connect_address_is_used_and_tls_still_names_the_host() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // `.invalid` never resolves: reaching the listener means the name was not looked up.
        let plain = first_bytes(BrokerAddress::parse("mqtt://broker.invalid").unwrap(), None).await;
        assert_eq!(plain.first(), Some(&0x10), "an MQTT CONNECT arrives");

        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let hello = first_bytes(
            BrokerAddress::parse("mqtts://broker.invalid").unwrap(),
            Some(tls),
        )
        .await;
        assert_eq!(hello.first(), Some(&0x16), "a TLS handshake arrives");
        assert!(
            hello.windows(14).any(|w| w == b"broker.invalid"),
            "the ClientHello names the broker's host (SNI), not the address"
        );
    }
}
