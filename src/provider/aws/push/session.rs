//! The push channel's connection loop: make sure of the identity, connect with it, subscribe,
//! hand every documents message to the channel; on any failure mark the channel down, back off
//! and start over. While connected the identity is checked periodically; a rotation reconnects
//! with the new certificate before the old one is removed.

use std::{sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, SubscribeReasonCode, Transport};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

use super::{PushChannel, PushError, PushSettings, documents::FILTERS, identity::Identity};
use crate::{feed::StateFeed, mqtt::connection::BrokerAddress, provider::aws::AwsProvider};

/// AWS IoT's largest MQTT message (128 KiB) plus headers.
const MAX_PACKET: usize = 160 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Starts the channel of `provider` (once this replica leads); it runs until `shutdown`.
pub fn start(
    provider: Arc<AwsProvider>,
    settings: PushSettings,
    feed: Arc<dyn StateFeed>,
    gauge: Gauge,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let channel = provider.push.clone();
        let mut backoff = Duration::from_secs(1);
        loop {
            let result = tokio::select! {
                r = session(&provider, &settings, &feed, &gauge) => r,
                _ = shutdown.cancelled() => {
                    channel.set_up(false, &gauge, &feed);
                    return;
                }
            };
            let was_up = channel.store().is_up();
            channel.set_up(false, &gauge, &feed);
            let wait = match result {
                Err(PushError::Rotated) => Duration::ZERO,
                Err(e) => {
                    if was_up {
                        backoff = Duration::from_secs(1);
                    }
                    // Equal jitter: replicas of many clusters do not reconnect in step.
                    let half = backoff / 2;
                    let wait = half + half.mul_f64(rand::random::<f64>());
                    tracing::warn!(error = %e, retry_in = ?wait, "AWS push channel down; Things are polled");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
                Ok(()) => Duration::ZERO,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// Where to connect: the flag, else the device endpoint (`host:port`) on its port.
async fn address(
    provider: &AwsProvider,
    settings: &PushSettings,
) -> Result<BrokerAddress, PushError> {
    if let Some(a) = &settings.address {
        return Ok(a.clone());
    }
    let endpoint = provider.device_endpoint().await?;
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| PushError::Endpoint(endpoint.clone()))?,
        ),
        None => (endpoint.clone(), 8883),
    };
    Ok(BrokerAddress {
        host,
        port,
        tls: true,
        connect_to: None,
    })
}

/// TLS trusting `ca_pem`, presenting the channel's certificate. Port 8883 needs no ALPN.
fn tls(ca_pem: &[u8], identity: &Identity) -> Result<rustls::ClientConfig, PushError> {
    let bad = |e: &dyn std::fmt::Display| PushError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    let chain = CertificateDer::pem_slice_iter(identity.certificate_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    // The error of a key that does not parse says nothing about the key itself.
    let key = PrivateKeyDer::from_pem_slice(identity.private_key_pem.as_bytes())
        .map_err(|_| PushError::Tls("the push channel's private key does not parse".into()))?;
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(&e))
}

/// AWS calls about the channel's identity, run beside its event loop: `Some(certificate id)`
/// after a check, `None` after removing a previous certificate.
type IdentityWork<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<String>, PushError>> + Send + 'a>,
>;

/// Removes the previous certificate; a failure is logged and tried again at the next check.
async fn retire(provider: &Arc<AwsProvider>, settings: &PushSettings, id: &str) {
    if let Err(e) = settings.identity.retire(&provider.clients, id).await {
        tracing::warn!(error = %e, "removing the previous push channel certificate failed; retried at the next check");
    }
}

/// One connection, until it fails (`Err`) or the identity rotated (`Err(Rotated)`).
async fn session(
    provider: &Arc<AwsProvider>,
    settings: &PushSettings,
    feed: &Arc<dyn StateFeed>,
    gauge: &Gauge,
) -> Result<(), PushError> {
    let channel: &Arc<PushChannel> = &provider.push;
    let (identity, retired) = settings.identity.ensure(&provider.clients).await?;
    let address = address(provider, settings).await?;
    let ca = settings
        .ca_pem
        .clone()
        .unwrap_or_else(|| provider.ca_bundle.clone().into_bytes());
    let tls = tls(&ca, &identity)?;
    let mut options = MqttOptions::new(
        settings.identity.client_id.clone(),
        address.host.clone(),
        address.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let mut retired = retired;
    let mut check = tokio::time::interval(settings.identity_check);
    check.tick().await;
    // The identity's AWS calls (the periodic check, removing the previous certificate) run
    // beside the event loop, one at a time: awaited inside it, a slow call would starve the
    // connection of its keepalives.
    let mut work: Option<IdentityWork<'_>> = None;
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = check.tick(), if work.is_none() => {
                // `ensure` first finishes removing a previous certificate whose removal failed.
                // What it returns as retired after rotating now is the certificate this
                // connection uses: it goes once the new one is connected (next session).
                work = Some(Box::pin(async move {
                    let (fresh, _) = settings.identity.ensure(&provider.clients).await?;
                    Ok(Some(fresh.certificate_id))
                }));
                continue;
            }
            done = async {
                match work.as_mut() {
                    Some(running) => running.await,
                    None => std::future::pending().await,
                }
            } => {
                work = None;
                if let Some(fresh) = done?
                    && fresh != identity.certificate_id
                {
                    let _ = client.try_disconnect();
                    return Err(PushError::Rotated);
                }
                continue;
            }
        };
        match event {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                tracing::info!(endpoint = %address.endpoint(), certificate = %identity.certificate_id, "AWS push channel connected");
                let filters =
                    FILTERS.map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce));
                client
                    .try_subscribe_many(filters)
                    .map_err(|e| PushError::Connection(e.to_string()))?;
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    return Err(PushError::SubscriptionRefused);
                }
                channel.set_up(true, gauge, feed);
                // Connected with the new certificate: the old one can go now (or at the next
                // check, when a check is running).
                if work.is_none()
                    && let Some(id) = retired.take()
                {
                    work = Some(Box::pin(async move {
                        retire(provider, settings, &id).await;
                        Ok(None)
                    }));
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                channel.handle(&p.topic, &p.payload, feed, settings.status_interval);
            }
            Ok(_) => {}
            Err(e) => return Err(PushError::Connection(e.to_string())),
        }
    }
}
