//! Helpers of the Azure integration tests, on top of `tests/common`: the operator pointed at the
//! test environment's IoT Hub double (tests/azure_double), a service client of the double that
//! signs its requests with the hub's policy key exactly as the operator does (to play "another
//! tool" that made a device, or an admin who deletes one), the double's test-only endpoints
//! (state, fault injection) and the device simulator, which writes reported properties the way
//! a device holding the Secret would.
#![allow(dead_code)]

use std::time::Duration;

use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use kube::{Api, Client, api::ListParams};
use serde_json::{Value, json};
use thing_operator::provider::azure::sas::ConnectionString;

use crate::common::{OperatorBuilder, Setup, TestEnv};

/// Every wait of these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(60);

pub async fn setup(prefix: &str) -> Setup {
    Setup::new(prefix).await.timeout(WAIT)
}

/// The Azure backend against the double, with fast polls.
pub fn azure(op: OperatorBuilder, env: &TestEnv) -> OperatorBuilder {
    op.args([
        "--azure-connection-string-file",
        &env.var("AZURE_CONNECTION_STRING_FILE"),
        "--azure-hub",
        &env.var("AZURE_HUB"),
        "--azure-endpoint",
        &env.var("AZURE_URL"),
        "--poll-interval",
        "1s",
        "--resync-interval",
        "2s",
        "--min-poll-interval",
        "1s",
        "--min-rotation-overlap",
        "1s",
    ])
}

/// The double, as a test sees it.
pub struct Hub {
    url: String,
    host: String,
    cs: ConnectionString,
    http: reqwest::Client,
}

impl Hub {
    pub fn new(env: &TestEnv) -> Hub {
        let text = std::fs::read_to_string(env.var("AZURE_CONNECTION_STRING_FILE")).unwrap();
        Hub {
            url: env.var("AZURE_URL"),
            host: env.var("AZURE_HUB"),
            cs: ConnectionString::parse(&text).unwrap(),
            http: reqwest::Client::new(),
        }
    }

    fn token(&self) -> String {
        self.cs
            .token_for(&self.host, chrono::Utc::now().timestamp() + 600)
            .unwrap()
    }

    fn api(&self, path: &str) -> String {
        format!("{}{path}?api-version=2021-04-12", self.url)
    }

    /// A service call signed with the hub policy; returns status and body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_with(method, path, if_match, body, Some(self.token()))
            .await
    }

    /// A service call with the given `Authorization` (or none).
    pub async fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<Value>,
        authorization: Option<String>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.api(path));
        if let Some(a) = authorization {
            req = req.header("Authorization", a);
        }
        if let Some(m) = if_match {
            req = req.header("If-Match", m);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// A device made by "another tool": SAS authentication, with `tags`.
    pub async fn create_foreign_device(&self, id: &str, tags: Value) {
        let (s, _) = self
            .call(
                reqwest::Method::PUT,
                &format!("/devices/{id}"),
                None,
                Some(json!({"deviceId": id, "authentication": {"type": "sas"}})),
            )
            .await;
        assert_eq!(s, 200, "create {id}");
        let (s, _) = self
            .call(
                reqwest::Method::PATCH,
                &format!("/twins/{id}"),
                Some("*"),
                Some(json!({ "tags": tags })),
            )
            .await;
        assert_eq!(s, 200, "tag {id}");
    }

    pub async fn delete_device(&self, id: &str) -> u16 {
        self.call(
            reqwest::Method::DELETE,
            &format!("/devices/{id}"),
            Some("*"),
            None,
        )
        .await
        .0
    }

    /// Everything the double holds (`devices`, `twins`, `requests`).
    pub async fn state(&self) -> Value {
        self.http
            .get(format!("{}/_double/state", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn device(&self, id: &str) -> Option<Value> {
        self.state().await["devices"].get(id).cloned()
    }

    pub async fn twin(&self, id: &str) -> Option<Value> {
        self.state().await["twins"].get(id).cloned()
    }

    /// Request counter `key`: `"GET /twins/<device id>"` (one device), `"GET /twins/{id}"`
    /// (all devices, shared with every test using the double), `"faulted"`.
    pub async fn requests(&self, key: &str) -> u64 {
        self.state().await["requests"][key].as_u64().unwrap_or(0)
    }

    /// The next `count` requests whose path contains `matching` answer `status`.
    pub async fn inject(&self, status: u16, count: u32, retry_after: Option<u32>, matching: &str) {
        let r = self
            .http
            .post(format!("{}/_double/faults", self.url))
            .json(&json!({"status": status, "count": count, "retryAfter": retry_after, "match": matching}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// How many injected faults matching `matching` are still to be served.
    pub async fn faults_left(&self, matching: &str) -> u64 {
        self.state().await["faults"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|f| f["match"] == matching)
                    .map(|f| f["count"].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The device simulator: reports `reported` as the device holding `cert_pem`.
    pub async fn report(&self, id: &str, cert_pem: &str, reported: Value) -> u16 {
        self.http
            .patch(format!("{}/_double/devices/{id}/reported", self.url))
            .header("x-device-cert", cert_pem.replace('\n', "\\n"))
            .json(&reported)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

impl Hub {
    /// The device simulator for a SAS device: reports `reported` with a device token signed
    /// with `key` (the way a device SDK holding the connection string would).
    pub async fn report_with_key(&self, id: &str, key: &str, reported: Value) -> u16 {
        let token = thing_operator::provider::azure::sas::token(
            &format!("{}/devices/{id}", self.host),
            None,
            &azure_core::credentials::Secret::new(key.to_string()),
            chrono::Utc::now().timestamp() + 600,
        )
        .unwrap();
        self.http
            .patch(format!("{}/_double/devices/{id}/reported", self.url))
            .header("Authorization", token)
            .json(&reported)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// The key of a device connection string (`...;SharedAccessKey=<key>`).
pub fn key_of(connection_string: &str) -> String {
    connection_string
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap_or_default()
        .to_string()
}

pub async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Option<std::collections::BTreeMap<String, String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(name).await.ok()??;
    Some(
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect(),
    )
}

/// Every Event of the namespace as `reason: note` lines.
pub async fn events(client: &Client, ns: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A workload identity as the test registers it at the double's Entra token endpoint: a
/// user-assigned managed identity (tenant, client id) whose federated credential accepts exactly
/// the content of `federated_token_file` (what the kubelet projects into the pod).
pub struct EntraApp {
    pub tenant: String,
    pub client_id: String,
    pub federated_token_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl EntraApp {
    /// A new app whose tokens live `expires_in` seconds; the federated token is random.
    pub async fn register(env: &TestEnv, expires_in: u64) -> EntraApp {
        let dir = tempfile::tempdir().unwrap();
        let federated_token_file = dir.path().join("azure-identity-token");
        std::fs::write(&federated_token_file, federated_token()).unwrap();
        let app = EntraApp {
            tenant: random_id(),
            client_id: random_id(),
            federated_token_file,
            _dir: dir,
        };
        let r = reqwest::Client::new()
            .post(format!("{}/_double/entra/apps", env.var("AZURE_URL")))
            .json(&json!({"tenant": app.tenant, "clientId": app.client_id,
                "federatedTokenFile": app.federated_token_file, "expiresIn": expires_in}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        app
    }

    /// The federated token the app accepts.
    pub fn federated_token(&self) -> String {
        std::fs::read_to_string(&self.federated_token_file).unwrap()
    }

    /// (token requests at the Entra double, hub requests its tokens authenticated).
    pub async fn counts(&self, hub: &Hub) -> (u64, u64) {
        let state = hub.state().await;
        let n = |k: &str| state["entra"][k][&self.client_id].as_u64().unwrap_or(0);
        (n("tokenRequests"), n("bearerRequests"))
    }
}

/// A random stand-in for a projected service-account token (a JWT's shape; the double compares
/// it byte for byte).
pub fn federated_token() -> String {
    format!("eyJhbGciOiJSUzI1NiJ9.{}.{}", random_id(), random_id())
}

/// A random id in the GUID format Entra uses for tenants and clients.
fn random_id() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The Azure backend against the double's TLS listener with Entra workload identity: the
/// environment the AKS webhook injects (client id, tenant, federated token file, authority host)
/// pointing at `app` and the double, which the operator trusts through `SSL_CERT_FILE` (the test
/// CA), the way a user trusts a private CA. `federated_token_file` is the file the operator reads.
pub fn azure_workload_identity(
    op: OperatorBuilder,
    env: &TestEnv,
    app: &EntraApp,
    federated_token_file: &std::path::Path,
) -> OperatorBuilder {
    op.args([
        "--azure-auth",
        "workload-identity",
        "--azure-hub",
        &env.var("AZURE_HUB"),
        "--azure-endpoint",
        &env.var("AZURE_TLS_URL"),
        "--poll-interval",
        "1s",
        "--resync-interval",
        "2s",
        "--min-poll-interval",
        "1s",
    ])
    .env("AZURE_CLIENT_ID", app.client_id.clone())
    .env("AZURE_TENANT_ID", app.tenant.clone())
    .env(
        "AZURE_FEDERATED_TOKEN_FILE",
        federated_token_file.display().to_string(),
    )
    .env("AZURE_AUTHORITY_HOST", env.var("AZURE_TLS_URL"))
    .env("SSL_CERT_FILE", env.var("AZURE_CA_FILE"))
}
