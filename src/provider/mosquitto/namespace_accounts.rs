//! The broker accounts that act for namespaces: one dynamic-security client and role per
//! namespace, whose ACL allows publishing, subscribing and receiving under that namespace's
//! topic roots and nothing else. Forwarding asks for them through
//! [`NamespaceIdentities`](crate::mqtt::identity::NamespaceIdentities).

use std::sync::Arc;

use async_trait::async_trait;
use rand::distr::{Alphanumeric, SampleString};

use super::{
    dynsec::{Acl, ClientSpec, Dynsec, DynsecError, OwnerMark},
    naming::{namespace_account, namespace_mark},
};
use crate::mqtt::identity::{BrokerLogin, IdentityError, NamespaceIdentities};

/// Issues namespace accounts over the operator's dynamic-security session.
pub struct NamespaceAccounts {
    dynsec: Arc<Dynsec>,
    cluster_id: Option<String>,
}

impl NamespaceAccounts {
    pub fn new(dynsec: Arc<Dynsec>, cluster_id: Option<String>) -> Self {
        Self { dynsec, cluster_id }
    }
}

/// Exactly the namespace's roots, for each kind of access; everything else refused.
fn namespace_acls(roots: &[String]) -> Vec<Acl> {
    let mut acls = Vec::new();
    for root in roots {
        let tree = format!("{}/#", root.trim_end_matches('/'));
        for acltype in [
            "publishClientSend",
            "publishClientReceive",
            "subscribePattern",
        ] {
            acls.push(Acl::allow(acltype, tree.clone()));
        }
    }
    for acltype in [
        "publishClientSend",
        "publishClientReceive",
        "subscribePattern",
    ] {
        acls.push(Acl::deny_rest(acltype));
    }
    acls
}

#[async_trait]
impl NamespaceIdentities for NamespaceAccounts {
    async fn ensure(
        &self,
        namespace: &str,
        roots: &[String],
    ) -> Result<BrokerLogin, IdentityError> {
        let failed = |e: DynsecError| IdentityError {
            namespace: namespace.to_string(),
            reason: e.to_string(),
        };
        let username = namespace_account(self.cluster_id.as_deref(), namespace);
        let mark = namespace_mark(self.cluster_id.as_deref(), namespace);
        // A fresh password per process: re-keying shuts out a replica that led before, and
        // nothing but this process ever needs the password. The client id stays the same, so
        // the broker's persistent session carries over to the next leader.
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let client_id = username.clone();
        self.dynsec
            .ensure_role(
                &username,
                &namespace_acls(roots),
                Some(OwnerMark::new(&mark)),
            )
            .await
            .map_err(failed)?;
        self.dynsec
            .ensure_client(&ClientSpec {
                username: &username,
                password: &password,
                client_id: &client_id,
                role: &username,
                owner: OwnerMark::new(&mark),
            })
            .await
            .map_err(failed)?;
        Ok(BrokerLogin {
            username,
            password,
            client_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_account_may_use_only_its_roots() {
        let acls = namespace_acls(&["things/namespaces/a".into(), "feeds/weather/".into()]);
        let allowed: Vec<_> = acls.iter().filter(|a| a.allow).collect();
        assert_eq!(allowed.len(), 6);
        assert!(
            allowed
                .iter()
                .all(|a| a.topic == "things/namespaces/a/#" || a.topic == "feeds/weather/#")
        );
        let denied: Vec<_> = acls.iter().filter(|a| !a.allow).collect();
        assert_eq!(denied.len(), 3);
        assert!(denied.iter().all(|a| a.topic == "#" && a.priority < 0));
    }
}
