//! The hostile-tenant suite: namespace `tenant-b`, whose user may only create Things, Observers
//! and Subscribers, attacks `tenant-a`, whose device keeps reporting. Every attack must end in a
//! condition reason and an Event in tenant-b, and tenant-a's device, Secret, shadow and retained
//! state must be exactly as before. See docs/security.md for the model and for the findings not
//! enforced yet (those have no attack here).
//!
//! One test function: the operator watches every namespace (tenants are namespaces), so two
//! such operators must never run at once.

mod aws_support;
mod common;
mod mosquitto_support;

use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use serde_json::{Value, json};

use common::{TestNamespace, condition, create_resource, merge_patch, resource, thing};
use mosquitto_support::{Credentials, Device, topic_prefix};
use thing_operator::api::{Observer, Subscriber, Thing};

/// Namespace `ns` lets the tenant user create and read the three kinds and read Events, and
/// nothing else (no Secrets).
async fn bind_tenant_user(admin: &Client, ns: &str, user: &str) {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "iot-author"},
        "rules": [
            {"apiGroups": ["iot.thing-operator.dev"],
             "resources": ["things", "observers", "subscribers"],
             "verbs": ["create", "get", "list", "watch", "patch", "delete"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["get", "list"]},
        ]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "iot-author"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "iot-author"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .expect("role");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("role binding");
}

/// `depth` nested objects around a number.
fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!({ "a": v });
    }
    v
}

/// Reasons of the Events about `name` in the namespace, as the tenant sees them.
async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .expect("the tenant may list its Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

#[tokio::test]
async fn a_hostile_namespace_cannot_reach_another_namespaces_devices_secrets_or_topics() {
    let s = common::Setup::new("tenant-a").await;
    let (env, admin, tenant_a) = (&s.env, &s.client, &s.ns);
    let tenant_b = TestNamespace::create(env, admin, "tenant-b").await;
    bind_tenant_user(admin, &tenant_b, &env.var("TENANT_USER")).await;
    let tenant = env.client_from("TENANT_KUBECONFIG").await;

    let prefix = topic_prefix();
    // HTTP sinks may reach 127.0.0.2 (a receiver that counts connections), nothing else inward.
    let receiver = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind 127.0.0.2");
    let receiver_port = receiver.local_addr().unwrap().port();
    let builder = s
        .operator()
        .cluster_wide()
        .aws()
        .mqtt(&prefix)
        .args(["--http-sink-allow-cidr", "127.0.0.2/32"]);
    let operator = builder.ready().await;

    // tenant-a: a device that keeps reporting.
    let a_things: Api<Thing> = Api::namespaced(admin.clone(), tenant_a);
    // A device name of its own choosing (one another namespace could try to take).
    let lamp_device = format!("{prefix}-lamp");
    thing("lamp")
        .broker("Mosquitto")
        .field("thingName", json!(lamp_device))
        .desired(json!({"on": false}))
        .create(&a_things)
        .await;
    s.wait_ready(&a_things, "lamp").await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), tenant_a);
    let a_secret = secrets.get("lamp-device").await.expect("lamp's Secret");
    let creds = Credentials::from_secret(&a_secret);
    let mut device = Device::start(&creds, vec![]);
    device.connected().await;
    let report = |temp: i64| json!({"state": {"reported": {"temp": temp}}}).to_string();
    device
        .publish(&format!("{}/shadow/update", creds.topic), report(20))
        .await;
    s.wait_until(&a_things, "lamp", "reported temp 20", |t: &Thing| {
        t.status
            .as_ref()
            .and_then(|st| st.reported.as_ref())
            .and_then(|r| r.0.get("temp"))
            == Some(&json!(20))
    })
    .await;
    let before = a_things.get("lamp").await.unwrap();
    let a_device = before.status.as_ref().and_then(|st| st.device.clone());

    // tenant-a also has an AWS device, under a name of its own choosing.
    let meter_device = format!("{prefix}-meter");
    thing("meter")
        .broker("AWS")
        .field("thingName", json!(meter_device))
        .field("attributes", json!({"model": "m1"}))
        .create(&a_things)
        .await;
    s.wait_ready(&a_things, "meter").await;
    let iot = aws_support::iot(env);
    let describe_meter = || async {
        let d = iot
            .describe_thing()
            .thing_name(&meter_device)
            .send()
            .await
            .expect("tenant-a's AWS thing exists");
        let attributes: std::collections::BTreeMap<_, _> = d
            .attributes()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .collect();
        (attributes, d.version())
    };
    let meter_before = describe_meter().await;

    // A Secret in tenant-b the tenant user may not read (say, a database password).
    let b_secrets_admin: Api<Secret> = Api::namespaced(admin.clone(), &tenant_b);
    let db_password: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db-password"},
        "stringData": {"authorization": "Bearer hunter2-database"},
    }))
    .unwrap();
    b_secrets_admin
        .create(&PostParams::default(), &db_password)
        .await
        .expect("admin creates tenant-b's database Secret");
    let db_before = b_secrets_admin.get("db-password").await.unwrap();

    // tenant-b attacks, as its user.
    let b_things: Api<Thing> = Api::namespaced(tenant.clone(), &tenant_b);
    let b_observers: Api<Observer> = Api::namespaced(tenant.clone(), &tenant_b);
    let b_subscribers: Api<Subscriber> = Api::namespaced(tenant.clone(), &tenant_b);
    let a_subtree = format!("{prefix}/namespaces/{tenant_a}");
    let apiserver = format!("https://127.0.0.1:{}/api", env.var("APISERVER_PORT"));

    let subscriber_attacks = [
        ("spy-everything", json!("#")),
        ("spy-tenant-a", json!(format!("{a_subtree}/#"))),
        ("spy-shadows", json!("$aws/things/#")),
        (
            "spy-namespaces",
            json!(format!("{prefix}/namespaces/+/things/#")),
        ),
    ];
    for (name, filter) in &subscriber_attacks {
        create_resource(
            &b_subscribers,
            name,
            json!({"source": {"mqtt": {"topicFilter": filter}},
                   "target": {"thingName": "anything", "field": "Desired"}}),
        )
        .await;
    }
    let observer_attacks = [
        (
            "overwrite-state",
            json!({"mqtt": {"topic": format!("{a_subtree}/things/lamp/state"), "retain": true}}),
        ),
        (
            "broker-internals",
            json!({"mqtt": {"topic": "$SYS/broker/x"}}),
        ),
        (
            "metadata-service",
            json!({"http": {"url": "http://169.254.169.254/latest/meta-data/"}}),
        ),
        ("apiserver-loopback", json!({"http": {"url": apiserver}})),
        (
            "private-range",
            json!({"http": {"url": "http://10.0.0.1:8080/"}}),
        ),
    ];
    // Allowed destination, but a header Secret that did not opt in: never sent.
    create_resource(
        &b_observers,
        "exfiltrate",
        json!({"source": {"matchLabels": {"any": "thing"}},
               "sink": {"http": {"url": format!("http://127.0.0.2:{receiver_port}/x"),
                                 "headersSecret": "db-password"}}}),
    )
    .await;
    for (name, sink) in &observer_attacks {
        create_resource(
            &b_observers,
            name,
            json!({"source": {"matchLabels": {"any": "thing"}}, "sink": sink}),
        )
        .await;
    }
    let thing_attacks = [
        ("hot-poll", json!({"shadow": {"pollInterval": "0s"}})),
        ("hot-rotate", json!({"credentials": {"rotateAfter": "1ms"}})),
        (
            "wide-policy",
            json!({"broker": "AWS", "policy": {"template": json!({"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "iot:*", "Resource": "*"}]}).to_string()}}),
        ),
        ("too-deep", json!({"desired": nested(200)})),
    ];
    let thing_attack_names = thing_attacks
        .iter()
        .map(|(n, _)| *n)
        .chain(["squat-derived"]);
    for (name, spec) in &thing_attacks {
        let t: Thing = resource("Thing", name, spec.clone());
        b_things
            .create(&PostParams::default(), &t)
            .await
            .unwrap_or_else(|e| panic!("tenant-b may create Thing {name}: {e}"));
    }

    // Squatting: tenant-a's device name, and a Secret the operator did not create.
    let squat: Thing = resource(
        "Thing",
        "squat",
        json!({"broker": "Mosquitto", "thingName": lamp_device}),
    );
    b_things
        .create(&PostParams::default(), &squat)
        .await
        .expect("tenant-b creates squat");
    // The same on AWS: tenant-a's thing, by name.
    let steal: Thing = resource(
        "Thing",
        "steal-meter",
        json!({"broker": "AWS", "thingName": meter_device}),
    );
    b_things
        .create(&PostParams::default(), &steal)
        .await
        .expect("tenant-b creates steal-meter");
    // A name shaped like tenant-a's derived device names is refused outright.
    let derived: Thing = resource(
        "Thing",
        "squat-derived",
        json!({"broker": "Mosquitto", "thingName": format!("{tenant_a}_lamp")}),
    );
    b_things
        .create(&PostParams::default(), &derived)
        .await
        .expect("tenant-b creates squat-derived");
    let overwrite: Thing = resource(
        "Thing",
        "overwrite-secret",
        json!({"broker": "Mosquitto", "credentials": {"secretName": "db-password"}}),
    );
    b_things
        .create(&PostParams::default(), &overwrite)
        .await
        .expect("tenant-b creates overwrite-secret");

    // Every attack is refused with InvalidSpec, visibly to tenant-b, and starts nothing.
    let b_admin_subs: Api<Subscriber> = Api::namespaced(admin.clone(), &tenant_b);
    let b_admin_obs: Api<Observer> = Api::namespaced(admin.clone(), &tenant_b);
    let b_admin_things: Api<Thing> = Api::namespaced(admin.clone(), &tenant_b);
    for (name, _) in &subscriber_attacks {
        let c = s
            .wait_condition(&b_admin_subs, name, "Ready", |c| c.reason == "InvalidSpec")
            .await;
        assert!(c.message.contains("topic"), "{name}: {}", c.message);
    }
    for (name, _) in &observer_attacks {
        s.wait_condition(&b_admin_obs, name, "Ready", |c| c.reason == "InvalidSpec")
            .await;
    }
    for (name, _) in &thing_attacks {
        s.wait_condition(&b_admin_things, name, "Ready", |c| {
            c.reason == "InvalidSpec"
        })
        .await;
    }
    let squatted = s
        .wait_condition(&b_admin_things, "squat", "Ready", |c| {
            c.reason == "Conflict"
        })
        .await;
    assert!(
        !squatted.message.contains(tenant_a.name()),
        "the conflict names the other tenant: {}",
        squatted.message
    );
    s.wait_condition(&b_admin_things, "overwrite-secret", "Ready", |c| {
        c.reason == "SecretConflict"
    })
    .await;
    assert_eq!(
        b_secrets_admin.get("db-password").await.unwrap().data,
        db_before.data,
        "the database Secret was written"
    );
    assert!(
        b_secrets_admin
            .get("db-password")
            .await
            .unwrap()
            .metadata
            .owner_references
            .is_none(),
        "the database Secret got an owner"
    );
    let exfiltrate = s
        .wait_for("the header Secret refusal", || async {
            let o = b_admin_obs.get("exfiltrate").await.ok()?;
            let e = o.status?.last_error?;
            e.contains("opt in").then_some(e)
        })
        .await;
    assert!(!exfiltrate.contains("hunter2"), "{exfiltrate}");
    let connected =
        tokio::time::timeout(std::time::Duration::from_millis(500), receiver.accept()).await;
    assert!(connected.is_err(), "the operator connected to the receiver");
    for (name, reason) in [
        ("squat", "Conflict"),
        ("overwrite-secret", "SecretConflict"),
    ] {
        s.wait_for(&format!("{reason} Event for {name}"), || async {
            event_reasons(&tenant, &tenant_b, name)
                .await
                .iter()
                .any(|r| r == reason)
                .then_some(())
        })
        .await;
    }

    let names = subscriber_attacks
        .iter()
        .map(|(n, _)| *n)
        .chain(observer_attacks.iter().map(|(n, _)| *n))
        .chain(thing_attack_names);
    for name in names {
        s.wait_for(&format!("InvalidSpec Event for {name}"), || async {
            event_reasons(&tenant, &tenant_b, name)
                .await
                .iter()
                .any(|r| r == "InvalidSpec")
                .then_some(())
        })
        .await;
    }

    // A restart with the too-deep Thing present: the watch still decodes, tenant-a still
    // reconciles (a spec change is seen and its generation observed).
    let mut operator = operator;
    operator.kill();
    let _operator = builder.ready().await;
    let changed = merge_patch(
        &a_things,
        "lamp",
        json!({"spec": {"desired": {"on": true}}}),
    )
    .await;
    let generation = changed.metadata.generation;
    s.wait_until(&a_things, "lamp", "new generation observed", |t: &Thing| {
        t.status.as_ref().and_then(|st| st.observed_generation) == generation && common::is_ready(t)
    })
    .await;
    s.wait_condition(&b_admin_things, "too-deep", "Ready", |c| {
        c.reason == "InvalidSpec"
    })
    .await;
    // After the restart the name is still tenant-a's: the squatter did not capture it.
    s.wait_condition(&b_admin_things, "squat", "Ready", |c| {
        c.reason == "Conflict"
    })
    .await;
    assert_eq!(
        a_things
            .get("lamp")
            .await
            .unwrap()
            .status
            .and_then(|st| st.device),
        a_device,
        "tenant-a's device record changed"
    );

    let stolen = s
        .wait_condition(&b_admin_things, "steal-meter", "Ready", |c| {
            c.reason == "Conflict"
        })
        .await;
    assert!(
        !stolen.message.contains(tenant_a.name()),
        "{}",
        stolen.message
    );
    b_things
        .delete("steal-meter", &Default::default())
        .await
        .expect("tenant-b deletes steal-meter");
    s.wait_gone(&b_admin_things, "steal-meter").await;
    assert_eq!(
        describe_meter().await,
        meter_before,
        "tenant-a's AWS thing changed"
    );
    assert!(common::is_ready(&a_things.get("meter").await.unwrap()));

    // Deleting the squatter leaves tenant-a's broker client and role alone (the report below
    // needs the role's ACLs).
    b_things
        .delete("squat", &Default::default())
        .await
        .expect("tenant-b deletes squat");
    s.wait_gone(&b_admin_things, "squat").await;

    // The device keeps reporting through all of it.
    device
        .publish(&format!("{}/shadow/update", creds.topic), report(21))
        .await;
    s.wait_until(&a_things, "lamp", "reported temp 21", |t: &Thing| {
        t.status
            .as_ref()
            .and_then(|st| st.reported.as_ref())
            .and_then(|r| r.0.get("temp"))
            == Some(&json!(21))
    })
    .await;

    // tenant-a is exactly as before: same device, same credentials, its own retained state.
    let after = a_things.get("lamp").await.unwrap();
    assert_eq!(
        after.status.as_ref().and_then(|st| st.device.clone()),
        a_device
    );
    assert_eq!(
        secrets.get("lamp-device").await.unwrap().data,
        a_secret.data,
        "tenant-a's Secret changed"
    );
    assert_eq!(
        condition(&after, "Ready").map(|c| c.reason),
        Some("Reconciled".into())
    );
    let mut watcher = Device::start(
        &Credentials::admin(env),
        vec![format!("{a_subtree}/things/lamp/state")],
    );
    watcher.connected().await;
    let state = watcher
        .message(&format!("{a_subtree}/things/lamp/state"))
        .await;
    assert_eq!(state["namespace"], json!(tenant_a.name()));
    assert_eq!(state["name"], json!("lamp"));

    // Nothing tenant-b can read carries tenant-a's secrets.
    let mut view = String::new();
    for list in [
        serde_json::to_string(&b_things.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(&b_observers.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(&b_subscribers.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(
            &Api::<k8s_openapi::api::events::v1::Event>::namespaced(tenant.clone(), &tenant_b)
                .list(&ListParams::default())
                .await
                .unwrap(),
        )
        .unwrap(),
    ] {
        view.push_str(&list);
    }
    assert!(
        !view.contains(&creds.password),
        "tenant-a's password leaked"
    );
    assert!(!view.contains("hunter2"), "the database Secret leaked");
    // And the tenant user cannot read Secrets at all.
    let b_secrets: Api<Secret> = Api::namespaced(tenant.clone(), &tenant_b);
    assert!(b_secrets.list(&ListParams::default()).await.is_err());
}
