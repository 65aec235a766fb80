//! Shared access signatures, as IoT Hub documents them: a connection string names the hub, a
//! policy and its key; a token is `SharedAccessSignature sr=<urlencoded resource>&sig=<urlencoded
//! base64 HMAC-SHA256(key, sr + "\n" + expiry)>&se=<expiry>&skn=<policy>`, signed with the
//! base64-decoded key. Pure: the pipeline policy that puts a token on every request and renews
//! it before it expires is `client::SasPolicy`.
//!
//! The key never reaches a message: [`ConnectionString`]'s `Debug` leaves it out, and parse
//! errors name the part that is wrong, never its value.

use azure_core::credentials::Secret;

/// A hub-level connection string (`HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`).
pub struct ConnectionString {
    pub host_name: String,
    pub key_name: String,
    key: Secret,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a connection string (never its content).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConnectionStringError {
    #[error("the connection string has no {0}")]
    Missing(&'static str),
    #[error("the connection string's SharedAccessKey is not base64")]
    KeyNotBase64,
    #[error("the connection string names a device (DeviceId): the operator needs a hub policy")]
    DeviceString,
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<Self, ConnectionStringError> {
        let mut host_name = None;
        let mut key_name = None;
        let mut key = None;
        for part in text.trim().split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            match k.trim() {
                "HostName" => host_name = Some(v.trim().to_string()),
                "SharedAccessKeyName" => key_name = Some(v.trim().to_string()),
                "SharedAccessKey" => key = Some(v.trim().to_string()),
                "DeviceId" => return Err(ConnectionStringError::DeviceString),
                _ => {}
            }
        }
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or(ConnectionStringError::Missing("SharedAccessKey"))?;
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&key)
            .map_err(|_| ConnectionStringError::KeyNotBase64)?;
        Ok(Self {
            host_name: host_name
                .filter(|h| !h.is_empty())
                .ok_or(ConnectionStringError::Missing("HostName"))?,
            key_name: key_name
                .filter(|k| !k.is_empty())
                .ok_or(ConnectionStringError::Missing("SharedAccessKeyName"))?,
            key: Secret::new(key),
        })
    }

    /// A token for the whole hub, valid until `expiry` (seconds since the epoch).
    pub fn token(&self, expiry: i64) -> Result<String, azure_core::Error> {
        token(&self.host_name, Some(&self.key_name), &self.key, expiry)
    }

    /// A token with this policy's key for the hub `host_name` (the configured one).
    pub fn token_for(&self, host_name: &str, expiry: i64) -> Result<String, azure_core::Error> {
        token(host_name, Some(&self.key_name), &self.key, expiry)
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A SAS token for `resource` (e.g. `myhub.azure-devices.net` or
/// `myhub.azure-devices.net/devices/dev1`) signed with the base64 `key`.
pub fn token(
    resource: &str,
    key_name: Option<&str>,
    key: &Secret,
    expiry: i64,
) -> Result<String, azure_core::Error> {
    let sr = urlencode(resource);
    let sig = azure_core::hmac::hmac_sha256(&format!("{sr}\n{expiry}"), key)?;
    let mut token = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        urlencode(&sig)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&urlencode(name));
    }
    Ok(token)
}

/// The `sig` of a token, decoded (tests compare it with the documented vectors).
#[cfg(test)]
fn signature_of(token: &str) -> String {
    let sig = token
        .split('&')
        .find_map(|p| p.strip_prefix("sig="))
        .unwrap_or_default();
    url::form_urlencoded::parse(format!("s={sig}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

    #[test]
    fn tokens_match_the_documented_algorithm() {
        // Vectors from docs (shared/testenv.md): HMAC-SHA256 over urlencode(uri) + "\n" + expiry.
        let key = Secret::new(KEY);
        let hub = token("myhub.azure-devices.net", None, &key, 1_700_000_000).unwrap();
        assert_eq!(
            signature_of(&hub),
            "sJAIZTF5oG40VHrie96heZ865+nR4QavBvHnzxZm8rk="
        );
        assert!(hub.starts_with("SharedAccessSignature sr=myhub.azure-devices.net&sig="));
        assert!(hub.ends_with("&se=1700000000"));
        let device = token(
            "myhub.azure-devices.net/devices/dev1",
            Some("iothubowner"),
            &key,
            1_700_000_000,
        )
        .unwrap();
        assert!(device.contains("sr=myhub.azure-devices.net%2Fdevices%2Fdev1&"));
        assert_eq!(
            signature_of(&device),
            "wosmA3uJK9T0mdB5CIYn+sAVA2ODflnucuvNO5S6mbM="
        );
        assert!(device.ends_with("&skn=iothubowner"));
    }

    #[test]
    fn connection_strings_are_parsed_and_their_key_never_shown() {
        let cs = ConnectionString::parse(&format!(
            "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}\n"
        ))
        .unwrap();
        assert_eq!(cs.host_name, "myhub.azure-devices.net");
        assert_eq!(cs.key_name, "iothubowner");
        assert!(!format!("{cs:?}").contains(KEY));
        let t = cs.token(1_700_000_000).unwrap();
        assert_eq!(
            signature_of(&t),
            "sJAIZTF5oG40VHrie96heZ865+nR4QavBvHnzxZm8rk="
        );
        let table = [
            (
                "HostName=h;SharedAccessKeyName=p",
                ConnectionStringError::Missing("SharedAccessKey"),
            ),
            (
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=!!",
                ConnectionStringError::KeyNotBase64,
            ),
            (
                "HostName=h;DeviceId=d;SharedAccessKey=AAAA",
                ConnectionStringError::DeviceString,
            ),
            (
                "SharedAccessKeyName=p;SharedAccessKey=AAAA",
                ConnectionStringError::Missing("HostName"),
            ),
        ];
        for (text, want) in table {
            let e = ConnectionString::parse(text).unwrap_err();
            assert_eq!(e, want, "{text}");
            assert!(!e.to_string().contains("AAAA"));
        }
    }
}
