//! Certificate authentication: with `--mqtt-device-tls-endpoint`, each device also gets a
//! certificate from the operator's device CA and connects to the broker's mTLS listener with it
//! (no password), its identity being the certificate's common name.
//!
//! Needs the mTLS listener of the test environment (`scripts/testenv.sh up`, or
//! `scripts/testenv.sh add-mosquitto-tls` on an environment started before it existed).

mod common;
mod mosquitto_support;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::json;

use common::thing;
use mosquitto_support::{Credentials, Device, DeviceEvent, setup};

fn tls_config(
    ca_pem: &[u8],
    cert_pem: Option<&[u8]>,
    key_pem: Option<&[u8]>,
) -> rustls::ClientConfig {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (cert_pem, key_pem) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
                .map(|c| c.unwrap())
                .collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key).unwrap())
                .unwrap()
        }
        _ => builder.with_no_client_auth(),
    }
}

#[tokio::test]
async fn device_connects_with_its_certificate() {
    let env = common::TestEnv::load();
    let tls_port = env.vars.get("MQTT_TLS_PORT").cloned().expect(
        "the test environment has no mTLS listener: run `scripts/testenv.sh add-mosquitto-tls`",
    );
    let endpoint = format!("127.0.0.1:{tls_port}");
    let s = setup("mq-tls", &["--mqtt-device-tls-endpoint", &endpoint]).await;
    thing("cam")
        .desired(json!({"res": "hd"}))
        .create(&s.things)
        .await;
    let thing = s.wait_ready(&s.things, "cam").await;
    let issued = thing
        .status
        .unwrap()
        .credentials
        .expect("certificate dates in status");
    assert!(issued.not_after.is_some() && issued.issued_at.is_some());

    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.ns);
    let data = secrets.get("cam-device").await.unwrap().data.unwrap();
    let get = |k: &str| {
        data.get(k)
            .unwrap_or_else(|| panic!("Secret has {k}"))
            .0
            .clone()
    };
    let (cert, key, ca) = (get("tls.crt"), get("tls.key"), get("ca.crt"));
    assert_eq!(String::from_utf8(get("tlsEndpoint")).unwrap(), endpoint);
    let thing_name = String::from_utf8(get("thingName")).unwrap();

    // Certificate only, no password: the broker takes the identity from the certificate.
    let creds = Credentials {
        endpoint: endpoint.clone(),
        client_id: thing_name.clone(),
        username: String::new(),
        password: String::new(),
        thing_name: thing_name.clone(),
        topic: String::new(),
    };
    let root = creds.aws_root();
    let mut dev = Device::start_with(
        &creds,
        vec![format!("{root}/update/accepted")],
        Some(tls_config(&ca, Some(&cert), Some(&key))),
    );
    dev.connected().await;
    dev.publish(
        &format!("{root}/update"),
        r#"{"state":{"reported":{"res":"hd"}}}"#,
    )
    .await;
    dev.message(&format!("{root}/update/accepted")).await;
    s.wait_until(
        &s.things,
        "cam",
        "certificate device's report in status",
        |t| {
            t.status
                .as_ref()
                .and_then(|st| st.reported.as_ref())
                .is_some_and(|r| r.0.get("res") == Some(&json!("hd")))
        },
    )
    .await;
    drop(dev);

    // Without a client certificate the mTLS listener refuses the connection.
    let mut anon = Device::start_with(&creds, vec![], Some(tls_config(&ca, None, None)));
    anon.next("refusal", |e| match e {
        DeviceEvent::Connected => panic!("connected without a certificate"),
        DeviceEvent::Refused(_) | DeviceEvent::Error(_) => Some(()),
        _ => None,
    })
    .await;
}
