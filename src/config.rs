//! Command line and environment configuration (every flag has an env twin).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "thing-operator",
    version,
    about = "IoT devices as Kubernetes resources"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print every CustomResourceDefinition as YAML (what crds/ holds).
    Crds {
        /// Annotate them for the Helm chart (`helm.sh/resource-policy: keep`).
        #[arg(long)]
        helm: bool,
    },
    /// Run the controllers.
    Run(Box<RunArgs>),
    /// Print the version and the commit this binary was built from.
    Version,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::api::validation::parse_duration(s)
}

/// A rate of at least one per second (a finite, positive number).
/// Where the operator runs when `POD_NAMESPACE` does not say (the chart's and kustomize's namespace).
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "thing-operator-system";

fn parse_qps(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(q) if q.is_finite() && q >= 1.0 => Ok(q),
        _ => Err(format!("{s}: a number of writes per second, at least 1")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "THING_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    #[arg(
        long,
        env = "THING_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info,kube_runtime=warn")]
    pub log_filter: String,
    /// Identifies this cluster in every derived device name (`<cluster>:<namespace>_<name>`), so
    /// clusters sharing an AWS account or a broker never collide. Set it once, at install:
    /// changing it renames every derived device, which provisioned Things refuse.
    #[arg(long, env = "THING_OPERATOR_CLUSTER_ID", value_parser = parse_cluster_id)]
    pub cluster_id: Option<String>,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "THING_OPERATOR_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Name reported as the source of Events.
    #[arg(
        long,
        env = "THING_OPERATOR_CONTROLLER_NAME",
        default_value = "thing-operator"
    )]
    pub controller_name: String,
    /// Pod name, for Events and the leader lease (set from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Take a Lease before reconciling, so only one replica acts at a time.
    #[arg(long, env = "THING_OPERATOR_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "THING_OPERATOR_LEASE_NAME",
        default_value = "thing-operator-leader"
    )]
    pub lease_name: String,
    /// How long a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, env = "THING_OPERATOR_LEASE_DURATION", value_parser = parse_duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// The operator's namespace: its leader Lease and its own Secrets (`--ca-secret`,
    /// `--aws-push-secret`). Default: the pod's namespace, else `thing-operator-system`.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Objects reconciled at once per kind.
    #[arg(long, env = "THING_OPERATOR_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// How often a Ready Thing is reconciled again to detect drift in its backend.
    #[arg(long, env = "THING_OPERATOR_RESYNC_INTERVAL", value_parser = parse_duration, default_value = "5m")]
    pub resync_interval: Duration,
    /// Default interval between shadow reads when no push channel delivers reported state.
    #[arg(long, env = "THING_OPERATOR_POLL_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub poll_interval: Duration,
    /// Reported state from devices is written to status at most once per this interval per Thing.
    #[arg(long, env = "THING_OPERATOR_STATUS_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub status_write_interval: Duration,
    /// Status writes of reported state per second across all Things (the fleet-wide budget on
    /// top of the per-Thing interval); the Thing whose status is stalest goes first, and the
    /// wait shows as `thing_operator_status_write_lag_seconds`. At least 1.
    #[arg(long, env = "THING_OPERATOR_STATUS_WRITE_QPS", default_value_t = 50.0, value_parser = parse_qps)]
    pub status_write_qps: f64,

    /// Status writes of Observers and Subscribers (counters, last error, filter memory) per
    /// second across all of them; a task without a turn writes its changes, merged, at a later
    /// flush. At least 1.
    #[arg(long, env = "THING_OPERATOR_TASK_STATUS_WRITE_QPS", default_value_t = 20.0, value_parser = parse_qps)]
    pub task_status_write_qps: f64,

    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub azure: AzureArgs,
    #[command(flatten)]
    pub mqtt: MqttArgs,
}

/// What a spec may ask for beyond the schema. Each interval is a rate of billed backend calls or
/// certificate issuance shared by every namespace, so a spec may not go below these floors.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Shortest `spec.shadow.pollInterval` accepted.
    #[arg(long, env = "THING_OPERATOR_MIN_POLL_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    pub min_poll_interval: Duration,
    /// Shortest `spec.credentials.rotateAfter` accepted.
    #[arg(long, env = "THING_OPERATOR_MIN_ROTATE_AFTER", value_parser = parse_duration, default_value = "1h")]
    pub min_rotate_after: Duration,
    /// Shortest `spec.credentials.rotationOverlap` accepted.
    #[arg(long, env = "THING_OPERATOR_MIN_ROTATION_OVERLAP", value_parser = parse_duration, default_value = "1m")]
    pub min_rotation_overlap: Duration,
    /// Let AWS policy templates allow any action on any resource. Off: only iot: actions on the
    /// Thing's own client, thing, topics and shadow.
    #[arg(
        long,
        env = "THING_OPERATOR_UNRESTRICTED_POLICIES",
        default_value_t = false
    )]
    pub unrestricted_policies: bool,
}

impl LimitArgs {
    pub fn spec_limits(&self) -> crate::api::validation::SpecLimits {
        crate::api::validation::SpecLimits {
            min_poll_interval: self.min_poll_interval,
            min_rotate_after: self.min_rotate_after,
            min_rotation_overlap: self.min_rotation_overlap,
            unrestricted_policies: self.unrestricted_policies,
        }
    }
}

/// Where Observer HTTP sinks and BrokerConnections may connect (docs/security.md). By default
/// only public addresses. One policy for both: the `--egress-*` aliases say so; the older
/// `--http-sink-*` names stay.
#[derive(Args, Debug, Clone, Default)]
pub struct EgressArgs {
    /// CIDR HTTP sinks and BrokerConnections may reach although it is not public (e.g. an
    /// in-cluster collector or broker); comma-separated or repeated.
    #[arg(
        long = "http-sink-allow-cidr",
        visible_alias = "egress-allow-cidr",
        env = "THING_OPERATOR_HTTP_SINK_ALLOW_CIDRS",
        value_delimiter = ','
    )]
    pub allow: Vec<ipnet::IpNet>,
    /// CIDR HTTP sinks and BrokerConnections may never reach although it is public (e.g. the
    /// cluster's service and pod ranges); comma-separated or repeated.
    #[arg(
        long = "http-sink-deny-cidr",
        visible_alias = "egress-deny-cidr",
        env = "THING_OPERATOR_HTTP_SINK_DENY_CIDRS",
        value_delimiter = ','
    )]
    pub deny: Vec<ipnet::IpNet>,
}

impl RunArgs {
    /// The operator's namespace (see `--lease-namespace`): one default for the Lease and the
    /// Secrets, so an operator run without `POD_NAMESPACE` keeps them together.
    pub fn operator_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_OPERATOR_NAMESPACE.into())
    }

    /// The egress policy of HTTP sinks: the configured ranges, and the operator's own port.
    pub fn egress_policy(&self) -> crate::egress::EgressPolicy {
        crate::egress::EgressPolicy {
            allowed: self.egress.allow.clone(),
            denied: self.egress.deny.clone(),
            own_ports: vec![self.http_addr.port()],
        }
    }
}

/// AWS IoT Core backend. Enabled when a region is known (flag, AWS_REGION or profile).
#[derive(Args, Debug, Clone, Default)]
pub struct AwsArgs {
    /// Enable the AWS backend.
    #[arg(long = "aws", env = "THING_OPERATOR_AWS", default_value_t = false)]
    pub enabled: bool,
    #[arg(long = "aws-region", env = "AWS_REGION")]
    pub region: Option<String>,
    /// Control plane endpoint override (moto, VPC endpoint).
    #[arg(long = "aws-iot-endpoint", env = "AWS_ENDPOINT_URL_IOT")]
    pub iot_endpoint: Option<String>,
    /// Data plane (shadow) endpoint override.
    #[arg(long = "aws-data-endpoint", env = "AWS_ENDPOINT_URL_IOT_DATA_PLANE")]
    pub data_endpoint: Option<String>,
    /// Device-facing MQTT endpoint written into Secrets (default: DescribeEndpoint iot:Data-ATS).
    // An explicit id: MqttArgs has a field of the same name, and clap ids must be unique.
    #[arg(
        id = "aws_device_endpoint",
        long = "aws-device-endpoint",
        env = "THING_OPERATOR_AWS_DEVICE_ENDPOINT"
    )]
    pub device_endpoint: Option<String>,
    /// How long the window of an interrupted CreateKeysAndCertificate must age before unattached
    /// certificates created in it are deleted as orphans.
    #[arg(long = "aws-orphan-grace", env = "THING_OPERATOR_AWS_ORPHAN_GRACE", value_parser = parse_duration, default_value = "60s")]
    pub orphan_grace: Duration,
    /// Scales every client-side AWS rate limit (1 = AWS's published default quotas). Raise it
    /// for accounts with raised quotas, or against moto in benchmarks.
    #[arg(
        long = "aws-rate-multiplier",
        env = "THING_OPERATOR_AWS_RATE_MULTIPLIER",
        default_value_t = 1.0
    )]
    pub rate_multiplier: f64,
    /// Adopt an existing AWS thing that carries no owner record (one made outside this
    /// operator). Off: such a thing is a `Conflict`, left untouched.
    #[arg(
        long = "aws-adopt-unowned",
        env = "THING_OPERATOR_AWS_ADOPT_UNOWNED",
        default_value_t = false
    )]
    pub adopt_unowned: bool,
    /// The push channel (docs/aws.md): `auto` keeps one MQTT connection to the account's IoT
    /// data endpoint, under the operator's own certificate and policy, and takes reported state
    /// from shadow update documents as they happen; polling stays the fallback. `off`: poll only.
    #[arg(
        long = "aws-push",
        env = "THING_OPERATOR_AWS_PUSH",
        value_enum,
        default_value = "auto"
    )]
    pub push: AwsPushMode,
    /// Where the push channel connects, `mqtts://host[:8883]` (default: the device endpoint,
    /// `--aws-device-endpoint` or else DescribeEndpoint `iot:Data-ATS` on port 8883).
    #[arg(long = "aws-push-url", env = "THING_OPERATOR_AWS_PUSH_URL")]
    pub push_url: Option<String>,
    /// CA bundle (PEM) that verifies the push endpoint (default: Amazon Root CA 1 and 3).
    #[arg(long = "aws-push-ca-file", env = "THING_OPERATOR_AWS_PUSH_CA_FILE")]
    pub push_ca_file: Option<PathBuf>,
    /// While the push channel is up, how often an idle Thing's shadow is read anyway and its
    /// resources checked for drift (instead of every poll and resync interval).
    #[arg(long = "aws-push-drift-interval", env = "THING_OPERATOR_AWS_PUSH_DRIFT_INTERVAL", value_parser = parse_duration, default_value = "1h")]
    pub push_drift_interval: Duration,
    /// Secret in the operator's namespace (POD_NAMESPACE) holding the push channel's own key and
    /// certificate; created by the operator.
    #[arg(
        long = "aws-push-secret",
        env = "THING_OPERATOR_AWS_PUSH_SECRET",
        default_value = "thing-operator-aws-push"
    )]
    pub push_secret: String,
    /// Age at which the push channel's own certificate is replaced (the new one is active before
    /// the old one is removed).
    #[arg(long = "aws-push-rotate-after", env = "THING_OPERATOR_AWS_PUSH_ROTATE_AFTER", value_parser = parse_duration, default_value = "720h")]
    pub push_rotate_after: Duration,
    /// How often the connected push channel checks its identity (certificate age, policy and
    /// attachment); a due rotation reconnects with the new certificate.
    #[arg(long = "aws-push-identity-check", env = "THING_OPERATOR_AWS_PUSH_IDENTITY_CHECK", value_parser = parse_duration, default_value = "1h")]
    pub push_identity_check: Duration,
}

/// Whether the AWS backend keeps a push channel.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AwsPushMode {
    /// Push channel on (the default); polling is the fallback while it is down.
    #[default]
    Auto,
    /// Poll only.
    Off,
}

/// How the operator authenticates to IoT Hub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AzureAuth {
    /// A SAS policy from `--azure-connection-string-file`.
    #[default]
    ConnectionString,
    /// Microsoft Entra workload identity: a bearer token for the hub, exchanged for the
    /// federated service-account token the AKS webhook mounts (`AZURE_CLIENT_ID`,
    /// `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`).
    WorkloadIdentity,
}

/// Azure IoT Hub backend (docs/azure.md). Enabled with `--azure-connection-string-file`, or with
/// `--azure-auth workload-identity` and `--azure-hub`.
#[derive(Args, Debug, Clone, Default)]
pub struct AzureArgs {
    /// How the operator authenticates to the hub. `workload-identity` enables the Azure backend
    /// and needs `--azure-hub`; it excludes `--azure-connection-string-file`.
    #[arg(
        id = "azure_auth",
        long = "azure-auth",
        env = "THING_OPERATOR_AZURE_AUTH",
        value_enum,
        default_value = "connection-string"
    )]
    pub auth: AzureAuth,
    /// File holding a hub connection string (`HostName=..;SharedAccessKeyName=..;
    /// SharedAccessKey=..`), e.g. a mounted Secret; re-read whenever a token is renewed. Setting
    /// it enables the Azure backend (with `--azure-auth connection-string`, the default).
    #[arg(
        long = "azure-connection-string-file",
        env = "THING_OPERATOR_AZURE_CONNECTION_STRING_FILE"
    )]
    pub connection_string_file: Option<PathBuf>,
    /// The hub's host name (`<hub>.azure-devices.net`); default: the connection string's.
    /// Required with `--azure-auth workload-identity`.
    #[arg(long = "azure-hub", env = "THING_OPERATOR_AZURE_HUB")]
    pub hub: Option<String>,
    /// Where service requests go instead of `https://<hub>` (a private endpoint, or the test
    /// double over plain http on loopback).
    #[arg(
        id = "azure_endpoint",
        long = "azure-endpoint",
        env = "THING_OPERATOR_AZURE_ENDPOINT"
    )]
    pub endpoint: Option<String>,
    /// IoT Hub units (S1): scales every client-side limit (identity registry 100/min/unit,
    /// twin reads 100/s/unit, twin updates 50/s/unit).
    #[arg(
        long = "azure-hub-units",
        env = "THING_OPERATOR_AZURE_HUB_UNITS",
        default_value_t = 1.0
    )]
    pub hub_units: f64,
    /// Adopt an existing device that carries no owner record (made outside this operator).
    /// Off: such a device is a `Conflict`, left untouched.
    #[arg(
        id = "azure_adopt_unowned",
        long = "azure-adopt-unowned",
        env = "THING_OPERATOR_AZURE_ADOPT_UNOWNED",
        default_value_t = false
    )]
    pub adopt_unowned: bool,
}

/// The operator's MQTT broker: Mosquitto Things, the REST message broker, MQTT sinks and sources.
#[derive(Args, Debug, Clone, Default)]
pub struct MqttArgs {
    /// Broker URL, e.g. `mqtt://127.0.0.1:1883` or `mqtts://broker:8883`. Unset: MQTT features off.
    #[arg(long = "mqtt-url", env = "THING_OPERATOR_MQTT_URL")]
    pub url: Option<String>,
    /// Username with rights on `$CONTROL/dynamic-security/#` and the topic tree.
    #[arg(long = "mqtt-username", env = "THING_OPERATOR_MQTT_USERNAME")]
    pub username: Option<String>,
    /// File holding the admin password (never pass passwords on the command line).
    #[arg(long = "mqtt-password-file", env = "THING_OPERATOR_MQTT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// CA bundle to verify the broker's TLS certificate.
    #[arg(long = "mqtt-ca-file", env = "THING_OPERATOR_MQTT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Address devices use to reach the broker, written into their Secrets.
    #[arg(
        long = "mqtt-device-endpoint",
        env = "THING_OPERATOR_MQTT_DEVICE_ENDPOINT"
    )]
    pub device_endpoint: Option<String>,
    /// Root of the topic tree of the REST message broker.
    #[arg(
        long = "mqtt-topic-prefix",
        env = "THING_OPERATOR_MQTT_TOPIC_PREFIX",
        default_value = "things"
    )]
    pub topic_prefix: String,
    /// Extra topic prefix a namespace's Observers and Subscribers may use besides its own
    /// subtree `{prefix}/namespaces/{namespace}/`, as `namespace=prefix` (repeatable), e.g. for a
    /// bridge or a shared feed.
    #[arg(
        long = "mqtt-topic-grant",
        env = "THING_OPERATOR_MQTT_TOPIC_GRANTS",
        value_delimiter = ',',
        value_parser = parse_topic_grant
    )]
    pub topic_grants: Vec<(String, String)>,
    /// How often unused namespace connections (of Observer MQTT sinks and Subscriber MQTT
    /// sources) are looked for; one found unused twice in a row is closed.
    #[arg(long = "mqtt-idle-sweep", env = "THING_OPERATOR_MQTT_IDLE_SWEEP", value_parser = parse_duration, default_value = "60s")]
    pub idle_sweep: Duration,
    /// `host:port` of the broker's mTLS listener (`require_certificate` and
    /// `use_identity_as_username`). When set, every Mosquitto device also gets a certificate
    /// from the operator's device CA, next to its password.
    #[arg(
        long = "mqtt-device-tls-endpoint",
        env = "THING_OPERATOR_MQTT_DEVICE_TLS_ENDPOINT"
    )]
    pub device_tls_endpoint: Option<String>,
    /// Secret in the operator's namespace (POD_NAMESPACE) holding the device CA (`tls.crt`,
    /// `tls.key`); generated on first start when absent.
    #[arg(
        long = "ca-secret",
        env = "THING_OPERATOR_CA_SECRET",
        default_value = "thing-operator-ca"
    )]
    pub ca_secret: String,
}

/// `namespace=prefix`, as `--mqtt-topic-grant` takes it.
fn parse_topic_grant(s: &str) -> Result<(String, String), String> {
    let (namespace, prefix) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not namespace=prefix"))?;
    let prefix = prefix.trim_end_matches('/');
    if namespace.is_empty()
        || prefix.is_empty()
        || prefix.starts_with('$')
        || prefix.contains(['+', '#'])
    {
        return Err(format!(
            "{s:?}: needs a namespace and a literal topic prefix (no wildcards, no $-topics)"
        ));
    }
    Ok((namespace.to_string(), prefix.to_string()))
}

impl MqttArgs {
    /// Where Observers and Subscribers of each namespace may publish and subscribe.
    pub fn topic_scope(&self) -> crate::api::validation::TopicScope {
        let mut grants = std::collections::BTreeMap::<String, Vec<String>>::new();
        for (namespace, prefix) in &self.topic_grants {
            grants
                .entry(namespace.clone())
                .or_default()
                .push(prefix.clone());
        }
        crate::api::validation::TopicScope {
            prefix: self.topic_prefix.clone(),
            grants,
            unchecked: false,
        }
    }
}

/// A cluster id: 1-32 lowercase letters, digits and inner `-` (a DNS label, short enough to
/// leave room for the rest of a 128-character device name).
fn parse_cluster_id(s: &str) -> Result<String, String> {
    let ok = (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ok.then(|| s.to_string())
        .ok_or_else(|| format!("{s:?}: 1-32 lowercase letters, digits and inner '-'"))
}
