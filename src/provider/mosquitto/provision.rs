//! Dynamic-security provisioning of one Thing: its role (exactly its own topics) and its broker
//! client (username = client id = thing name, the Secret's password, marked as the Thing's),
//! created or repaired. The Secret is written first, so the broker never holds a password the
//! device cannot read.

use super::{
    MosquittoProvider,
    dynsec::{Acl, ClientSpec, DynsecError, MarkMatch, OwnerMark},
    error::MosquittoError,
    naming::{ThingMarks, role_name},
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
    /// `Err(Foreign)` when a broker client named `username` exists with another owner mark;
    /// `Err(ForeignRole)` when its role is someone else's (marked so, or unmarked without a
    /// client of this Thing beside it).
    async fn check_names_free(
        &self,
        username: &str,
        owner: OwnerMark<'_>,
    ) -> Result<(), MosquittoError> {
        let client = self
            .dynsec
            .get_client(username)
            .await
            .map_err(MosquittoError::dynsec("getClient"))?;
        let client_is_ours = match client {
            Some(client)
                if owner.check(client.get("textname").and_then(|t| t.as_str()))
                    == MarkMatch::Other =>
            {
                return Err(MosquittoError::dynsec("getClient")(DynsecError::Foreign(
                    username.to_string(),
                )));
            }
            Some(_) => true,
            None => false,
        };
        let role = role_name(username);
        if self
            .dynsec
            .role_is_foreign(&role, owner, client_is_ours)
            .await
            .map_err(MosquittoError::dynsec("getRole"))?
        {
            return Err(MosquittoError::dynsec("getRole")(DynsecError::ForeignRole(
                role,
            )));
        }
        Ok(())
    }

    pub(super) async fn provision(
        &self,
        req: &DeviceRequest<'_>,
        topic: &ThingTopic,
        status: &mut ThingStatus,
    ) -> Result<(), MosquittoError> {
        let thing_name = &req.backend_name;
        let marks = ThingMarks::of(req.namespace, req.name, req.thing.metadata.uid.as_deref());
        let owner = marks.owner();
        // Before anything is issued or changed: a broker client or role of that name that is not
        // this Thing's gets no password or certificate for its username (with the mTLS listener
        // a certificate *is* the login), and both stay as they are.
        self.check_names_free(thing_name, owner)
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
                .ensure_role(&role, &acls, Some(owner))
                .await
                .map_err(MosquittoError::dynsec("ensureRole"))?;
            let spec = ClientSpec {
                username: thing_name,
                password: &password,
                client_id: thing_name,
                role: &role,
                owner,
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
