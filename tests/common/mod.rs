//! Shared harness of the integration tests: the local test environment started by
//! `scripts/testenv.sh up`, an operator process per test, and bounded waits.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// Where the environment's `env` file lives: $THING_OPERATOR_TESTENV or `<repo>/.testenv`.
pub fn testenv_dir() -> PathBuf {
    std::env::var_os("THING_OPERATOR_TESTENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".testenv"))
}

/// The running test environment, read from its `env` file.
#[derive(Clone, Debug)]
pub struct TestEnv {
    pub dir: PathBuf,
    pub vars: BTreeMap<String, String>,
}

impl TestEnv {
    pub fn load() -> TestEnv {
        let dir = testenv_dir();
        let text = std::fs::read_to_string(dir.join("env")).unwrap_or_else(|e| {
            panic!(
                "no test environment at {} ({e}); start it with `scripts/testenv.sh up` or run `scripts/test.sh`",
                dir.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TestEnv { dir, vars }
    }

    pub fn var(&self, key: &str) -> String {
        self.vars
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("test env has no {key}"))
    }

    pub async fn client_from(&self, kubeconfig: &str) -> Client {
        let kc = Kubeconfig::read_from(self.var(kubeconfig)).expect("kubeconfig readable");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid");
        Client::try_from(config).expect("client builds")
    }

    /// A client with cluster-admin rights (the test's own view).
    pub async fn admin_client(&self) -> Client {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        self.client_from("KUBECONFIG").await
    }

    /// Runs `scripts/testenv.sh CMD DIR` (restart-apiserver, restart-mosquitto, ...).
    pub fn script(&self, cmd: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testenv.sh");
        let status = Command::new("bash")
            .arg(script)
            .arg(cmd)
            .arg(&self.dir)
            .status()
            .expect("testenv.sh runs");
        assert!(status.success(), "testenv.sh {cmd} failed");
    }

    /// Runs the control plane's kubectl as admin and returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(self.var("KUBECTL"))
            .args(args)
            .env("KUBECONFIG", self.var("KUBECONFIG"))
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A `iot.thing-operator.dev/v1alpha1` object of `kind` with `spec`, e.g. `resource::<Thing>("Thing", "t1", json!({..}))`.
pub fn resource<K: serde::de::DeserializeOwned>(
    kind: &str,
    name: &str,
    spec: serde_json::Value,
) -> K {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "iot.thing-operator.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("invalid {kind} {name}: {e}"))
}

/// Waits until the object has a `Ready` condition (any status) and returns it.
pub async fn wait_ready_condition<K>(
    api: &kube::Api<K>,
    name: &str,
    timeout: Duration,
) -> thing_operator::api::Condition
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + serde::Serialize,
{
    wait_for(&format!("Ready condition on {name}"), timeout, || async {
        let obj = serde_json::to_value(api.get(name).await.ok()?).ok()?;
        let conditions = obj.get("status")?.get("conditions")?.as_array()?.clone();
        conditions
            .into_iter()
            .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
            .and_then(|c| serde_json::from_value(c).ok())
    })
    .await
}

/// A namespace of its own for one test, deleted on drop (best effort).
pub async fn create_namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let name = format!("{prefix}-{:08x}", rand::random::<u32>());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

pub async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns `Some`, at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One operator process, run with the service account's RBAC, watching one namespace.
pub struct OperatorProcess {
    child: Option<Child>,
    pub http_port: u16,
    pub log_path: PathBuf,
}

impl OperatorProcess {
    pub fn start(
        env: &TestEnv,
        namespace: &str,
        extra_args: &[&str],
        extra_env: &[(&str, String)],
    ) -> Self {
        let http_port = free_port();
        let log_dir = env.dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log_path = log_dir.join(format!("operator-{namespace}-{http_port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thing-operator"));
        cmd.arg("run")
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--watch-namespace")
            .arg(namespace)
            .args(extra_args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", env.var("OPERATOR_KUBECONFIG"))
            .env("RUST_LOG", "info,thing_operator=debug,kube_runtime=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("operator starts");
        OperatorProcess {
            child: Some(child),
            http_port,
            log_path,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// GET on the operator's HTTP server; `None` when it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{}", self.http_port, path);
        let resp = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.text().await.ok()?))
    }

    pub async fn wait_ready(&self) {
        wait_for("operator /readyz", Duration::from_secs(60), || async {
            matches!(self.get("/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }

    /// Sum of a Prometheus counter over all label sets whose labels contain every `filter`.
    pub async fn metric(&self, name: &str, filters: &[&str]) -> f64 {
        let (_, body) = self.get("/metrics").await.expect("metrics served");
        body.lines()
            .filter(|l| {
                l.starts_with(name)
                    && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
            })
            .filter(|l| filters.iter().all(|f| l.contains(f)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL: a crash at whatever point the operator is.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
