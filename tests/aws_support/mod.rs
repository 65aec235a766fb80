//! Helpers of the AWS integration tests, on top of `tests/common`: a `Setup` with the AWS
//! tests' longer waits, SDK clients pointed at the test environment's moto, and readers of
//! what the operator left in Kubernetes (Secrets, Events) and in moto.
#![allow(dead_code)]

use std::time::Duration;

use aws_sdk_iot::config::{BehaviorVersion, Credentials, Region};
use k8s_openapi::api::{core::v1::Secret, events::v1::Event};
use kube::{Api, Client, api::ListParams};
use serde_json::Value;

use crate::common::{Setup, TestEnv};

/// AWS work takes longer than the operator's own: every wait of these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(90);

/// A `Setup` whose waits are bounded by [`WAIT`].
pub async fn setup(prefix: &str) -> Setup {
    Setup::new(prefix).await.timeout(WAIT)
}

pub fn moto_url(env: &TestEnv) -> String {
    env.var("MOTO_URL")
}

fn creds() -> Credentials {
    Credentials::new("testing", "testing", None, None, "tests")
}

pub fn iot(env: &TestEnv) -> aws_sdk_iot::Client {
    let conf = aws_sdk_iot::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(creds())
        .endpoint_url(moto_url(env))
        .build();
    aws_sdk_iot::Client::from_conf(conf)
}

pub fn data(env: &TestEnv) -> aws_sdk_iotdataplane::Client {
    let conf = aws_sdk_iotdataplane::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_iotdataplane::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .endpoint_url(moto_url(env))
        .build();
    aws_sdk_iotdataplane::Client::from_conf(conf)
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

pub async fn thing_exists(iot: &aws_sdk_iot::Client, name: &str) -> bool {
    iot.describe_thing().thing_name(name).send().await.is_ok()
}

pub async fn policy_exists(iot: &aws_sdk_iot::Client, name: &str) -> bool {
    iot.get_policy().policy_name(name).send().await.is_ok()
}

/// The principals (certificate ARNs) attached to the thing `thing_name` in moto.
pub async fn thing_principals(iot: &aws_sdk_iot::Client, thing_name: &str) -> Vec<String> {
    iot.list_thing_principals()
        .thing_name(thing_name)
        .send()
        .await
        .expect("list thing principals")
        .principals()
        .to_vec()
}

pub async fn cert_status(iot: &aws_sdk_iot::Client, id: &str) -> Option<String> {
    let out = iot
        .describe_certificate()
        .certificate_id(id)
        .send()
        .await
        .ok()?;
    out.certificate_description()?
        .status()
        .map(|s| s.as_str().to_string())
}

pub async fn shadow(data: &aws_sdk_iotdataplane::Client, thing: &str) -> Option<Value> {
    let out = data
        .get_thing_shadow()
        .thing_name(thing)
        .send()
        .await
        .ok()?;
    serde_json::from_slice(out.payload()?.as_ref()).ok()
}

/// moto's dump of everything it holds (GET /moto-api/data.json).
pub async fn moto_dump(env: &TestEnv) -> Value {
    reqwest::get(format!("{}/moto-api/data.json", moto_url(env)))
        .await
        .expect("moto answers")
        .json()
        .await
        .expect("moto dump is JSON")
}

/// Certificates in moto whose PEM is not attached to any thing: ids (scoped by the caller).
pub async fn all_certificate_ids(iot: &aws_sdk_iot::Client) -> Vec<String> {
    let out = iot
        .list_certificates()
        .page_size(250)
        .send()
        .await
        .expect("list certificates");
    out.certificates()
        .iter()
        .filter_map(|c| c.certificate_id().map(str::to_string))
        .collect()
}

/// The subject of the certificate `id` in moto (`None` when moto does not describe it).
pub async fn certificate_subject(iot: &aws_sdk_iot::Client, id: &str) -> Option<String> {
    let d = iot
        .describe_certificate()
        .certificate_id(id)
        .send()
        .await
        .ok()?;
    let pem = d
        .certificate_description()
        .and_then(|d| d.certificate_pem())
        .unwrap_or_default()
        .to_string();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    Some(parsed.parse_x509().expect("X.509").subject().to_string())
}
