//! AWS backend benchmark against the local test environment (moto + kube-apiserver). Prints
//! numbers; it is not a timed test.
//!
//!   bash scripts/testenv.sh up
//!   cargo build --release && cargo run --release --example aws_bench -- [THINGS] [CONCURRENCY] [POLL_SECONDS]
//!
//! 1. The floor: a bare SDK loop making the calls one device needs (CreateThing, CreatePolicy,
//!    RegisterCertificateWithoutCA, AttachPolicy, AttachThingPrincipal, UpdateThingShadow,
//!    GetThingShadow), CONCURRENCY devices at a time.
//! 2. The operator (target/debug/thing-operator, the same concurrency, rate limits scaled out of
//!    the way because moto has none): THINGS Things applied at once; seconds until all are Ready,
//!    cloud calls and status writes per Thing, peak RSS and CPU seconds of the process.
//! 3. Idle: cloud calls and status writes per idle Thing per poll interval, with the push channel
//!    up (a Mosquitto of the benchmark's own stands in for the AWS IoT endpoint, as in
//!    tests/aws_push.rs), and the same as calls per Thing per minute (issue 11's target: <= 0.1).
//!    `BENCH_PUSH=off` runs the operator without the push channel instead. The drift check
//!    (one full check and one shadow read per Thing per `--aws-push-drift-interval`, 1 h by
//!    default) falls outside a short window: `BENCH_PUSH_DRIFT=SECONDS` sets the drift and
//!    resync intervals to SECONDS so that the window measures one drift check per Thing, and
//!    prints what that costs per minute at the default interval.
//! 4. Deletion of all of them: seconds, cloud calls per Thing, and the ratio to the floor's
//!    teardown (DetachPolicy, DetachThingPrincipal, UpdateCertificate, DeleteCertificate,
//!    DeletePolicy, DeleteThingShadow, DeleteThing per device, with moto's DeleteCertificate race
//!    retried the same way the operator retries it).
//!
//! The operator binary is the one of the benchmark's own profile:
//! `$CARGO_TARGET_DIR/{release,debug}/thing-operator` (default `target/`), so build it first
//! with the same profile.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

#[path = "../tests/common/bench.rs"]
mod bench;
use bench::{FleetWatch, load_average, proc_usage};
use thing_operator::{api::Thing, credentials::pki};

fn load_env(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(dir.join("env"))
        .context("no test environment: run scripts/testenv.sh up")?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn var(env: &BTreeMap<String, String>, k: &str) -> anyhow::Result<String> {
    env.get(k)
        .cloned()
        .with_context(|| format!("test env has no {k}"))
}

fn iot(moto: &str) -> aws_sdk_iot::Client {
    let conf = aws_sdk_iot::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "bench"))
        .endpoint_url(moto)
        .build();
    aws_sdk_iot::Client::from_conf(conf)
}

fn data(moto: &str) -> aws_sdk_iotdataplane::Client {
    let conf = aws_sdk_iotdataplane::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_iotdataplane::config::Credentials::new(
            "testing", "testing", None, None, "bench",
        ))
        .endpoint_url(moto)
        .build();
    aws_sdk_iotdataplane::Client::from_conf(conf)
}

/// One device the way a script would do it: no reads, no retries, no Secret.
async fn floor_device(
    iot: &aws_sdk_iot::Client,
    data: &aws_sdk_iotdataplane::Client,
    name: &str,
) -> anyhow::Result<String> {
    iot.create_thing().thing_name(name).send().await?;
    let policy = format!("{name}-policy");
    let doc = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iot:Connect", "Resource": format!("arn:aws:iot:us-east-1:123456789012:client/{name}")}]});
    iot.create_policy()
        .policy_name(&policy)
        .policy_document(doc.to_string())
        .send()
        .await?;
    let creds = pki::generate_self_signed(name, 365)?;
    let cert = iot
        .register_certificate_without_ca()
        .certificate_pem(creds.certificate_pem)
        .status(aws_sdk_iot::types::CertificateStatus::Active)
        .send()
        .await?;
    let arn = cert.certificate_arn().unwrap_or_default().to_string();
    iot.attach_policy()
        .policy_name(&policy)
        .target(&arn)
        .send()
        .await?;
    iot.attach_thing_principal()
        .thing_name(name)
        .principal(&arn)
        .send()
        .await?;
    let payload = json!({"state": {"desired": {"n": 1}}}).to_string();
    data.update_thing_shadow()
        .thing_name(name)
        .payload(aws_smithy_types::Blob::new(payload))
        .send()
        .await?;
    data.get_thing_shadow().thing_name(name).send().await?;
    Ok(cert.certificate_id().unwrap_or_default().to_string())
}

/// Returns the number of calls it made.
async fn floor_cleanup(
    iot: &aws_sdk_iot::Client,
    data: &aws_sdk_iotdataplane::Client,
    name: &str,
    cert_id: &str,
) -> usize {
    let mut calls = 6;
    let arn = format!("arn:aws:iot:us-east-1:123456789012:cert/{cert_id}");
    let policy = format!("{name}-policy");
    let _ = iot
        .detach_policy()
        .policy_name(&policy)
        .target(&arn)
        .send()
        .await;
    let _ = iot
        .detach_thing_principal()
        .thing_name(name)
        .principal(&arn)
        .send()
        .await;
    let _ = iot
        .update_certificate()
        .certificate_id(cert_id)
        .new_status(aws_sdk_iot::types::CertificateStatus::Inactive)
        .send()
        .await;
    // moto answers 500 when another request mutates its principals meanwhile: retry a little.
    for _ in 0..10 {
        calls += 1;
        if iot
            .delete_certificate()
            .certificate_id(cert_id)
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = iot.delete_policy().policy_name(&policy).send().await;
    let _ = data.delete_thing_shadow().thing_name(name).send().await;
    let _ = iot.delete_thing().thing_name(name).send().await;
    calls
}

async fn metrics(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn metric_sum(body: &str, name: &str, filters: &[&str]) -> f64 {
    body.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `name`'s values by the value of `label`, e.g. cloud calls by operation.
fn metric_by(body: &str, name: &str, label: &str, filters: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for l in body.lines().filter(|l| {
        l.starts_with(name)
            && l[name.len()..].starts_with('{')
            && filters.iter().all(|f| l.contains(f))
    }) {
        let value = l.split(&key).nth(1).and_then(|r| r.split('"').next());
        let n = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(value), Some(n)) = (value, n) {
            *out.entry(value.to_string()).or_default() += n;
        }
    }
    out
}

/// Per Thing, the calls of each operation that grew between two metric bodies.
fn per_thing(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, n: usize) -> String {
    after
        .iter()
        .map(|(op, v)| (op, v - before.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .map(|(op, d)| format!("{op} {:.2}", d / n as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Mosquitto standing in for the AWS IoT endpoint: TLS with the test CA's server certificate,
/// anonymous clients (see docs/aws.md, "Push channel"). Stopped when dropped.
struct StandIn(Child);

impl StandIn {
    fn start(dir: &Path) -> anyhow::Result<(StandIn, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let certs = dir.join("mosquitto");
        let conf = dir.join(format!("bench-standin-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "allow_anonymous true\npersistence false\nlistener {port} 127.0.0.1\n\
                 cafile {c}/ca.crt\ncertfile {c}/server.crt\nkeyfile {c}/server.key\n",
                c = certs.display()
            ),
        )?;
        let log =
            std::fs::File::create(dir.join("logs").join(format!("bench-standin-{port}.log")))?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting mosquitto")?;
        Ok((StandIn(child), port))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let concurrency: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(16);
    // Long enough that polling Ready Things does not crowd out provisioning against moto, whose
    // single Python process serves a few hundred calls per second at best.
    let poll: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(60);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("THING_OPERATOR_TESTENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".testenv"));
    let env = load_env(&dir)?;
    let moto = var(&env, "MOTO_URL")?;
    let kc = Kubeconfig::read_from(var(&env, "KUBECONFIG")?)?;
    let client =
        Client::try_from(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)?;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xffffff);
    let (iot, data) = (iot(&moto), data(&moto));
    let load = load_average();
    println!(
        "AWS backend benchmark: {n} Things, concurrency {concurrency}, poll {poll}s, moto at {moto}, load {load}"
    );

    // 1. Floor.
    let started = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("floor-{tag}-{i}")).collect();
    let results: Vec<_> = stream::iter(names.iter())
        .map(|name| {
            let (iot, data) = (iot.clone(), data.clone());
            async move {
                floor_device(&iot, &data, name)
                    .await
                    .map(|id| (name.clone(), id))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let floor_secs = started.elapsed().as_secs_f64();
    let load = load_average();
    println!("  (load {})", load.trim());
    let floor_ok: Vec<(String, String)> = results.into_iter().filter_map(Result::ok).collect();
    println!(
        "floor: {} devices in {floor_secs:.1}s ({} calls per device)",
        floor_ok.len(),
        8
    );
    let started = Instant::now();
    let floor_delete_calls: usize = stream::iter(floor_ok.iter())
        .map(|(name, id)| {
            let (iot, data) = (iot.clone(), data.clone());
            async move { floor_cleanup(&iot, &data, name, id).await }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .sum();
    let floor_delete_secs = started.elapsed().as_secs_f64();
    println!(
        "floor teardown: {} devices in {floor_delete_secs:.1}s ({:.1} calls per device)",
        floor_ok.len(),
        floor_delete_calls as f64 / floor_ok.len().max(1) as f64
    );

    // 2. The operator.
    let ns = format!("aws-bench-{tag}");
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        })
        .join("thing-operator");
    let log = std::fs::File::create(dir.join("logs").join(format!("operator-{ns}.log")))?;
    let push = std::env::var("BENCH_PUSH").as_deref() != Ok("off");
    let (_standin, push_args) = if push {
        let (standin, port) = StandIn::start(&dir)?;
        let args = vec![
            "--aws-push".to_string(),
            "auto".into(),
            "--aws-push-url".into(),
            format!("mqtts://127.0.0.1:{port}"),
            "--aws-push-ca-file".into(),
            dir.join("mosquitto/ca.crt").display().to_string(),
            "--aws-push-secret".into(),
            format!("{ns}-push"),
            // Its own policy and client id (thing names get the prefix too).
            "--cluster-id".into(),
            format!("b{tag}"),
        ];
        let args = match std::env::var("BENCH_PUSH_DRIFT").ok() {
            Some(secs) => [
                args,
                vec![
                    "--aws-push-drift-interval".into(),
                    format!("{secs}s"),
                    "--resync-interval".into(),
                    format!("{secs}s"),
                ],
            ]
            .concat(),
            None => args,
        };
        (Some(standin), args)
    } else {
        (None, vec!["--aws-push".to_string(), "off".into()])
    };
    let child = Command::new(&bin)
        .args([
            "run",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--watch-namespace",
            &ns,
        ])
        .args([
            "--aws",
            "--aws-region",
            "us-east-1",
            "--aws-iot-endpoint",
            &moto,
            "--aws-data-endpoint",
            &moto,
        ])
        .args([
            "--aws-device-endpoint",
            "device.example.com:8883",
            "--aws-rate-multiplier",
            "1000",
        ])
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--poll-interval",
            &format!("{poll}s"),
        ])
        .args(&push_args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", var(&env, "OPERATOR_KUBECONFIG")?)
        .env("RUST_LOG", "warn")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let _op = Operator(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        if Instant::now() > deadline {
            bail!("operator not ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With the channel up before the Things exist, each is covered from its first reconcile.
    while push
        && metric_sum(
            &metrics(port).await,
            "thing_operator_mqtt_connected",
            &["connection=\"aws-push\""],
        ) != 1.0
    {
        if Instant::now() > deadline {
            bail!("push channel not up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let things: Api<Thing> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(32, |i| {
            let things = things.clone();
            async move {
                let t: Thing = serde_json::from_value(json!({
                    "apiVersion": "iot.thing-operator.dev/v1alpha1", "kind": "Thing",
                    "metadata": {"name": format!("t{i}")},
                    "spec": {"broker": "AWS", "attributes": {"i": i.to_string()}, "desired": {"n": 1}}
                }))
                .expect("valid Thing");
                if let Err(e) = things.create(&PostParams::default(), &t).await {
                    eprintln!("create t{i}: {e}");
                }
            }
        })
        .await;
    let applied = started.elapsed().as_secs_f64();
    let fleet = FleetWatch::start(&things);
    fleet
        .until(Duration::from_secs(3600), "all Ready", |things| {
            things.len() == n
                && things.iter().all(|t| {
                    t.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.is_true("Ready"))
                })
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let op_secs = started.elapsed().as_secs_f64();
    let body = metrics(port).await;
    let calls = metric_sum(
        &body,
        "thing_operator_backend_calls_total",
        &["backend=\"aws\""],
    );
    let writes = metric_sum(
        &body,
        "thing_operator_status_writes_total",
        &["kind=\"Thing\""],
    );
    let (rss, cpu) = proc_usage(pid);
    let by_op = |body: &str| {
        metric_by(
            body,
            "thing_operator_backend_calls_total",
            "operation",
            &["backend=\"aws\""],
        )
    };
    let reconciles =
        |body: &str| metric_sum(body, "thing_operator_reconciles_total", &["kind=\"Thing\""]);
    let load = load_average();
    println!(
        "operator: {n} Things applied in {applied:.1}s, all Ready after {op_secs:.1}s (load {})",
        load.trim()
    );
    println!(
        "  per Thing: {}; {:.2} reconciles",
        per_thing(&BTreeMap::new(), &by_op(&body), n),
        reconciles(&body) / n as f64
    );
    println!(
        "  cloud calls per Thing {:.1}, status writes per Thing {:.2}, peak RSS {rss:.0} MiB, CPU {cpu:.1}s",
        calls / n as f64,
        writes / n as f64
    );
    println!(
        "  ratio operator time / floor time: {:.2}; calls per Thing operator / floor: {:.2}",
        op_secs / floor_secs.max(0.001),
        calls / n as f64 / 8.0
    );

    // 3. Idle: one poll interval with nothing changing.
    let body = metrics(port).await;
    let calls0 = metric_sum(
        &body,
        "thing_operator_backend_calls_total",
        &["backend=\"aws\""],
    );
    let writes0 = metric_sum(
        &body,
        "thing_operator_status_writes_total",
        &["kind=\"Thing\""],
    );
    tokio::time::sleep(Duration::from_secs(poll)).await;
    let body = metrics(port).await;
    let idle_calls = metric_sum(
        &body,
        "thing_operator_backend_calls_total",
        &["backend=\"aws\""],
    ) - calls0;
    let idle_writes = metric_sum(
        &body,
        "thing_operator_status_writes_total",
        &["kind=\"Thing\""],
    ) - writes0;
    let push_up = metric_sum(
        &body,
        "thing_operator_mqtt_connected",
        &["connection=\"aws-push\""],
    ) == 1.0;
    println!(
        "idle: {:.2} cloud calls and {:.3} status writes per Thing per {poll}s poll interval",
        idle_calls / n as f64,
        idle_writes / n as f64
    );
    println!(
        "  push channel {}: {:.3} cloud calls per Thing per minute",
        if push_up { "up" } else { "down/off" },
        idle_calls / n as f64 / (poll as f64 / 60.0)
    );
    if let Some(drift) = std::env::var("BENCH_PUSH_DRIFT")
        .ok()
        .and_then(|d| d.parse::<f64>().ok())
    {
        // A Thing is looked at every max(poll, drift) seconds while the channel is up.
        let checks = poll as f64 / drift.max(poll as f64);
        let per_check = idle_calls / n as f64 / checks;
        println!(
            "  drift check: {per_check:.2} cloud calls per Thing; at the default 1h drift interval {:.3} per Thing per minute",
            per_check / 60.0
        );
    }

    // 4. Deletion.
    let calls_before_delete = metric_sum(
        &metrics(port).await,
        "thing_operator_backend_calls_total",
        &["backend=\"aws\""],
    );
    let ops_before_delete = by_op(&metrics(port).await);
    let started = Instant::now();
    things
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    fleet
        .until(Duration::from_secs(3600), "all deleted", |things| {
            things.is_empty()
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let delete_secs = started.elapsed().as_secs_f64();
    let load = load_average();
    println!("  (load after deletion {})", load.trim());
    let body = metrics(port).await;
    let delete_calls = metric_sum(
        &body,
        "thing_operator_backend_calls_total",
        &["backend=\"aws\""],
    ) - calls_before_delete;
    println!(
        "  deletion per Thing: {}",
        per_thing(&ops_before_delete, &by_op(&body), n)
    );
    println!(
        "deletion: all {n} Things and their cloud resources gone after {delete_secs:.1}s, {:.1} cloud calls per Thing",
        delete_calls / n as f64
    );
    println!(
        "  ratio operator deletion time / floor teardown time: {:.2}; calls per Thing operator / floor: {:.2}",
        delete_secs / floor_delete_secs.max(0.001),
        delete_calls
            / n as f64
            / (floor_delete_calls as f64 / floor_ok.len().max(1) as f64).max(1.0)
    );
    let (rss, cpu) = proc_usage(pid);
    println!("operator totals: peak RSS {rss:.0} MiB, CPU {cpu:.1}s");
    let _ = nss.delete(&ns, &DeleteParams::default()).await;
    Ok(())
}
