//! BrokerConnection: an Observer sink and a Subscriber source on a second Mosquitto that the
//! operator does not manage (started here, with a password file), sharing one session; a wrong
//! password, a Secret of another namespace and an inward URL each give a condition and an
//! Event, and no password anywhere; a broker that goes away and comes back is reconnected to
//! and traffic resumes.

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{Setup, TestNamespace, condition, create_resource, free_port, merge_patch, thing};
use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use rumqttc::{AsyncClient, Event as MqttEvent, Incoming, MqttOptions, Publish, QoS};
use serde_json::{Value, json};
use thing_operator::api::{BrokerConnection, Observer, Subscriber};
use tokio::sync::mpsc;

const TENANT_PASSWORD: &str = "tenant-pw-9f3c1e";
const WATCHER_PASSWORD: &str = "watcher-pw-77ab";
const OPT_IN: &str = "iot.thing-operator.dev/broker-credentials";

/// A Mosquitto of the test's own: a password file with the users `tenant` and `watcher`, on a
/// free loopback port, logging connections to a file the test reads. Killed on drop.
struct SecondBroker {
    dir: PathBuf,
    port: u16,
    /// With [`SecondBroker::start_with_tls`]: a listener that requires a client certificate
    /// signed by `dir/ca.crt`, serving a certificate for `localhost`.
    tls_port: Option<u16>,
    child: Option<Child>,
}

/// Runs openssl in `dir`; panics when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and a client certificate, as PEM files in `dir`.
fn make_pki(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca = [
        &ec[..],
        &[
            "-x509",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=second-broker-ca",
        ],
    ]
    .concat();
    openssl(dir, &[&["req"][..], &ca].concat());
    for (name, ext) in [
        (
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, crt, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).unwrap();
        let subject = format!("/CN=second-broker-{name}");
        openssl(
            dir,
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
        );
    }
}

impl SecondBroker {
    fn start() -> SecondBroker {
        Self::start_with(false)
    }

    fn start_with_tls() -> SecondBroker {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> SecondBroker {
        let dir = std::env::temp_dir().join(format!("second-broker-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        for (i, (user, password)) in [("tenant", TENANT_PASSWORD), ("watcher", WATCHER_PASSWORD)]
            .into_iter()
            .enumerate()
        {
            let mut cmd = Command::new("mosquitto_passwd");
            if i == 0 {
                cmd.arg("-c");
            }
            let ok = cmd
                .args(["-b", passwd.to_str().unwrap(), user, password])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("mosquitto_passwd runs")
                .success();
            assert!(ok, "mosquitto_passwd failed");
        }
        let port = free_port();
        let mut conf = format!(
            "per_listener_settings false\nallow_anonymous false\nlistener {port} 127.0.0.1\n\
             password_file {}\npersistence false\nlog_dest file {}\nlog_type all\n\
             connection_messages true\nsys_interval 1\n",
            passwd.display(),
            dir.join("broker.log").display()
        );
        let tls_port = tls.then(|| {
            make_pki(&dir);
            let tls_port = free_port();
            let file = |f: &str| dir.join(f).display().to_string();
            conf.push_str(&format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\n",
                file("ca.crt"),
                file("server.crt"),
                file("server.key")
            ));
            tls_port
        });
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        // Run as root, Mosquitto drops to the `mosquitto` user, which must read its files.
        let _ = Command::new("chown")
            .args(["-R", "mosquitto", dir.to_str().unwrap()])
            .status();
        let mut broker = SecondBroker {
            dir,
            port,
            tls_port,
            child: None,
        };
        broker.launch();
        broker
    }

    /// Starts (again) on the same port; returns once it accepts connections.
    fn launch(&mut self) {
        // Its log goes to a file (flushed per line, unlike a redirected stdout).
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let last = self.tls_port.unwrap_or(self.port);
        while std::net::TcpStream::connect(("127.0.0.1", last)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "second broker did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, host: &str) -> String {
        format!("mqtt://{host}:{}", self.port)
    }

    fn pem(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// Logins of user `tenant` the broker saw: the operator's sessions for the connection.
    fn tenant_logins(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("New client connected") && l.contains("u'tenant'"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for SecondBroker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's own client on the second broker: every PUBLISH it receives.
struct Watcher {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<Publish>,
    held: std::collections::VecDeque<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    fn start(port: u16, filters: &[&str]) -> Watcher {
        let mut options = MqttOptions::new(
            format!("watcher-{:08x}", rand::random::<u32>()),
            "127.0.0.1",
            port,
        );
        options
            .set_credentials("watcher", WATCHER_PASSWORD)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let (tx, messages) = mpsc::unbounded_channel();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let sub = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Incoming::ConnAck(_))) => {
                        for f in &filters {
                            let _ = sub.subscribe(f.clone(), QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(MqttEvent::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    // The broker is restarted in one test: try again.
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Watcher {
            client,
            messages,
            held: Default::default(),
            task,
        }
    }

    /// The next message on `topic` within `timeout` (messages on other topics are kept for
    /// their own `next_on`).
    async fn next_on(&mut self, topic: &str, timeout: Duration) -> Publish {
        if let Some(i) = self.held.iter().position(|p| p.topic == topic) {
            return self.held.remove(i).expect("held message");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(p)) if p.topic == topic => return p,
                Ok(Some(p)) => self.held.push_back(p),
                Ok(None) => panic!("watcher ended"),
                Err(_) => panic!("no message on {topic} within {timeout:?}"),
            }
        }
    }
}

async fn login_secret(api: &Api<Secret>, name: &str, password: &str, opted_in: bool) {
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"username": "tenant", "password": password},
    }))
    .unwrap();
    if opted_in {
        secret.metadata.labels = Some([(OPT_IN.to_string(), "true".to_string())].into());
    }
    api.create(&PostParams::default(), &secret).await.unwrap();
}

/// Waits for the object's Ready condition to have `reason`; returns its message.
async fn wait_reason<K>(s: &Setup, api: &Api<K>, name: &str, reason: &str) -> String
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    s.wait_for(&format!("{name} Ready reason {reason}"), || async {
        let obj = api.get(name).await.ok()?;
        let c = condition(&obj, "Ready")?;
        (c.reason == reason).then_some(c.message)
    })
    .await
}

async fn event_for(s: &Setup, name: &str, reason: &str) -> Event {
    let events: Api<Event> = s.api();
    s.wait_for(&format!("a {reason} Event for {name}"), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
    })
    .await
}

/// Publishes `payload` on the second broker until the Thing's desired state shows `check`
/// (the Subscriber may still be subscribing when the first one goes out).
async fn publish_until<F>(s: &Setup, watcher: &Watcher, topic: &str, payload: Value, mut check: F)
where
    F: FnMut(&Value) -> bool,
{
    let things = s.things();
    let deadline = tokio::time::Instant::now() + s.timeout;
    loop {
        watcher
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .await
            .unwrap();
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < wait_until {
            let desired = things
                .get("lamp")
                .await
                .ok()
                .and_then(|t| t.spec.desired)
                .map(|d| serde_json::to_value(d).unwrap())
                .unwrap_or(Value::Null);
            if check(&desired) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Subscriber never wrote {payload} from {topic}"
        );
    }
}

#[tokio::test]
async fn a_sink_and_a_source_on_a_tenants_broker_share_one_session_and_survive_its_restart() {
    let s = Setup::new("brokerconn").await;
    let mut broker = SecondBroker::start();
    let operator = s.operator().args(["--http-sink-allow-cidr", "127.0.0.0/8"]);
    let mut op = operator.ready().await;
    let secrets: Api<Secret> = s.api();
    login_secret(&secrets, "plant-login", TENANT_PASSWORD, true).await;
    let connections: Api<BrokerConnection> = s.api();
    create_resource(
        &connections,
        "plant",
        json!({"url": broker.url("localhost"), "auth": {"usernamePasswordSecret": "plant-login"}}),
    )
    .await;
    let ready = wait_reason(&s, &connections, "plant", "Connected").await;
    assert!(ready.contains(&broker.port.to_string()), "{ready}");

    let things = s.things();
    thing("lamp")
        .broker("Azure")
        .desired(json!({"on": false}))
        .create(&things)
        .await;
    let subscribers: Api<Subscriber> = s.api();
    // Topics of the tenant's own broker: no operator topic tree applies there.
    create_resource(
        &subscribers,
        "from-plant",
        json!({"source": {"mqtt": {"connection": "plant", "topicFilter": "plant/in/#", "qos": 1}},
               "target": {"thingName": "lamp", "field": "Desired", "path": "/fromPlant"}}),
    )
    .await;
    let observers: Api<Observer> = s.api();
    create_resource(
        &observers,
        "to-plant",
        json!({"source": {"thingName": "lamp"},
               "filter": {"section": "Desired"},
               "sink": {"mqtt": {"connection": "plant", "topic": "plant/out/lamp", "qos": 1}}}),
    )
    .await;
    s.wait_ready(&subscribers, "from-plant").await;
    s.wait_ready(&observers, "to-plant").await;

    let mut watcher = Watcher::start(
        broker.port,
        &["plant/out/#", "$SYS/broker/clients/connected"],
    );
    // Into the Thing from the tenant's broker, and the Thing's change out to it again.
    publish_until(&s, &watcher, "plant/in/line-1", json!({"level": 7}), |d| {
        d["fromPlant"]["level"] == 7
    })
    .await;
    let event = loop {
        let p = watcher.next_on("plant/out/lamp", s.timeout).await;
        let event: Value = serde_json::from_slice(&p.payload).unwrap();
        if event["data"]["state"]["fromPlant"]["level"] == 7 {
            assert_eq!(p.qos, QoS::AtLeastOnce, "the sink publishes with QoS 1");
            break event;
        }
    };
    assert_eq!(event["specversion"], "1.0");

    // One session for both: the broker saw one login as the tenant, and two clients (the
    // operator's session and the watcher).
    let logins = broker.tenant_logins();
    assert_eq!(logins.len(), 1, "{logins:#?}\n{}", broker.log());
    assert!(
        logins[0].contains(&format!("thing-operator.{}.plant", s.ns.name())),
        "the derived client id: {}",
        logins[0]
    );
    loop {
        let p = watcher
            .next_on("$SYS/broker/clients/connected", s.timeout)
            .await;
        if &p.payload[..] == b"2" {
            break;
        }
    }

    // The broker goes away: the connection and its users say so.
    broker.stop();
    let why = wait_reason(&s, &connections, "plant", "ConnectFailed").await;
    assert!(!why.contains(TENANT_PASSWORD));
    let not_ready = wait_reason(&s, &observers, "to-plant", "ConnectionNotReady").await;
    assert!(not_ready.contains("plant"), "{not_ready}");
    wait_reason(&s, &subscribers, "from-plant", "ConnectionNotReady").await;
    event_for(&s, "plant", "ConnectFailed").await;

    // It comes back (without its sessions: no persistence): reconnected, re-subscribed, and
    // traffic flows both ways again.
    broker.launch();
    wait_reason(&s, &connections, "plant", "Connected").await;
    s.wait_ready(&observers, "to-plant").await;
    s.wait_ready(&subscribers, "from-plant").await;
    publish_until(&s, &watcher, "plant/in/line-2", json!({"level": 9}), |d| {
        d["fromPlant"]["level"] == 9
    })
    .await;
    loop {
        let p = watcher.next_on("plant/out/lamp", s.timeout).await;
        let event: Value = serde_json::from_slice(&p.payload).unwrap();
        if event["data"]["state"]["fromPlant"]["level"] == 9 {
            break;
        }
    }
    assert_eq!(
        broker.tenant_logins().len(),
        2,
        "one session again after the restart"
    );

    // A spec change reconnects with the new settings (the broker logs the keepalive).
    merge_patch(
        &connections,
        "plant",
        json!({"spec": {"keepAliveSeconds": 20}}),
    )
    .await;
    s.wait_for("a new session after the spec change", || async {
        let logins = broker.tenant_logins();
        (logins.len() == 3 && logins[2].contains("k20")).then_some(())
    })
    .await;
    wait_reason(&s, &connections, "plant", "Connected").await;

    // The session is persistent under a fixed client id: a QoS 1 message published while the
    // operator is down (killed, no goodbye) waits at the broker and lands after the restart.
    op.kill();
    watcher
        .client
        .publish(
            "plant/in/line-3",
            QoS::AtLeastOnce,
            false,
            json!({"level": 11}).to_string(),
        )
        .await
        .unwrap();
    let op = operator.ready().await;
    s.wait_for("the message kept while the operator was down", || async {
        let desired = things.get("lamp").await.ok()?.spec.desired?;
        (serde_json::to_value(desired).ok()?["fromPlant"]["level"] == 11).then_some(())
    })
    .await;

    // Deleting the connection ends the session; its users say so.
    connections
        .delete("plant", &Default::default())
        .await
        .unwrap();
    s.wait_gone(&connections, "plant").await;
    wait_reason(&s, &observers, "to-plant", "ConnectionNotReady").await;
    // Its connection-state series goes with it, instead of staying at 0 forever.
    let series = format!("connection=\"connection/{}/plant\"", s.ns);
    s.wait_for("the deleted connection's gauge series gone", || async {
        let (_, body) = op.get("/metrics").await?;
        (!body.contains(&series)).then_some(())
    })
    .await;
    // Only the watcher is left on the broker.
    loop {
        let p = watcher
            .next_on("$SYS/broker/clients/connected", s.timeout)
            .await;
        if &p.payload[..] == b"1" {
            break;
        }
    }
}

#[tokio::test]
async fn bad_logins_foreign_secrets_and_inward_urls_are_conditions_never_passwords() {
    let s = Setup::new("brokerconn-bad").await;
    let broker = SecondBroker::start();
    // No allow flag: loopback is inward.
    let op = s.operator().ready().await;
    let connections: Api<BrokerConnection> = s.api();
    let secrets: Api<Secret> = s.api();

    // An inward URL, by name or literally: refused before any connection.
    for (name, host) in [("by-name", "localhost"), ("literal", "127.0.0.1")] {
        create_resource(&connections, name, json!({"url": broker.url(host)})).await;
        let why = wait_reason(&s, &connections, name, "DestinationRefused").await;
        assert!(why.contains("loopback"), "{why}");
    }
    event_for(&s, "by-name", "DestinationRefused").await;
    assert!(
        !broker.log().contains("New client connected"),
        "the operator connected to a refused destination"
    );
    drop(op);

    let op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    // A wrong password: AuthFailed, an Event, and the password nowhere.
    const WRONG: &str = "wrong-pw-31d7aa";
    login_secret(&secrets, "wrong-login", WRONG, true).await;
    create_resource(
        &connections,
        "wrong",
        json!({"url": broker.url("127.0.0.1"), "auth": {"usernamePasswordSecret": "wrong-login"}}),
    )
    .await;
    wait_reason(&s, &connections, "wrong", "AuthFailed").await;
    let event = event_for(&s, "wrong", "AuthFailed").await;
    // A login Secret that did not opt in is not sent anywhere.
    login_secret(&secrets, "shy-login", TENANT_PASSWORD, false).await;
    create_resource(
        &connections,
        "shy",
        json!({"url": broker.url("127.0.0.1"), "auth": {"usernamePasswordSecret": "shy-login"}}),
    )
    .await;
    let why = wait_reason(&s, &connections, "shy", "SecretInvalid").await;
    assert!(why.contains(OPT_IN), "{why}");

    // A Secret of another namespace cannot be named: only the connection's own namespace is
    // read (there is no namespace field, and a qualified name is no Secret name).
    let other = TestNamespace::create(&s.env, &s.client, "brokerconn-other").await;
    let other_secrets: Api<Secret> = Api::namespaced(s.client.clone(), &other);
    login_secret(&other_secrets, "their-login", TENANT_PASSWORD, true).await;
    for (name, secret) in [
        ("foreign", "their-login".to_string()),
        ("qualified", format!("{}/their-login", other.name())),
    ] {
        create_resource(
            &connections,
            name,
            json!({"url": broker.url("127.0.0.1"), "auth": {"usernamePasswordSecret": secret}}),
        )
        .await;
        wait_reason(&s, &connections, name, "SecretMissing").await;
    }
    assert!(
        broker.tenant_logins().is_empty(),
        "no login with another namespace's Secret (or an unopted one)"
    );

    // Fixing the Secret and nudging the object connects.
    merge_patch(
        &secrets,
        "wrong-login",
        json!({"stringData": {"password": TENANT_PASSWORD}}),
    )
    .await;
    merge_patch(
        &connections,
        "wrong",
        json!({"metadata": {"annotations": {"nudge": "1"}}}),
    )
    .await;
    wait_reason(&s, &connections, "wrong", "Connected").await;

    // Neither password in any status, Event or log line.
    let statuses =
        serde_json::to_string(&connections.list(&ListParams::default()).await.unwrap()).unwrap();
    let events =
        serde_json::to_string(&s.api::<Event>().list(&ListParams::default()).await.unwrap())
            .unwrap();
    assert!(event.note.unwrap_or_default().contains("refused the login"));
    for secret in [WRONG, TENANT_PASSWORD] {
        assert!(!statuses.contains(secret), "a password in a status");
        assert!(!events.contains(secret), "a password in an Event");
        assert!(
            !op.logs().contains(secret),
            "a password in the operator's log"
        );
    }
}

#[tokio::test]
async fn tls_with_a_ca_and_a_client_certificate_from_the_namespaces_secrets() {
    let s = Setup::new("brokerconn-tls").await;
    let broker = SecondBroker::start_with_tls();
    let tls_port = broker.tls_port.expect("a TLS listener");
    let _op = s
        .operator()
        .args(["--egress-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let secrets: Api<Secret> = s.api();
    login_secret(&secrets, "login", TENANT_PASSWORD, true).await;
    // The CA is only read, never sent: no opt-in needed.
    let ca: Secret = serde_json::from_value(json!({
        "metadata": {"name": "broker-ca"},
        "stringData": {"ca.crt": broker.pem("ca.crt")},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &ca).await.unwrap();
    let client: Secret = serde_json::from_value(json!({
        "metadata": {"name": "client-cert", "labels": {OPT_IN: "true"}},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": broker.pem("client.crt"), "tls.key": broker.pem("client.key")},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &client)
        .await
        .unwrap();
    let connections: Api<BrokerConnection> = s.api();
    let url = format!("mqtts://localhost:{tls_port}");
    create_resource(
        &connections,
        "mtls",
        json!({"url": url, "auth": {"usernamePasswordSecret": "login"},
               "tls": {"caSecret": {"name": "broker-ca"}, "clientCertificateSecret": "client-cert"}}),
    )
    .await;
    wait_reason(&s, &connections, "mtls", "Connected").await;
    // Without a client certificate the broker refuses the handshake; without our CA the
    // operator refuses the broker's certificate.
    create_resource(
        &connections,
        "no-client-cert",
        json!({"url": url, "auth": {"usernamePasswordSecret": "login"},
               "tls": {"caSecret": {"name": "broker-ca"}}}),
    )
    .await;
    wait_reason(&s, &connections, "no-client-cert", "ConnectFailed").await;
    create_resource(
        &connections,
        "public-roots",
        json!({"url": url, "auth": {"usernamePasswordSecret": "login"},
               "tls": {"clientCertificateSecret": "client-cert"}}),
    )
    .await;
    let why = wait_reason(&s, &connections, "public-roots", "ConnectFailed").await;
    assert!(why.to_lowercase().contains("certificate"), "{why}");
    // A CA key that is no certificate is SecretInvalid, naming the key, not its content.
    create_resource(
        &connections,
        "bad-ca",
        json!({"url": url, "tls": {"caSecret": {"name": "client-cert", "key": "tls.key"}}}),
    )
    .await;
    let why = wait_reason(&s, &connections, "bad-ca", "SecretInvalid").await;
    assert!(why.contains("tls.key") && !why.contains("PRIVATE"), "{why}");
}

/// Two BrokerConnections asking one broker for the same client id would take the session from
/// each other (and the taker would get what the broker kept for the other): the older holds
/// it, the newer is `ClientIdInUse` and never connects, until the older is gone.
#[tokio::test]
async fn a_client_id_on_a_broker_is_held_by_the_oldest_connection() {
    let s = Setup::new("brokerconn-claim").await;
    let broker = SecondBroker::start();
    let _op = s
        .operator()
        .args(["--http-sink-allow-cidr", "127.0.0.0/8"])
        .ready()
        .await;
    let secrets: Api<Secret> = s.api();
    login_secret(&secrets, "gw-login", TENANT_PASSWORD, true).await;
    let connections: Api<BrokerConnection> = s.api();
    let spec = json!({"url": broker.url("localhost"), "clientId": "plant-gw",
                      "auth": {"usernamePasswordSecret": "gw-login"}});
    create_resource(&connections, "first", spec.clone()).await;
    wait_reason(&s, &connections, "first", "Connected").await;

    create_resource(&connections, "second", spec).await;
    let why = wait_reason(&s, &connections, "second", "ClientIdInUse").await;
    assert!(why.contains("plant-gw"), "{why}");
    event_for(&s, "second", "ClientIdInUse").await;
    let sessions = |log: String| {
        log.lines()
            .filter(|l| l.contains("New client connected") && l.contains(" as plant-gw "))
            .count()
    };
    assert_eq!(
        sessions(broker.log()),
        1,
        "the newer one never connected under the id"
    );
    wait_reason(&s, &connections, "first", "Connected").await;

    // The holder goes: the one waiting behind it connects.
    connections
        .delete("first", &Default::default())
        .await
        .expect("deleted");
    wait_reason(&s, &connections, "second", "Connected").await;
    assert_eq!(sessions(broker.log()), 2);
}
