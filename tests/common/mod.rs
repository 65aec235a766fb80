//! Shared harness of the integration tests: the local test environment started by
//! `scripts/testenv.sh up`, one `Setup` per test (admin client, a namespace deleted on drop, a
//! builder for operator processes), a `thing()` builder, and bounded waits.
//!
//! ```ignore
//! let s = Setup::new("found").await;
//! let op = s.operator().aws().arg("--status-write-interval").arg("1s").ready().await;
//! let things = s.things();
//! thing("dev1").broker("AWS").desired(json!({"temp": 21})).create(&things).await;
//! let t = s.wait_ready(&things, "dev1").await;
//! let ready = s.wait_condition(&things, "dev1", "Ready", |c| c.reason == "Reconciled").await;
//! ```
#![allow(dead_code)]

pub mod bench;

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    ops::Deref,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{Json, Router, extract::State, routing::post};
use k8s_openapi::{NamespaceResourceScope, api::core::v1::Namespace};
use kube::{
    Api, Client, Config, Resource,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};
use thing_operator::api::{Condition, ConditionStatus, Thing};

/// How long a test waits for something that should happen, unless it says otherwise.
pub const WAIT: Duration = Duration::from_secs(60);

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

    /// A client from the kubeconfig named by the env variable `kubeconfig`.
    pub async fn client_from(&self, kubeconfig: &str) -> Client {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let kc = Kubeconfig::read_from(self.var(kubeconfig)).expect("kubeconfig readable");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid");
        Client::try_from(config).expect("client builds")
    }

    /// A client with cluster-admin rights (the test's own view).
    pub async fn admin_client(&self) -> Client {
        self.client_from("KUBECONFIG").await
    }

    /// A client with the operator's service-account token (what `deploy/rbac.yaml` grants).
    pub async fn operator_client(&self) -> Client {
        self.client_from("OPERATOR_KUBECONFIG").await
    }

    /// The Mosquitto admin account's password (the user is `MQTT_ADMIN_USER`).
    pub fn mqtt_admin_password(&self) -> String {
        std::fs::read_to_string(self.var("MQTT_ADMIN_PASSWORD_FILE"))
            .expect("Mosquitto admin password readable")
            .trim()
            .to_string()
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

/// What one test stands on: the environment, an admin client, a namespace of its own (deleted
/// when the `Setup` is dropped, also when the test fails), and operators started through
/// [`Setup::operator`]. Waits on objects are bounded by `timeout`.
pub struct Setup {
    pub env: TestEnv,
    pub client: Client,
    pub ns: TestNamespace,
    /// The bound of every `wait_*` of this `Setup`; [`WAIT`] unless set with [`Setup::timeout`].
    pub timeout: Duration,
}

impl Setup {
    /// Loads the environment and creates a namespace named `{prefix}-{random}`.
    pub async fn new(prefix: &str) -> Setup {
        let env = TestEnv::load();
        let client = env.admin_client().await;
        let ns = TestNamespace::create(&env, &client, prefix).await;
        Setup {
            env,
            client,
            ns,
            timeout: WAIT,
        }
    }

    /// The same `Setup` with another bound for its waits.
    pub fn timeout(mut self, timeout: Duration) -> Setup {
        self.timeout = timeout;
        self
    }

    /// An `Api` of kind `K` in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn things(&self) -> Api<Thing> {
        self.api()
    }

    /// A builder for an operator watching this namespace, with no backend configured.
    pub fn operator(&self) -> OperatorBuilder {
        OperatorBuilder::new(&self.env, &self.ns)
    }

    /// Polls `check` until it returns `Some`, at most `self.timeout`.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        wait_for(what, self.timeout, check).await
    }

    /// Waits until the object `name` exists and `check` holds on it; returns it.
    pub async fn wait_until<K>(
        &self,
        api: &Api<K>,
        name: &str,
        what: &str,
        check: impl Fn(&K) -> bool,
    ) -> K
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        wait_for(what, self.timeout, || async {
            let obj = api.get_opt(name).await.ok().flatten()?;
            check(&obj).then_some(obj)
        })
        .await
    }

    /// Waits until the object `name` has a condition `type_` that `accept` takes; returns it.
    /// `|_| true` waits for the condition to be there at all.
    pub async fn wait_condition<K>(
        &self,
        api: &Api<K>,
        name: &str,
        type_: &str,
        accept: impl Fn(&Condition) -> bool,
    ) -> Condition
    where
        K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
    {
        let what = format!("condition {type_} of {name}");
        let obj = self
            .wait_until(api, name, &what, |o| {
                condition(o, type_).is_some_and(|c| accept(&c))
            })
            .await;
        condition(&obj, type_).expect("the condition just seen")
    }

    /// Waits until the object `name` is Ready (condition `Ready` True); returns it.
    pub async fn wait_ready<K>(&self, api: &Api<K>, name: &str) -> K
    where
        K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
    {
        self.wait_until(api, name, &format!("{name} Ready"), is_ready)
            .await
    }

    /// Waits until the object `name` no longer exists.
    pub async fn wait_gone<K>(&self, api: &Api<K>, name: &str)
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        wait_for(&format!("{name} deleted"), self.timeout, || async {
            api.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await
    }

    /// Waits until `api` lists no object at all (e.g. after deleting every Thing).
    pub async fn wait_all_gone<K>(&self, api: &Api<K>)
    where
        K: Resource + Clone + DeserializeOwned + fmt::Debug,
    {
        wait_for("every object deleted", self.timeout, || async {
            api.list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await
    }
}

/// A namespace of one test. Dropping it asks the API server to delete it (without waiting, and
/// without failing: it also runs while a failed test unwinds).
pub struct TestNamespace {
    name: String,
    kubectl: String,
    kubeconfig: String,
}

impl TestNamespace {
    pub async fn create(env: &TestEnv, client: &Client, prefix: &str) -> TestNamespace {
        let api: Api<Namespace> = Api::all(client.clone());
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        TestNamespace {
            name,
            kubectl: env.var("KUBECTL"),
            kubeconfig: env.var("KUBECONFIG"),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Deref for TestNamespace {
    type Target = str;

    fn deref(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for TestNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous (Drop cannot await) and bounded (the API server may be the thing that failed).
        let _ = Command::new(&self.kubectl)
            .args(["delete", "namespace", &self.name])
            .args([
                "--wait=false",
                "--ignore-not-found",
                "--request-timeout=10s",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A `iot.thing-operator.dev/v1alpha1` object of `kind` with `spec`, e.g. `resource::<Observer>("Observer", "o", json!({..}))`.
pub fn resource<K: DeserializeOwned>(kind: &str, name: &str, spec: Value) -> K {
    serde_json::from_value(json!({
        "apiVersion": "iot.thing-operator.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap_or_else(|e| panic!("invalid {kind} {name}: {e}"))
}

/// Creates a [`resource`] of `api`'s kind (the test fails if the API server refuses it) and
/// returns it, e.g. `create_resource(&observers, "o1", json!({..}))`.
pub async fn create_resource<K>(api: &Api<K>, name: &str, spec: Value) -> K
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + fmt::Debug,
{
    let kind = K::kind(&());
    api.create(&PostParams::default(), &resource(&kind, name, spec))
        .await
        .unwrap_or_else(|e| panic!("{kind} {name} created: {e}"))
}

/// A Thing to build: `thing("lamp").broker("AWS").desired(json!({"on": true})).build()`.
pub fn thing(name: &str) -> ThingBuilder {
    ThingBuilder {
        name: name.to_string(),
        spec: Map::new(),
        labels: BTreeMap::new(),
    }
}

#[derive(Clone, Debug)]
pub struct ThingBuilder {
    name: String,
    spec: Map<String, Value>,
    labels: BTreeMap<String, String>,
}

impl ThingBuilder {
    /// `spec.broker`: "AWS", "Mosquitto", "Azure" (no backend in the tests).
    pub fn broker(self, broker: &str) -> Self {
        self.field("broker", json!(broker))
    }

    /// `spec.desired`.
    pub fn desired(self, desired: Value) -> Self {
        self.field("desired", desired)
    }

    /// Every top-level field of `spec` (a JSON object) into the spec.
    pub fn spec(mut self, spec: Value) -> Self {
        let Value::Object(fields) = spec else {
            panic!("a Thing spec is a JSON object: {spec}");
        };
        self.spec.extend(fields);
        self
    }

    /// One field of the spec.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.spec.insert(key.to_string(), value);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn build(self) -> Thing {
        let mut t: Thing = resource("Thing", &self.name, Value::Object(self.spec));
        if !self.labels.is_empty() {
            t.metadata.labels = Some(self.labels);
        }
        t
    }

    /// Creates the Thing (the test fails if the API server refuses it) and returns it.
    pub async fn create(self, api: &Api<Thing>) -> Thing {
        let name = self.name.clone();
        api.create(&PostParams::default(), &self.build())
            .await
            .unwrap_or_else(|e| panic!("Thing {name} created: {e}"))
    }
}

/// The condition `type_` of any kind's status (read through its JSON, so Things, Observers and
/// Subscribers alike).
pub fn condition<K: Serialize>(obj: &K, type_: &str) -> Option<Condition> {
    let obj = serde_json::to_value(obj).ok()?;
    obj.get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
}

/// Whether the object's `Ready` condition is True.
pub fn is_ready<K: Serialize>(obj: &K) -> bool {
    condition(obj, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
}

/// A merge patch of the object `name`.
pub async fn merge_patch<K>(api: &Api<K>, name: &str, patch: Value) -> K
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("{name} patched: {e}"))
}

/// What an [`http_receiver`] was sent: every JSON body, in order.
pub type Received = Arc<Mutex<Vec<Value>>>;

/// A local HTTP endpoint that records every JSON body (an Observer's CloudEvent) POSTed to it;
/// returns its URL.
pub async fn http_receiver() -> (String, Received) {
    async fn collect(State(r): State<Received>, Json(body): Json<Value>) -> &'static str {
        r.lock().unwrap().push(body);
        "ok"
    }
    let received: Received = Arc::default();
    let url = serve_webhook(post(collect).with_state(received.clone())).await;
    (url, received)
}

/// Serves `handler` on a loopback port for the rest of the test; returns its URL.
pub async fn serve_webhook(handler: axum::routing::MethodRouter) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let app = Router::new().route("/events", handler);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
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

/// How to start an operator watching one namespace: backends, flags, environment, binary. Kept
/// after `start`, so the same operator can be started again (after a crash, a kill).
#[derive(Clone, Debug)]
pub struct OperatorBuilder {
    env: TestEnv,
    namespace: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    failpoints_binary: bool,
    /// Watch every namespace instead of the test's own (tests about tenants, which are
    /// namespaces). Two such operators must never run at once.
    cluster_wide: bool,
}

impl OperatorBuilder {
    pub fn new(env: &TestEnv, namespace: &str) -> OperatorBuilder {
        OperatorBuilder {
            env: env.clone(),
            namespace: namespace.to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            failpoints_binary: false,
            cluster_wide: false,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.envs.push((key.to_string(), value.into()));
        self
    }

    /// The AWS backend against the test environment's moto, with fast polls so the tests need
    /// not wait long.
    pub fn aws(self) -> Self {
        self.aws_resync("2s")
    }

    /// [`Self::aws`] with full drift checks every `resync` instead of every 2 s.
    pub fn aws_resync(self, resync: &str) -> Self {
        let moto = self.env.var("MOTO_URL");
        self.args([
            "--aws",
            "--aws-region",
            "us-east-1",
            "--aws-iot-endpoint",
            &moto,
            "--aws-data-endpoint",
            &moto,
            "--aws-device-endpoint",
            "device.example.com:8883",
            "--poll-interval",
            "1s",
            "--resync-interval",
            resync,
            "--aws-orphan-grace",
            "2s",
            // The tests poll and rotate fast; production floors are 10s and 1m.
            "--min-poll-interval",
            "1s",
            "--min-rotation-overlap",
            "1s",
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // moto has no MQTT endpoint: the push channel is tested on its own (tests/aws_push.rs),
        // which turns it on with `--aws-push auto` (a flag beats this variable).
        .env("THING_OPERATOR_AWS_PUSH", "off")
    }

    /// The Mosquitto backend (and MQTT for Observers and Subscribers) on the test broker, as its
    /// admin, under the topic prefix `prefix`.
    pub fn mqtt(self, prefix: &str) -> Self {
        let (url, user, password_file) = (
            self.env.var("MQTT_URL"),
            self.env.var("MQTT_ADMIN_USER"),
            self.env.var("MQTT_ADMIN_PASSWORD_FILE"),
        );
        self.args([
            "--mqtt-url",
            &url,
            "--mqtt-username",
            &user,
            "--mqtt-password-file",
            &password_file,
            "--mqtt-topic-prefix",
            prefix,
        ])
    }

    /// Leader election on the Lease `name` in the operator's namespace, with a short lease so
    /// failover tests need not wait long.
    pub fn leader_elect(self, lease: &str) -> Self {
        self.args([
            "--leader-elect",
            "--lease-name",
            lease,
            "--lease-duration",
            "4s",
            "--lease-namespace",
            "thing-operator-system",
        ])
    }

    /// Watches every namespace (see the field's docs).
    pub fn cluster_wide(mut self) -> Self {
        self.cluster_wide = true;
        self
    }

    /// Runs a private copy of the binary under test, checked to have the `failpoints` feature
    /// (see [`failpoints_binary`]).
    pub fn failpoints_binary(mut self) -> Self {
        self.failpoints_binary = true;
        self
    }

    /// `FAILPOINTS=<spec>`, e.g. `aws-after-create-thing=return` (exits the process like a crash
    /// when reached); runs the failpoints binary.
    pub fn failpoint(self, spec: &str) -> Self {
        self.failpoints_binary().env("FAILPOINTS", spec)
    }

    /// Starts the process and returns at once.
    pub fn start(&self) -> OperatorProcess {
        let http_port = free_port();
        let log_dir = self.env.dir.join("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log_path = log_dir.join(format!("operator-{}-{http_port}.log", self.namespace));
        let log = std::fs::File::create(&log_path).unwrap();
        // `THING_OPERATOR_BENCH_BIN` runs another build of the operator (benchmarks measure a
        // release build from a debug test harness); never for failpoint tests.
        let other = std::env::var_os("THING_OPERATOR_BENCH_BIN").map(PathBuf::from);
        let binary = match (&other, self.failpoints_binary) {
            (_, true) => failpoints_binary(),
            (Some(other), false) => other.as_path(),
            (None, false) => Path::new(env!("CARGO_BIN_EXE_thing-operator")),
        };
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"));
        if !self.cluster_wide {
            cmd.arg("--watch-namespace").arg(&self.namespace);
        }
        cmd.args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", self.env.var("OPERATOR_KUBECONFIG"))
            .env("RUST_LOG", "info,thing_operator=debug,kube_runtime=warn")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("operator starts");
        OperatorProcess {
            child: Some(child),
            http_port,
            log_path,
        }
    }

    /// Starts the process and waits until it answers /readyz.
    pub async fn ready(&self) -> OperatorProcess {
        let op = self.start();
        op.wait_ready().await;
        op
    }
}

/// The binary under test (`CARGO_BIN_EXE_thing-operator`, i.e. this build's), copied once per
/// test process: a concurrent `cargo build` without the `failpoints` feature writes the same
/// path, and an operator without failpoints never crashes where it is told to. Panics when the
/// binary has no failpoints.
pub fn failpoints_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_BIN_EXE_thing-operator"));
        let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("thing-operator-failpoints-{}", std::process::id()));
        std::fs::copy(&src, &dst).expect("copy the operator binary");
        let bytes = std::fs::read(&dst).expect("read the operator binary");
        let marker = b"exiting like a crash";
        assert!(
            bytes.windows(marker.len()).any(|w| w == marker),
            "{} was built without the failpoints feature (a concurrent build?); rerun with --features failpoints",
            src.display()
        );
        dst
    })
}

/// One operator process, run with the service account's RBAC, watching one namespace. Killed
/// when dropped.
pub struct OperatorProcess {
    child: Option<Child>,
    pub http_port: u16,
    pub log_path: PathBuf,
}

impl OperatorProcess {
    /// The process id while it runs (benchmarks read its memory and CPU from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits (at most `timeout`) for the process to exit by itself; returns its exit code.
    pub async fn wait_exit(&mut self, what: &str, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("the operator was started");
        wait_for(what, timeout, || {
            let status = child.try_wait().ok().flatten();
            async move { status.map(|s| s.code()) }
        })
        .await
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

/// A TCP relay to `upstream` (`host:port`) that a test can cut: every relayed connection closes,
/// and the port refuses new ones until the relay opens again. Cutting a shared broker itself
/// would disconnect every other test.
pub struct Relay {
    pub port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn open(upstream: impl Into<String>) -> Relay {
        let mut relay = Relay {
            port: free_port(),
            upstream: upstream.into(),
            task: None,
        };
        relay.reopen().await;
        relay
    }

    pub async fn reopen(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task on a cut: every relayed connection closes with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    pub fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}
