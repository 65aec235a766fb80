//! `thing-operator run`: wires configuration, Kubernetes client, backends, HTTP server, leader
//! election and controllers together, and shuts all of it down on SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context as _;
use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::RunArgs,
    controller::{self, Context, ContextParts, ControllerConfig, ThingTrigger},
    forwarding::{
        BrokerConnections, MqttBrokers, ObserverManager, StateBus, SubscriberManager,
        mqtt::{BrokerEndpoint, MqttAccess},
    },
    http::{self, Readiness},
    metrics::Metrics,
    mqtt::topic::TopicLayout,
    provider::ProviderRegistry,
    rest_broker::{ShadowUpdateWriter, StatePublisher},
    telemetry,
    wiring::Wiring,
};

/// Cancels `token` on the first SIGTERM or SIGINT.
fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}

/// Builds the backends the configuration enables.
async fn build_providers(
    args: &RunArgs,
    client: &Client,
    metrics: &Arc<Metrics>,
    wiring: &Arc<Wiring>,
    mqtt_access: &MqttAccess,
    shutdown: &CancellationToken,
) -> anyhow::Result<ProviderRegistry> {
    let mut registry = ProviderRegistry::default();
    // Mosquitto: on when --mqtt-url is set. Its connection also carries the REST message
    // broker's retained state topics, for every backend.
    if let Some(mut config) = crate::provider::mosquitto::MosquittoConfig::from_args(args)
        .context("MQTT configuration")?
    {
        config
            .load_device_ca(client.clone())
            .await
            .context("loading the device CA")?;
        let provider = crate::provider::mosquitto::MosquittoProvider::start(
            config,
            wiring.clone(),
            metrics.clone(),
        )
        .context("starting the Mosquitto backend")?;
        wiring.install_publisher(StatePublisher::new(
            provider.mqtt_client(),
            provider.layout().clone(),
        ));
        let things: kube::Api<crate::api::Thing> = match &args.watch_namespace {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        };
        provider.seed_from(things).await;
        // Observers and Subscribers act for their namespace with accounts this backend makes.
        mqtt_access.install_identities(provider.namespace_accounts(args.cluster_id.clone()));
        registry.register(Arc::new(provider));
    }
    if args.aws.enabled {
        use crate::provider::aws::{AwsProvider, AwsSettings, client::ClientSettings};
        let settings = AwsSettings {
            client: ClientSettings {
                region: args.aws.region.clone(),
                iot_endpoint: args.aws.iot_endpoint.clone(),
                data_endpoint: args.aws.data_endpoint.clone(),
                rates: crate::provider::aws::client::RateLimits::default()
                    .scaled(args.aws.rate_multiplier),
                ..ClientSettings::default()
            },
            device_endpoint: args.aws.device_endpoint.clone(),
            poll_interval: args.poll_interval,
            resync_interval: args.resync_interval,
            orphan_grace: args.aws.orphan_grace,
            adopt_unowned: args.aws.adopt_unowned,
            cluster_id: args.cluster_id.clone(),
            push_drift_interval: args.aws.push_drift_interval,
            ..AwsSettings::default()
        };
        let provider =
            Arc::new(AwsProvider::new(settings, Vec::new(), Some(metrics.clone())).await);
        if args.aws.push == crate::config::AwsPushMode::Auto {
            let push = aws_push_settings(args, client, provider.push_name_scope())
                .context("AWS push channel configuration")?;
            crate::provider::aws::push::start(
                provider.clone(),
                push,
                wiring.clone(),
                metrics.mqtt_connection("aws-push"),
                shutdown.clone(),
            );
        }
        registry.register(provider);
    }
    if args.azure.connection_string_file.is_some()
        || args.azure.auth == crate::config::AzureAuth::WorkloadIdentity
    {
        registry.register(Arc::new(azure_provider(args, metrics.clone())?));
    }
    Ok(registry)
}

/// The AWS push channel from its flags: its identity lives in a Secret of the operator's
/// namespace; its client id and policy name carry the cluster id, so clusters sharing an
/// account keep apart. Both hold a character no Thing's names can hold (thing names, which are
/// also device client ids, never contain `.`; device policy names never contain `@`), so no
/// namespace can name a Thing whose device may connect as the channel (AWS drops the older of
/// two connections with one client id) or whose policy takes the channel's policy's name.
fn aws_push_settings(
    args: &RunArgs,
    client: &Client,
    name_scope: &str,
) -> anyhow::Result<crate::provider::aws::push::PushSettings> {
    use crate::provider::aws::push::{PushSettings, identity::IdentitySettings};
    let namespace = args.operator_namespace();
    let client_id = match &args.cluster_id {
        Some(cluster) => format!("thing-operator.{cluster}.push"),
        None => "thing-operator.push".to_string(),
    };
    let address = args
        .aws
        .push_url
        .as_deref()
        .map(crate::mqtt::connection::BrokerAddress::parse)
        .transpose()?;
    let ca_pem = args
        .aws
        .push_ca_file
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    Ok(PushSettings {
        address,
        ca_pem,
        identity: IdentitySettings {
            secrets: kube::Api::namespaced(client.clone(), &namespace),
            secret_name: args.aws.push_secret.clone(),
            policy_name: format!("{client_id}@policy"),
            client_id,
            name_scope: name_scope.to_string(),
            rotate_after: args.aws.push_rotate_after,
            adopt_unowned: args.aws.adopt_unowned,
        },
        status_interval: args.status_write_interval,
        identity_check: args.aws.push_identity_check,
    })
}

/// The Azure backend from its flags. With a connection string, the hub's host name is the
/// flag's, else the connection string's (read once here to learn it; the client re-reads the file
/// at every token renewal). With workload identity, `--azure-hub` names the hub.
fn azure_provider(
    args: &RunArgs,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<crate::provider::azure::AzureProvider> {
    use crate::config::AzureAuth;
    use crate::provider::azure::{
        AzureProvider, AzureSettings,
        client::{ClientSettings, CredentialSource, HubQuotas},
        sas::ConnectionString,
    };
    let (host_name, credentials) = match (args.azure.auth, &args.azure.connection_string_file) {
        (AzureAuth::WorkloadIdentity, Some(_)) => anyhow::bail!(
            "--azure-auth workload-identity and --azure-connection-string-file exclude each other"
        ),
        (AzureAuth::WorkloadIdentity, None) => {
            let host_name = args
                .azure
                .hub
                .clone()
                .context("--azure-auth workload-identity needs --azure-hub")?;
            (host_name, CredentialSource::WorkloadIdentity)
        }
        (AzureAuth::ConnectionString, None) => {
            anyhow::bail!("--azure-auth connection-string needs --azure-connection-string-file")
        }
        (AzureAuth::ConnectionString, Some(path)) => {
            let host_name = match &args.azure.hub {
                Some(h) => h.clone(),
                None => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    ConnectionString::parse(&text)
                        .context("the Azure connection string")?
                        .host_name
                }
            };
            (host_name, CredentialSource::File(path.to_path_buf()))
        }
    };
    let settings = AzureSettings {
        client: ClientSettings {
            host_name,
            endpoint: args.azure.endpoint.clone(),
            credentials,
            quotas: HubQuotas::s1(args.azure.hub_units),
            max_retries: 3,
        },
        poll_interval: args.poll_interval,
        resync_interval: args.resync_interval,
        key_validity_days: 3650,
        adopt_unowned: args.azure.adopt_unowned,
        default_rotation_overlap: std::time::Duration::from_secs(3600),
    };
    AzureProvider::new(settings, Some(metrics))
        .map_err(anyhow::Error::msg)
        .context("starting the Azure backend")
}

/// What forwarding needs of the broker: the connection Subscribers write reported state through
/// (its own client id, so a slow write never stalls the shadow service's connection; returned
/// unpolled), its topic layout, and where the namespaces' own connections go. `None` when no
/// broker is configured.
type EventsMqtt = (
    rumqttc::AsyncClient,
    rumqttc::EventLoop,
    TopicLayout,
    BrokerEndpoint,
);

fn events_mqtt_connection(args: &RunArgs) -> anyhow::Result<Option<EventsMqtt>> {
    use crate::{mqtt::connection, provider::mosquitto::MosquittoConfig};
    let Some(config) = MosquittoConfig::from_args(args)? else {
        return Ok(None);
    };
    let tls = match config.address.tls {
        true => Some(connection::tls_config(config.ca_file.as_deref())?),
        false => None,
    };
    let endpoint = BrokerEndpoint {
        address: config.address.clone(),
        tls: tls.clone(),
    };
    let (client, eventloop) = connection::build(connection::ConnectionSettings {
        address: config.address,
        tls,
        username: config.username,
        password: config.password,
        // Unique per replica: in a pod every replica may well be pid 1, and the broker drops
        // the older of two sessions with the same id.
        client_id: format!(
            "thing-operator-events-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ),
        last_will: None,
        session: Default::default(),
        keep_alive: None,
    });
    Ok(Some((client, eventloop, config.layout, endpoint)))
}

/// The REST message broker's inbound direction (`…/desired/patch`), on a connection of its own
/// with a persistent session under a fixed client id (one per topic prefix), so that a patch
/// not yet written when a leader dies is redelivered to the next. Started once this replica
/// leads; nothing without a broker.
fn start_desired_patches(
    args: &RunArgs,
    kube: &Client,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use crate::{mqtt::connection, provider::mosquitto::MosquittoConfig};
    let Some(config) = MosquittoConfig::from_args(args)? else {
        return Ok(());
    };
    let tls = match config.address.tls {
        true => Some(connection::tls_config(config.ca_file.as_deref())?),
        false => None,
    };
    let (client, eventloop) = connection::build(connection::ConnectionSettings {
        address: config.address,
        tls,
        username: config.username,
        password: config.password,
        client_id: format!("thing-operator-desired-patch/{}", config.layout.prefix()),
        last_will: None,
        session: connection::Session::PersistentManualAcks,
        keep_alive: None,
    });
    let (router, writer) = crate::rest_broker::desired_inbound::desired_patches(
        config.layout,
        kube.clone(),
        client.clone(),
        args.watch_namespace.clone(),
    );
    tokio::spawn(writer.run(shutdown.clone()));
    connection::spawn_driver(
        eventloop,
        client,
        Arc::new(router),
        metrics.mqtt_connection("desired-patch"),
        shutdown.clone(),
    );
    Ok(())
}

/// Losing the lease means another replica may act: stop at once.
fn stop_when_lease_lost(
    mut leader: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        while leader.changed().await.is_ok() {
            if !*leader.borrow_and_update() {
                tracing::error!("leader lease lost, shutting down");
                shutdown.cancel();
                return;
            }
        }
    });
}

/// Blocks until this replica holds the leader Lease. Returns the watch channel, which turns
/// false if the lease is lost.
async fn acquire_leadership(
    client: Client,
    args: &RunArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::sync::watch::Receiver<bool>>> {
    let identity = args
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("thing-operator-{}", std::process::id()));
    let namespace = args.operator_namespace();
    let duration = args.lease_duration.as_secs().max(2);
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, args.lease_name.clone())
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 5).max(1))
        .build()
        .await
        .context("creating the leader lease manager")?;
    let (mut channel, _task) = manager.watch().await;
    tracing::info!("waiting for the leader lease");
    loop {
        if *channel.borrow_and_update() {
            tracing::info!("leader lease acquired");
            return Ok(Some(channel));
        }
        tokio::select! {
            changed = channel.changed() => changed.context("leader lease manager stopped")?,
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Several TLS stacks are linked in (kube, AWS SDK, MQTT); all use this one provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    telemetry::init(args.log_format, &args.log_filter);
    crate::failpoints::configure_from_env();

    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes")?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let events_mqtt = events_mqtt_connection(&args).context("MQTT configuration")?;
    let mqtt_access = match &events_mqtt {
        Some((_, _, _, endpoint)) => MqttAccess::new(
            endpoint.clone(),
            args.mqtt.topic_scope(),
            metrics.clone(),
            shutdown.clone(),
        ),
        None => MqttAccess::default(),
    };
    mqtt_access.spawn_idle_sweep(args.mqtt.idle_sweep);
    // What the operator's own writes into Things caused, shared by both task kinds so that
    // Observer/Subscriber graphs settle instead of looping.
    // One budget for the status writes of every Observer and Subscriber.
    let task_status_budget =
        crate::forwarding::status_budget::TaskStatusBudget::new(args.task_status_write_qps);
    let provenance = crate::forwarding::provenance::ProvenanceBook::new(
        crate::forwarding::provenance::ThingPlace::new(args.cluster_id.clone()),
    );
    let shared_by_tasks = crate::forwarding::SharedByTasks {
        provenance: provenance.clone(),
        status_budget: task_status_budget,
    };
    // Sessions with the brokers tenants name (BrokerConnection), shared by both task kinds.
    let connections = BrokerConnections::new(metrics.clone(), shutdown.clone());
    let subscribers = Arc::new(SubscriberManager::new(
        client.clone(),
        mqtt_access.clone(),
        connections.clone(),
        // Reported state goes through the Thing's shadow topic, on the events connection: the
        // target is always a Thing of the Subscriber's own namespace.
        Arc::new(ShadowUpdateWriter::new(
            events_mqtt
                .as_ref()
                .map(|(c, _, l, _)| (c.clone(), l.clone())),
        )),
        shared_by_tasks.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let bus = StateBus::default();
    let (trigger, trigger_rx) =
        ThingTrigger::budgeted(args.status_write_qps, Some(metrics.clone()));
    let wiring = Arc::new(Wiring::new(bus.clone(), trigger, provenance.clone()));
    // One policy: the Observer reconciler refuses literal addresses, the sinks check names at
    // connect time.
    let egress = Arc::new(args.egress_policy());
    let observers = ObserverManager::new(
        bus,
        client.clone(),
        MqttBrokers {
            mqtt: mqtt_access.clone(),
            connections: connections.clone(),
        },
        egress.clone(),
        shared_by_tasks,
        metrics.clone(),
        shutdown.clone(),
    );
    if let Some((mqtt, eventloop, _, _)) = events_mqtt {
        crate::mqtt::connection::spawn_driver(
            eventloop,
            mqtt,
            Arc::new(crate::mqtt::connection::IgnoreMessages),
            metrics.mqtt_connection("events"),
            shutdown.clone(),
        );
    }

    let server = tokio::spawn(http::serve(
        args.http_addr,
        http::router(metrics.clone(), readiness.clone(), subscribers.clone()),
        shutdown.clone(),
    ));

    if args.leader_elect {
        // A standby replica is ready (it serves health and metrics, and a rolling update must
        // be able to complete while the old leader holds the lease); it turns unready only for
        // the moment between winning the lease and its caches syncing.
        readiness.set_ready(true);
        let Some(leader) = acquire_leadership(client.clone(), &args, &shutdown).await? else {
            return Ok(());
        };
        readiness.set_ready(false);
        metrics.leader.set(1);
        stop_when_lease_lost(leader, shutdown.clone());
    }

    // Backends start only once this replica leads: the Mosquitto backend then loads its shadows
    // from the Things' status as they are now (loading them at boot would roll a standby's
    // shadows back to what they were when it started), and a standby keeps no broker session
    // whose last will could announce the leader's broker connection offline.
    let providers =
        build_providers(&args, &client, &metrics, &wiring, &mqtt_access, &shutdown).await?;
    start_desired_patches(&args, &client, &metrics, &shutdown).context("MQTT configuration")?;
    let reporter = Reporter {
        controller: args.controller_name.clone(),
        instance: args.pod_name.clone(),
    };
    let config = ControllerConfig {
        resync_interval: args.resync_interval,
        poll_interval: args.poll_interval,
        concurrency: args.concurrency,
        watch_namespace: args.watch_namespace.clone(),
        limits: args.limits.spec_limits(),
        topics: crate::api::validation::TopicScope {
            unchecked: crate::failpoints::check_disabled("validation-topic-scope-off"),
            ..args.mqtt.topic_scope()
        },
        egress,
        cluster_id: args.cluster_id.clone(),
    };
    let ctx = Arc::new(Context::new(ContextParts {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics: metrics.clone(),
        providers,
        config,
        feed: wiring,
        thing_triggers: trigger_rx,
        observers,
        subscribers,
        connections,
    }));

    tracing::info!(
        version = crate::build_info::VERSION,
        commit = crate::build_info::COMMIT,
        brokers = ?ctx.providers.brokers(),
        "starting controllers"
    );
    ctx.subscribers.activate();
    ctx.providers.activate_all();
    controller::run(ctx, shutdown.clone(), readiness).await;
    shutdown.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e).context("http server"),
        Err(e) => return Err(e).context("http server task"),
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn run_args(extra: &[&str]) -> RunArgs {
        let argv = ["thing-operator", "run"]
            .into_iter()
            .chain(extra.iter().copied());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Run(args) => *args,
            _ => unreachable!("run was parsed"),
        }
    }

    fn refusal(extra: &[&str]) -> String {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        format!(
            "{:#}",
            azure_provider(&run_args(extra), metrics).err().unwrap()
        )
    }

    #[test]
    fn azure_auth_modes_need_their_own_settings_and_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let cs = dir.path().join("cs");
        std::fs::write(
            &cs,
            "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey=QUJD",
        )
        .unwrap();
        let cs = cs.display().to_string();
        let wi = ["--azure-auth", "workload-identity"];
        assert!(refusal(&wi).contains("needs --azure-hub"));
        let both = [
            &wi[..],
            &["--azure-hub", "h", "--azure-connection-string-file", &cs],
        ]
        .concat();
        assert!(refusal(&both).contains("exclude each other"));
        assert!(
            refusal(&["--azure-auth", "connection-string"])
                .contains("needs --azure-connection-string-file")
        );
        // A connection string alone is enough, and names the hub.
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let p =
            azure_provider(&run_args(&["--azure-connection-string-file", &cs]), metrics).unwrap();
        assert_eq!(p.host_name(), "h.azure-devices.net");
    }
}
