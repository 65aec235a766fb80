//! The REST message broker's inbound direction: an MQTT client changes a Thing's desired state
//! by publishing a JSON merge patch on `{thing topic}/desired/patch`, as a REST client would
//! patch `spec.desired` (same field manager, so GitOps sees the same owner; docs/broker.md).
//!
//! Who may is the broker's ACL: a device's role allows only its own shadow topics, a
//! namespace's Observer account only its namespace's tree, and anyone else needs a role the
//! broker's administrator grants. The topic names the Thing, so a patch can only ever reach the
//! Thing whose tree it was published in; with `--watch-namespace`, only that namespace's.
//!
//! An acknowledgement is a promise: the connection keeps a persistent session with manual
//! acknowledgements, and a patch is acknowledged only once it is written (or refused for good,
//! with the reason on `…/desired/patch/rejected`); the new desired document goes to
//! `…/desired/patch/accepted`. A patch not yet written when the operator dies is redelivered to
//! the next leader.

use std::time::Duration;

use kube::Api;
use rumqttc::{AsyncClient, Publish, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{JsonObject, Thing, validation::check_document},
    forwarding::desired::{merge_into_desired, refused},
    mqtt::{connection::Handler, topic::TopicLayout},
};

/// Largest patch accepted.
const MAX_PATCH: usize = 64 * 1024;
/// Patches waiting to be written; the broker's in-flight window keeps it far below this.
const QUEUE: usize = 1024;
/// Tries of a write the API server may take later, before the patch is left to the broker.
const ATTEMPTS: u32 = 5;

/// One patch to write, with the packet to acknowledge.
struct Patch {
    namespace: String,
    name: String,
    publish: Publish,
}

/// Routes `…/desired/patch` messages to the writer. Runs on the event loop: never blocks.
pub struct DesiredPatchRouter {
    layout: TopicLayout,
    queue: mpsc::Sender<Patch>,
}

impl Handler for DesiredPatchRouter {
    fn on_connected(&self, client: &AsyncClient) {
        if let Err(e) = client.try_subscribe(self.layout.desired_patch_filter(), QoS::AtLeastOnce) {
            tracing::warn!(error = %e, "cannot queue the desired-patch subscription");
        }
    }

    fn on_message(&self, _client: &AsyncClient, _topic: &str, _payload: &[u8]) {}

    fn on_publish(&self, client: &AsyncClient, publish: &Publish) {
        let Some((namespace, name)) = self.layout.parse_desired_patch(&publish.topic) else {
            // Not a Thing's patch topic (the filter admits nothing else): nothing to keep.
            let _ = client.try_ack(publish);
            return;
        };
        let patch = Patch {
            namespace: namespace.to_string(),
            name: name.to_string(),
            publish: publish.clone(),
        };
        // Left unacknowledged when full: the broker redelivers it after a reconnect.
        if self.queue.try_send(patch).is_err() {
            tracing::warn!(topic = %publish.topic, "desired-patch queue full, left unacknowledged");
        }
    }
}

/// Writes queued patches into Things, one at a time (in the order the broker delivered them).
pub struct DesiredPatchWriter {
    kube: kube::Client,
    client: AsyncClient,
    watch_namespace: Option<String>,
    queue: mpsc::Receiver<Patch>,
}

/// The router (install it on the connection) and the writer (run it) of one connection.
pub fn desired_patches(
    layout: TopicLayout,
    kube: kube::Client,
    client: AsyncClient,
    watch_namespace: Option<String>,
) -> (DesiredPatchRouter, DesiredPatchWriter) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (
        DesiredPatchRouter { layout, queue: tx },
        DesiredPatchWriter {
            kube,
            client,
            watch_namespace,
            queue: rx,
        },
    )
}

/// Why a patch is refused for good (published on `…/rejected`; never echoes the payload).
fn judge(payload: &[u8]) -> Result<Value, String> {
    if payload.len() > MAX_PATCH {
        return Err(format!(
            "patch is {} bytes, over the limit of {MAX_PATCH}",
            payload.len()
        ));
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("patch is not JSON: {e}"))?;
    let Value::Object(map) = value else {
        return Err("patch is not a JSON object".into());
    };
    let doc = JsonObject(map);
    let problems = check_document("patch", &doc, MAX_PATCH);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(doc.into_value())
}

impl DesiredPatchWriter {
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let patch = tokio::select! {
                p = self.queue.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            };
            if let Some(outcome) = self.write(&patch, &shutdown).await {
                self.reply(&patch, outcome);
                if let Err(e) = self.client.try_ack(&patch.publish) {
                    tracing::warn!(error = %e, "acknowledgement not queued; the broker will redeliver");
                }
            }
        }
    }

    /// `Some(Ok(desired))` written, `Some(Err(why))` refused for good; `None`: not written
    /// (left unacknowledged for the broker to redeliver).
    async fn write(
        &self,
        patch: &Patch,
        shutdown: &CancellationToken,
    ) -> Option<Result<JsonObject, String>> {
        if self
            .watch_namespace
            .as_deref()
            .is_some_and(|ns| ns != patch.namespace)
        {
            return Some(Err(format!(
                "namespace {} is not served by this operator",
                patch.namespace
            )));
        }
        let doc = match judge(&patch.publish.payload) {
            Ok(doc) => doc,
            Err(why) => return Some(Err(why)),
        };
        let things: Api<Thing> = Api::namespaced(self.kube.clone(), &patch.namespace);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=ATTEMPTS {
            match merge_into_desired(&things, &patch.name, doc.clone()).await {
                Ok(desired) => return Some(Ok(desired)),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Some(Err(format!("Thing {} not found", patch.name)));
                }
                Err(e) if refused(&e) => return Some(Err(format!("refused: {e}"))),
                Err(e) => {
                    tracing::warn!(thing = %patch.name, attempt, error = %e, "desired patch not written yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                    delay *= 2;
                }
            }
        }
        None
    }

    fn reply(&self, patch: &Patch, outcome: Result<JsonObject, String>) {
        let (suffix, body) = match outcome {
            Ok(desired) => ("accepted", json!({ "desired": desired })),
            Err(why) => ("rejected", json!({ "error": why })),
        };
        let topic = format!("{}/{suffix}", patch.publish.topic);
        if let Err(e) = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, body.to_string())
        {
            tracing::debug!(error = %e, "desired-patch reply not queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_are_objects_within_the_document_rules() {
        assert_eq!(judge(br#"{"on": true}"#), Ok(json!({"on": true})));
        assert!(judge(b"[1]").unwrap_err().contains("not a JSON object"));
        assert!(judge(b"{nope").unwrap_err().contains("not JSON"));
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_PATCH));
        assert!(
            judge(big.as_bytes())
                .unwrap_err()
                .contains("over the limit")
        );
    }

    #[test]
    fn only_a_things_patch_topic_names_a_thing() {
        let layout = TopicLayout::new("things").unwrap();
        assert_eq!(
            layout.parse_desired_patch("things/namespaces/prod/things/lamp/desired/patch"),
            Some(("prod", "lamp"))
        );
        assert_eq!(
            layout.parse_desired_patch("things/namespaces/prod/things/lamp/desired/patch/x"),
            None
        );
        assert_eq!(
            layout.parse_desired_patch("things/namespaces/prod/things/lamp/state"),
            None
        );
        assert_eq!(
            layout.desired_patch_filter(),
            "things/namespaces/+/things/+/desired/patch"
        );
    }
}
