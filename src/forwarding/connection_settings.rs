//! What a `BrokerConnection` connects to and with: its URL checked against the egress policy,
//! its login and client certificate read from Secrets of its own namespace, its TLS trust.
//!
//! This is where a tenant's spec makes the operator open a connection, so it guards three
//! things. Where: the host must resolve to addresses the egress policy allows (the one HTTP
//! sinks obey), and the session connects to the address that was checked, not to the name
//! again, on every reconnect (`mqtts://` keeps the name for SNI and the certificate). With what: Secrets are read only from the BrokerConnection's namespace (the
//! spec has no field for another), and a Secret whose values would leave the cluster (the
//! login, the client key) must opt in with [`CREDENTIALS_OPT_IN_LABEL`], or anyone allowed to
//! create a BrokerConnection could send any Secret of the namespace with keys
//! `username`/`password` to a broker of their choosing. And nothing read is ever in an error.

use std::{net::SocketAddr, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use super::broker_connections::{SessionSettings, reasons};
use crate::{api::BrokerConnection, egress::EgressPolicy, mqtt::connection::BrokerAddress};

/// The label (value `"true"`) a Secret needs before a BrokerConnection may send what it holds
/// (a login, a client key) to a broker.
pub const CREDENTIALS_OPT_IN_LABEL: &str = "iot.thing-operator.dev/broker-credentials";

/// The default keepalive of a tenant's connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Why no session can be made (yet). The message names Secrets and keys, never their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SettingsError {
    /// One of [`reasons`]: the BrokerConnection's condition reason.
    pub reason: &'static str,
    pub message: String,
}

impl SettingsError {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Builds the session settings of `connection` (in `namespace`, named `name`).
pub async fn session_settings(
    client: &Client,
    egress: &EgressPolicy,
    connection: &BrokerConnection,
    namespace: &str,
    name: &str,
) -> Result<SessionSettings, SettingsError> {
    let spec = &connection.spec;
    let mut address = BrokerAddress::parse(&spec.url).map_err(|e| {
        SettingsError::new(crate::api::conditions::reasons::INVALID_SPEC, e.to_string())
    })?;
    let checked = checked_address(egress, &address).await?;
    // Connect where the policy looked, on every reconnect too: a name resolving elsewhere
    // later (DNS rebinding) is not followed. TLS keeps the name for SNI and the certificate
    // check. The next reconcile resolves again (a broker that moved is followed once the
    // policy has checked its new address: the digest below changes and the session restarts).
    address.connect_to = Some(checked);
    if !address.tls {
        address.host = checked.ip().to_string();
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut digest = Sha256::new();
    digest.update(spec.url.as_bytes());
    digest.update(address.host.as_bytes());
    digest.update(checked.to_string().as_bytes());
    let login = match spec
        .auth
        .as_ref()
        .and_then(|a| a.username_password_secret.as_deref())
    {
        Some(secret) => {
            let data = read(&secrets, secret, true).await?;
            let username = text(&data, secret, "username")?;
            let password = text(&data, secret, "password")?;
            digest.update(b"\0login\0");
            digest.update(username.as_bytes());
            digest.update(b"\0");
            digest.update(password.as_bytes());
            Some((username, password))
        }
        None => None,
    };
    let tls = if address.tls {
        let tls_spec = spec.tls.clone().unwrap_or_default();
        let mut roots = rustls::RootCertStore::empty();
        match &tls_spec.ca_secret {
            Some(ca) => {
                let key = ca.key.as_deref().unwrap_or("ca.crt");
                let data = read(&secrets, &ca.name, false).await?;
                let pem = bytes(&data, &ca.name, key)?;
                digest.update(b"\0ca\0");
                digest.update(pem);
                for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem) {
                    let cert: rustls::pki_types::CertificateDer<'static> =
                        cert.map_err(|_| invalid(&ca.name, key, "not a PEM certificate"))?;
                    roots
                        .add(cert)
                        .map_err(|_| invalid(&ca.name, key, "not a usable CA certificate"))?;
                }
                if roots.is_empty() {
                    return Err(invalid(&ca.name, key, "holds no certificate"));
                }
            }
            None => {
                for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
                    let _ = roots.add(cert.clone());
                }
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match &tls_spec.client_certificate_secret {
            Some(secret) => {
                let data = read(&secrets, secret, true).await?;
                let (cert_pem, key_pem) = (
                    bytes(&data, secret, "tls.crt")?,
                    bytes(&data, secret, "tls.key")?,
                );
                digest.update(b"\0client\0");
                digest.update(cert_pem);
                digest.update(key_pem);
                let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
                    rustls::pki_types::pem::PemObject::pem_slice_iter(cert_pem)
                        .collect::<Result<_, _>>()
                        .map_err(|_| invalid(secret, "tls.crt", "not a PEM certificate"))?;
                let key: rustls::pki_types::PrivateKeyDer<'static> =
                    rustls::pki_types::pem::PemObject::from_pem_slice(key_pem)
                        .map_err(|_| invalid(secret, "tls.key", "not a PEM private key"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|_| invalid(secret, "tls.crt", "does not match tls.key"))?
            }
            None => builder.with_no_client_auth(),
        };
        Some(config)
    } else {
        None
    };
    let client_id = connection.client_id(namespace, name);
    let keep_alive = spec
        .keep_alive_seconds
        .map_or(KEEP_ALIVE, |s| Duration::from_secs(u64::from(s)));
    digest.update(b"\0id\0");
    digest.update(client_id.as_bytes());
    digest.update(keep_alive.as_secs().to_be_bytes());
    Ok(SessionSettings {
        address,
        tls,
        login,
        client_id,
        keep_alive,
        fingerprint: format!("{:x}", digest.finalize()),
    })
}

/// The first address of the broker's host the egress policy allows.
async fn checked_address(
    egress: &EgressPolicy,
    address: &BrokerAddress,
) -> Result<SocketAddr, SettingsError> {
    let refused = |e: crate::egress::Refusal| {
        SettingsError::new(reasons::DESTINATION_REFUSED, format!("url: {e}"))
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .map_err(|e| {
            SettingsError::new(
                reasons::CONNECT_FAILED,
                format!("resolving {}: {e}", address.host),
            )
        })?
        .collect();
    let allowed = egress.filter(&address.host, addrs).map_err(refused)?;
    let first = allowed.into_iter().next().ok_or_else(|| {
        SettingsError::new(
            reasons::DESTINATION_REFUSED,
            format!("url: {} resolves to no address", address.host),
        )
    })?;
    // The operator's own ports stay out of reach on inward addresses, as for HTTP sinks.
    let url = url::Url::parse(&format!("http://{first}/"))
        .map_err(|e| SettingsError::new(reasons::DESTINATION_REFUSED, format!("url: {e}")))?;
    egress.check_url(&url).map_err(refused)?;
    Ok(first)
}

fn invalid(secret: &str, key: &str, why: &str) -> SettingsError {
    SettingsError::new(
        reasons::SECRET_INVALID,
        format!("Secret {secret} key {key}: {why}"),
    )
}

type SecretData = std::collections::BTreeMap<String, k8s_openapi::ByteString>;

/// The data of Secret `name`; with `credentials`, only if it opted in to leave the cluster.
async fn read(
    secrets: &Api<Secret>,
    name: &str,
    credentials: bool,
) -> Result<SecretData, SettingsError> {
    let secret = match secrets.get_opt(name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(SettingsError::new(
                reasons::SECRET_MISSING,
                format!("Secret {name} not found in this namespace"),
            ));
        }
        Err(e) => {
            return Err(SettingsError::new(
                reasons::SECRET_MISSING,
                format!("reading Secret {name}: {e}"),
            ));
        }
    };
    let opted_in = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(CREDENTIALS_OPT_IN_LABEL))
        .is_some_and(|v| v == "true");
    if credentials && !opted_in {
        return Err(SettingsError::new(
            reasons::SECRET_INVALID,
            format!(
                "Secret {name} does not opt in: it needs the label {CREDENTIALS_OPT_IN_LABEL}=true"
            ),
        ));
    }
    Ok(secret.data.unwrap_or_default())
}

fn bytes<'d>(data: &'d SecretData, secret: &str, key: &str) -> Result<&'d [u8], SettingsError> {
    data.get(key).map(|v| v.0.as_slice()).ok_or_else(|| {
        SettingsError::new(
            reasons::SECRET_MISSING,
            format!("Secret {secret} has no key {key:?}"),
        )
    })
}

fn text(data: &SecretData, secret: &str, key: &str) -> Result<String, SettingsError> {
    let value = bytes(data, secret, key)?;
    String::from_utf8(value.to_vec())
        .map(|v| v.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|_| invalid(secret, key, "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inward_brokers_are_refused_unless_allowed() {
        let address = BrokerAddress::parse("mqtt://127.0.0.1:1884").expect("url");
        let refused = checked_address(&EgressPolicy::default(), &address)
            .await
            .expect_err("loopback is refused by default");
        assert_eq!(refused.reason, reasons::DESTINATION_REFUSED);
        let named = BrokerAddress::parse("mqtt://localhost:1884").expect("url");
        assert!(
            checked_address(&EgressPolicy::default(), &named)
                .await
                .is_err(),
            "a name resolving to loopback is refused too"
        );
        let allowing = EgressPolicy {
            allowed: vec!["127.0.0.0/8".parse().expect("cidr")],
            own_ports: vec![8080],
            ..EgressPolicy::default()
        };
        assert_eq!(
            checked_address(&allowing, &address).await,
            Ok("127.0.0.1:1884".parse().expect("addr"))
        );
        let own = BrokerAddress::parse("mqtt://127.0.0.1:8080").expect("url");
        assert!(
            checked_address(&allowing, &own).await.is_err(),
            "the operator's own port stays out of reach"
        );
    }
}
