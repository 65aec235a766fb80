//! Dynamic-security provisioning of one Thing: its role (exactly its own topics) and its broker
//! client (username = client id = thing name, the Secret's password, marked as the Thing's),
//! created or repaired. The Secret is written first, so the broker never holds a password the
//! device cannot read.

use super::{
    MosquittoProvider,
    dynsec::{Acl, ClientSpec, DynsecError},
    error::MosquittoError,
    naming::{owner_mark, role_name},
};
use crate::{
    api::{ThingStatus, conditions::types},
    failpoints::step,
    mqtt::topic::{ThingTopic, TopicLayout, aws_shadow_root},
    provider::{
        DeviceRequest,
        status::{record_failure, set_condition},
    },
};

/// The ACLs of a Thing's role: publish its own shadow requests (on its topic tree and at
/// `$aws/things/{thingName}`), subscribe to its own trees and to the operator's status topic.
fn thing_acls(
    topic: &ThingTopic,
    thing_name: &str,
    layout: &TopicLayout,
) -> Result<Vec<Acl>, MosquittoError> {
    let aws_root = aws_shadow_root(thing_name)?;
    Ok(vec![
        Acl::allow(
            "publishClientSend",
            format!("{}/update", topic.shadow_root()),
        ),
        Acl::allow("publishClientSend", format!("{}/get", topic.shadow_root())),
        Acl::allow("publishClientSend", format!("{aws_root}/update")),
        Acl::allow("publishClientSend", format!("{aws_root}/get")),
        Acl::allow("subscribePattern", topic.all()),
        Acl::allow("subscribePattern", format!("{aws_root}/#")),
        Acl::allow("subscribePattern", layout.operator_status_topic()),
    ])
}

impl MosquittoProvider {
    /// Secret, role and client, in that order; sets `CredentialsReady` and `Provisioned`.
    /// `Err(Foreign)` when a broker client named `username` exists with another owner mark.
    async fn check_client_owner(&self, username: &str, mark: &str) -> Result<(), MosquittoError> {
        let existing = self
            .dynsec
            .get_client(username)
            .await
            .map_err(MosquittoError::dynsec("getClient"))?;
        match existing {
            Some(client) if client.get("textname").and_then(|t| t.as_str()) != Some(mark) => Err(
                MosquittoError::dynsec("getClient")(DynsecError::Foreign(username.to_string())),
            ),
            _ => Ok(()),
        }
    }

    pub(super) async fn provision(
        &self,
        req: &DeviceRequest<'_>,
        topic: &ThingTopic,
        status: &mut ThingStatus,
    ) -> Result<(), MosquittoError> {
        let thing_name = &req.backend_name;
        let mark = owner_mark(req.namespace, req.name);
        // Before anything is issued or changed: a broker client of that name that is not this
        // Thing's gets no password or certificate for its username (with the mTLS listener a
        // certificate *is* the login) and keeps its role.
        self.check_client_owner(thing_name, &mark)
            .await
            .map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        let password = self.ensure_secret(req, topic.base(), status).await?;
        step!("mosquitto-after-secret-written");
        set_condition(
            status,
            types::CREDENTIALS_READY,
            true,
            "PasswordIssued",
            format!("username and password in Secret {}", req.secret.name()),
        );
        let acls = thing_acls(topic, thing_name, &self.config.layout)?;
        let role = role_name(thing_name);
        let result = async {
            self.dynsec
                .ensure_role(&role, &acls)
                .await
                .map_err(MosquittoError::dynsec("ensureRole"))?;
            let spec = ClientSpec {
                username: thing_name,
                password: &password,
                client_id: thing_name,
                role: &role,
                owner_mark: &mark,
            };
            self.dynsec
                .ensure_client(&spec)
                .await
                .map_err(MosquittoError::dynsec("ensureClient"))
        }
        .await;
        self.count_call("provision", &result);
        let created = result.map_err(|e| record_failure(status, types::PROVISIONED, e))?;
        step!("mosquitto-after-client-created");
        if created {
            tracing::info!(client = %thing_name, "broker client created");
        }
        set_condition(
            status,
            types::PROVISIONED,
            true,
            "ClientProvisioned",
            format!("broker client {thing_name} with role {role}"),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic::filter_matches;

    #[test]
    fn a_role_reaches_only_its_own_thing() {
        let layout = TopicLayout::new("things").unwrap();
        let a = layout.thing("ns", "a").unwrap();
        let b = layout.thing("ns", "b").unwrap();
        let acls = thing_acls(&a, "ns_a", &layout).unwrap();
        let theirs = [
            format!("{}/update", b.shadow_root()),
            format!("{}/update/accepted", b.shadow_root()),
            b.state(),
            "$aws/things/ns_b/shadow/update".to_string(),
            "$aws/things/ns_b/shadow/update/delta".to_string(),
        ];
        for acl in &acls {
            for topic in &theirs {
                assert!(
                    !filter_matches(&acl.topic, topic),
                    "{acl:?} matches {topic}"
                );
            }
        }
        let ours = [
            format!("{}/update", a.shadow_root()),
            format!("{}/get/accepted", a.shadow_root()),
            "$aws/things/ns_a/shadow/update/delta".to_string(),
        ];
        for topic in &ours {
            assert!(
                acls.iter().any(|acl| filter_matches(&acl.topic, topic)),
                "{topic}"
            );
        }
        assert!(thing_acls(&a, "bad/name", &layout).is_err());
    }
}
