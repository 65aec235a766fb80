//! Admin client of Mosquitto's dynamic-security plugin: JSON commands on
//! `$CONTROL/dynamic-security/v1`, answers on `…/v1/response`, matched by `correlationData`.
//!
//! Errors carry the command name and the plugin's error text ("Client not found"), never the
//! command itself, which may hold a password.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

#[derive(Debug, Clone, thiserror::Error)]
pub enum DynsecError {
    #[error("dynsec {command}: no answer within {timeout:?}")]
    Timeout {
        command: &'static str,
        timeout: Duration,
    },
    /// The command could not be handed to the connection, or the connection went away before
    /// the answer came. Only the text of the client's error is kept: its `Debug` carries the
    /// request, and the request may hold a password.
    #[error("dynsec {command}: not sent: {message}")]
    Send {
        command: &'static str,
        message: String,
    },
    #[error("dynsec {command}: {error}")]
    Command {
        command: &'static str,
        error: String,
    },
    /// A broker client of that name exists and was not made for this Thing.
    #[error("broker client {0} exists and is not managed by this Thing")]
    Foreign(String),
    /// A broker role of that name exists and is marked as someone else's.
    #[error("broker role {0} exists and is not managed by this Thing")]
    ForeignRole(String),
}

/// How the operator recognises what is its own on a shared broker: the `textname` of a client or
/// role it made. A mark written by an older version (without the Thing's uid) is still
/// recognised, and replaced by the current one.
#[derive(Debug, Clone, Copy)]
pub struct OwnerMark<'a> {
    pub current: &'a str,
    pub legacy: Option<&'a str>,
}

/// What a found `textname` means for an [`OwnerMark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkMatch {
    Current,
    /// Ours under an older mark: to be rewritten.
    Legacy,
    Other,
}

impl<'a> OwnerMark<'a> {
    pub fn new(current: &'a str) -> Self {
        Self {
            current,
            legacy: None,
        }
    }

    pub fn check(&self, found: Option<&str>) -> MarkMatch {
        match found {
            Some(f) if f == self.current => MarkMatch::Current,
            Some(f) if Some(f) == self.legacy => MarkMatch::Legacy,
            _ => MarkMatch::Other,
        }
    }
}

fn textname(value: &Value) -> Option<&str> {
    value.get("textname").and_then(Value::as_str)
}

impl DynsecError {
    fn is(&self, text: &str) -> bool {
        matches!(self, DynsecError::Command { error, .. } if error.contains(text))
    }

    pub fn is_not_found(&self) -> bool {
        self.is("not found")
    }

    pub fn is_already_exists(&self) -> bool {
        self.is("already exists")
    }
}

/// One ACL entry of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    pub acltype: &'static str,
    pub topic: String,
    pub allow: bool,
    /// Higher is checked first; the first matching ACL decides.
    pub priority: i64,
}

impl Acl {
    pub fn allow(acltype: &'static str, topic: impl Into<String>) -> Self {
        Self {
            acltype,
            topic: topic.into(),
            allow: true,
            priority: 0,
        }
    }

    /// A refusal checked after every allow of the role: it makes the role deny what it does not
    /// allow even on a broker whose default ACL access is permissive.
    pub fn deny_rest(acltype: &'static str) -> Self {
        Self {
            acltype,
            topic: "#".into(),
            allow: false,
            priority: -1,
        }
    }

    fn to_json(&self) -> Value {
        json!({"acltype": self.acltype, "topic": self.topic, "allow": self.allow, "priority": self.priority})
    }
}

/// A broker client as the operator wants it.
pub struct ClientSpec<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub client_id: &'a str,
    pub role: &'a str,
    /// Marks the client (and its role) as ours (`textname`): an existing client or role with
    /// another mark is never touched, so a Thing cannot take over someone else's broker account.
    pub owner: OwnerMark<'a>,
}

/// A fingerprint of a password, kept in the client's `textdescription`: the plugin only stores
/// a salted hash, so this is how the operator knows whether the broker already has the
/// Secret's password without setting it again (which would disconnect the device). The
/// password is 32 random alphanumerics, so a truncated SHA-256 reveals nothing usable.
pub fn password_mark(password: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "pw-sha256:{}",
        &hex::encode(Sha256::digest(password.as_bytes()))[..16]
    )
}

pub struct Dynsec {
    client: AsyncClient,
    pending: Mutex<HashMap<String, oneshot::Sender<Result<Value, String>>>>,
    timeout: Duration,
}

impl Dynsec {
    pub fn new(client: AsyncClient, timeout: Duration) -> Self {
        Self {
            client,
            pending: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Result<Value, String>>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes one message from [`RESPONSE_TOPIC`] to the waiting command. Answers to other
    /// admin clients' commands (same topic, other correlation ids) are ignored.
    pub fn handle_response(&self, payload: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(payload) else {
            tracing::debug!("ignoring an unparsable dynsec response");
            return;
        };
        let Some(responses) = value.get("responses").and_then(Value::as_array) else {
            return;
        };
        for r in responses {
            let Some(id) = r.get("correlationData").and_then(Value::as_str) else {
                continue;
            };
            let Some(tx) = self.pending().remove(id) else {
                continue;
            };
            let answer = match r.get("error").and_then(Value::as_str) {
                Some(e) => Err(e.to_string()),
                None => Ok(r.get("data").cloned().unwrap_or(Value::Null)),
            };
            let _ = tx.send(answer);
        }
    }

    /// Fails every command still waiting: after a reconnect with a clean session their answers
    /// will never come, and waiting for the timeout would only delay the retry.
    pub fn fail_pending(&self) {
        self.pending().clear();
    }

    /// Sends one command (`body` without `command`/`correlationData`) and waits for its answer.
    pub async fn command(
        &self,
        command: &'static str,
        mut body: Value,
    ) -> Result<Value, DynsecError> {
        let id = format!("{:032x}", rand::random::<u128>());
        body["command"] = Value::String(command.into());
        body["correlationData"] = Value::String(id.clone());
        let payload = json!({ "commands": [body] });
        let (tx, rx) = oneshot::channel();
        self.pending().insert(id.clone(), tx);
        let sent = self
            .client
            .publish(
                CONTROL_TOPIC,
                QoS::AtLeastOnce,
                false,
                payload.to_string().into_bytes(),
            )
            .await;
        if let Err(e) = sent {
            self.pending().remove(&id);
            return Err(DynsecError::Send {
                command,
                message: e.to_string(),
            });
        }
        let answer = tokio::time::timeout(self.timeout, rx).await;
        self.pending().remove(&id);
        match answer {
            Ok(Ok(Ok(data))) => Ok(data),
            Ok(Ok(Err(error))) => Err(DynsecError::Command { command, error }),
            // Dropped by `fail_pending`: the connection went away before the answer came.
            Ok(Err(_)) => Err(DynsecError::Send {
                command,
                message: "connection to the broker lost".into(),
            }),
            Err(_) => Err(DynsecError::Timeout {
                command,
                timeout: self.timeout,
            }),
        }
    }

    /// Creates the role with exactly `acls`, or repairs an existing one whose ACLs drifted. With
    /// `owner`, the role carries the mark and an existing role with another mark is left alone
    /// (`ForeignRole`); one with no mark at all is marked and taken: callers check
    /// [`Dynsec::role_is_foreign`] first, which allows that only beside a client of theirs.
    pub async fn ensure_role(
        &self,
        rolename: &str,
        acls: &[Acl],
        owner: Option<OwnerMark<'_>>,
    ) -> Result<(), DynsecError> {
        let acl_json: Vec<Value> = acls.iter().map(Acl::to_json).collect();
        let mut create = json!({"rolename": rolename, "acls": acl_json});
        if let Some(owner) = owner {
            create["textname"] = Value::String(owner.current.into());
        }
        match self.command("createRole", create).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
        let data = self
            .command("getRole", json!({"rolename": rolename}))
            .await?;
        if let Some(owner) = owner {
            let found = data.get("role").and_then(textname);
            match (owner.check(found), found) {
                (MarkMatch::Current, _) => {}
                (MarkMatch::Legacy, _) | (MarkMatch::Other, None | Some("")) => {
                    self.command(
                        "modifyRole",
                        json!({"rolename": rolename, "textname": owner.current}),
                    )
                    .await?;
                }
                (MarkMatch::Other, Some(_)) => {
                    return Err(DynsecError::ForeignRole(rolename.to_string()));
                }
            }
        }
        let existing: Vec<(String, String, bool)> = data
            .pointer("/role/acls")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|acl| {
                        (
                            acl.get("acltype")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            acl.get("topic")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            acl.get("allow").and_then(Value::as_bool).unwrap_or(false),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (acltype, topic, allow) in &existing {
            let wanted = acls
                .iter()
                .any(|a| a.acltype == acltype && &a.topic == topic && a.allow == *allow);
            if !wanted {
                tracing::info!(
                    role = rolename,
                    acltype,
                    topic,
                    "removing an ACL the role should not have"
                );
                self.command(
                    "removeRoleACL",
                    json!({"rolename": rolename, "acltype": acltype, "topic": topic}),
                )
                .await?;
            }
        }
        for acl in acls {
            if !existing.iter().any(|(t, topic, allow)| {
                t == acl.acltype && topic == &acl.topic && *allow == acl.allow
            }) {
                let mut body = acl.to_json();
                body["rolename"] = Value::String(rolename.into());
                match self.command("addRoleACL", body).await {
                    Ok(_) => {}
                    Err(e) if e.is_already_exists() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The client's data, `None` when it does not exist.
    pub async fn get_client(&self, username: &str) -> Result<Option<Value>, DynsecError> {
        match self
            .command("getClient", json!({"username": username}))
            .await
        {
            Ok(data) => Ok(data.get("client").cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates the client, or brings an existing one of ours back to the spec (password,
    /// client id, role). Returns whether it was created.
    pub async fn ensure_client(&self, spec: &ClientSpec<'_>) -> Result<bool, DynsecError> {
        let create = json!({
            "username": spec.username,
            "password": spec.password,
            "clientid": spec.client_id,
            "textname": spec.owner.current,
            "textdescription": password_mark(spec.password),
            "roles": [{"rolename": spec.role, "priority": 0}],
        });
        match self.command("createClient", create).await {
            Ok(_) => return Ok(true),
            Err(e) if e.is_already_exists() => {}
            Err(e) => return Err(e),
        }
        let Some(existing) = self.get_client(spec.username).await? else {
            // Deleted between the two calls: the next reconcile creates it.
            return Err(DynsecError::Command {
                command: "getClient",
                error: "Client not found".into(),
            });
        };
        match spec.owner.check(textname(&existing)) {
            MarkMatch::Current => {}
            MarkMatch::Legacy => {
                self.command(
                    "modifyClient",
                    json!({"username": spec.username, "textname": spec.owner.current}),
                )
                .await?;
            }
            MarkMatch::Other => return Err(DynsecError::Foreign(spec.username.to_string())),
        }
        // The Secret holds the truth; the broker follows it (covers a crash between writing a
        // new password into the Secret and telling the broker). Only when it differs: setting
        // a password disconnects the device.
        let mark = password_mark(spec.password);
        if existing.get("textdescription").and_then(Value::as_str) != Some(mark.as_str()) {
            self.command(
                "modifyClient",
                json!({"username": spec.username, "password": spec.password, "textdescription": mark}),
            )
            .await?;
        }
        if existing.get("clientid").and_then(Value::as_str) != Some(spec.client_id) {
            self.command(
                "setClientId",
                json!({"username": spec.username, "clientid": spec.client_id}),
            )
            .await?;
        }
        let has_role = existing
            .get("roles")
            .and_then(Value::as_array)
            .is_some_and(|r| {
                r.iter()
                    .any(|r| r.get("rolename").and_then(Value::as_str) == Some(spec.role))
            });
        if !has_role {
            self.command(
                "addClientRole",
                json!({"username": spec.username, "rolename": spec.role, "priority": 0}),
            )
            .await?;
        }
        Ok(false)
    }

    /// Adds a role to a client unless it has it (the plugin answers a duplicate with an error).
    pub async fn ensure_client_role(
        &self,
        username: &str,
        rolename: &str,
    ) -> Result<(), DynsecError> {
        let Some(client) = self.get_client(username).await? else {
            return Err(DynsecError::Command {
                command: "getClient",
                error: "Client not found".into(),
            });
        };
        let has = client
            .get("roles")
            .and_then(Value::as_array)
            .is_some_and(|r| {
                r.iter()
                    .any(|r| r.get("rolename").and_then(Value::as_str) == Some(rolename))
            });
        if !has {
            self.command(
                "addClientRole",
                json!({"username": username, "rolename": rolename, "priority": 0}),
            )
            .await?;
        }
        Ok(())
    }

    /// Deletes a client of ours; gone already is fine; someone else's is left alone. Returns
    /// whether a client of ours was there (what proves an unmarked role beside it ours).
    pub async fn delete_client(
        &self,
        username: &str,
        owner: OwnerMark<'_>,
    ) -> Result<bool, DynsecError> {
        let Some(existing) = self.get_client(username).await? else {
            return Ok(false);
        };
        if owner.check(textname(&existing)) == MarkMatch::Other {
            return Err(DynsecError::Foreign(username.to_string()));
        }
        self.delete("deleteClient", json!({"username": username}))
            .await?;
        Ok(true)
    }

    /// Deletes a role of ours; gone already is fine; one marked by someone else is left alone
    /// (`ForeignRole`). An unmarked role (made before roles carried marks) is deleted only when
    /// `unmarked_is_ours`: the caller just proved the client of that name was its own.
    pub async fn delete_role(
        &self,
        rolename: &str,
        owner: OwnerMark<'_>,
        unmarked_is_ours: bool,
    ) -> Result<(), DynsecError> {
        if self
            .role_is_foreign(rolename, owner, unmarked_is_ours)
            .await?
        {
            return Err(DynsecError::ForeignRole(rolename.to_string()));
        }
        self.delete("deleteRole", json!({"rolename": rolename}))
            .await
    }

    /// Whether a role of that name exists and is not ours: marked by someone else, or unmarked
    /// when `unmarked_is_ours` is false (an unmarked role is ours only beside a client of ours,
    /// as earlier versions left them).
    pub async fn role_is_foreign(
        &self,
        rolename: &str,
        owner: OwnerMark<'_>,
        unmarked_is_ours: bool,
    ) -> Result<bool, DynsecError> {
        let existing = match self.command("getRole", json!({"rolename": rolename})).await {
            Ok(data) => data,
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        };
        let found = existing.get("role").and_then(textname);
        Ok(match owner.check(found) {
            MarkMatch::Current | MarkMatch::Legacy => false,
            MarkMatch::Other if found.is_some_and(|f| !f.is_empty()) => true,
            MarkMatch::Other => !unmarked_is_ours,
        })
    }

    /// A delete command whose target may already be gone: that counts as done.
    async fn delete(&self, command: &'static str, body: Value) -> Result<(), DynsecError> {
        match self.command(command, body).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}
