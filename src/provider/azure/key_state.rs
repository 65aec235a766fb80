//! The Secret of a symmetric-key (SAS) device, pure: the working key as a device connection
//! string, and the operator's rotation journal next to it. No I/O: `symmetric` decides what goes
//! in and writes it.
//!
//! A rotation moves a key through three slots, each a whole device connection string so that
//! anything reading the Secret can use it as-is:
//! - `next.connectionString`: a new key, written before the hub hears of it (a crash can never
//!   leave the hub with a key the cluster lost); the device keeps using `connectionString`;
//! - `connectionString`: the working key, the hub's primary;
//! - `previous.connectionString`: the key a rotation replaced, still the hub's secondary until
//!   `previousRevokeAt`, so a device that has not reloaded the Secret keeps connecting.
//!
//! Bookkeeping (`issuedAt`, `previousRevokeAt`, `rotationToken`) is spelled as for certificates
//! (`credentials::codec::keys`).

use chrono::{DateTime, Utc};

use super::{client::Authentication, credentials::keys as azure_keys};
use crate::credentials::{
    SecretData,
    codec::{DeviceFacts, keys, text},
};

/// The device connection strings of the three slots.
pub mod slots {
    pub const CONNECTION_STRING: &str = "connectionString";
    pub const NEXT_CONNECTION_STRING: &str = "next.connectionString";
    pub const PREVIOUS_CONNECTION_STRING: &str = "previous.connectionString";
}

/// A SAS device's keys and their journal. `Debug` leaves the keys out.
#[derive(Clone, Default, PartialEq)]
pub struct KeyState {
    /// The working key (the hub's primary).
    pub key: Option<String>,
    /// A rotation's new key, not yet the working one.
    pub next_key: Option<String>,
    /// The key a rotation replaced, valid until `previous_revoke_at`.
    pub previous_key: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub previous_revoke_at: Option<DateTime<Utc>>,
    /// The last handled value of the rotate annotation.
    pub rotation_token: Option<String>,
}

impl std::fmt::Debug for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyState")
            .field("has_key", &self.key.is_some())
            .field("has_next_key", &self.next_key.is_some())
            .field("has_previous_key", &self.previous_key.is_some())
            .field("issued_at", &self.issued_at)
            .field("previous_revoke_at", &self.previous_revoke_at)
            .finish_non_exhaustive()
    }
}

/// `HostName=..;DeviceId=..;SharedAccessKey=..`, as IoT Hub's device SDKs take it.
pub fn connection_string(host_name: &str, device_id: &str, key: &str) -> String {
    format!("HostName={host_name};DeviceId={device_id};SharedAccessKey={key}")
}

/// The key of a device connection string held under `slot`.
fn key_in(data: &SecretData, slot: &str) -> Option<String> {
    let cs = text(data, slot)?;
    cs.split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

fn time(data: &SecretData, key: &str) -> Option<DateTime<Utc>> {
    text(data, key)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl KeyState {
    /// Reads the state back; missing or malformed entries count as absent.
    pub fn from_data(data: &SecretData) -> Self {
        KeyState {
            key: key_in(data, slots::CONNECTION_STRING),
            next_key: key_in(data, slots::NEXT_CONNECTION_STRING),
            previous_key: key_in(data, slots::PREVIOUS_CONNECTION_STRING),
            issued_at: time(data, keys::ISSUED_AT),
            previous_revoke_at: time(data, keys::PREVIOUS_REVOKE_AT),
            rotation_token: text(data, keys::ROTATION_TOKEN).filter(|t| !t.is_empty()),
        }
    }

    /// The whole Secret: facts, host name, device id, the slots and the journal.
    pub fn to_data(&self, facts: &DeviceFacts, host_name: &str) -> SecretData {
        let mut d = SecretData::new();
        let device_id = &facts.thing_name;
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                d.insert(k.to_string(), v.into_bytes());
            }
        };
        put(keys::ENDPOINT, Some(facts.endpoint.clone()));
        put(keys::THING_NAME, Some(facts.thing_name.clone()));
        put(keys::CLIENT_ID, Some(facts.client_id.clone()));
        put(azure_keys::HOST_NAME, Some(host_name.to_string()));
        put(azure_keys::DEVICE_ID, Some(device_id.clone()));
        let cs = |k: &Option<String>| {
            k.as_deref()
                .map(|k| connection_string(host_name, device_id, k))
        };
        put(slots::CONNECTION_STRING, cs(&self.key));
        put(slots::NEXT_CONNECTION_STRING, cs(&self.next_key));
        put(slots::PREVIOUS_CONNECTION_STRING, cs(&self.previous_key));
        put(keys::ISSUED_AT, self.issued_at.map(|t| t.to_rfc3339()));
        put(
            keys::PREVIOUS_REVOKE_AT,
            self.previous_revoke_at.map(|t| t.to_rfc3339()),
        );
        put(keys::ROTATION_TOKEN, self.rotation_token.clone());
        if let Some(ca) = &facts.ca {
            d.insert(keys::CA.to_string(), ca.clone());
        }
        d
    }

    /// Whether the device with `auth` is proven to be this Thing's: one of its keys is in one of
    /// the Secret's slots (nobody outside the cluster can know them; a crash in a rotation may
    /// leave the hub on the next or the previous key).
    pub fn proves(&self, auth: &Authentication) -> bool {
        let k = &auth.symmetric_key;
        let hub = [&k.primary_key, &k.secondary_key];
        [&self.key, &self.next_key, &self.previous_key]
            .into_iter()
            .flatten()
            .any(|mine| hub.iter().any(|h| h.as_deref() == Some(mine.as_str())))
    }

    /// Whether the previous key's overlap is over at `now`.
    pub fn overlap_over(&self, now: DateTime<Utc>) -> bool {
        self.previous_key.is_some() && self.previous_revoke_at.is_none_or(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::azure::client::SymmetricKeys;

    fn facts() -> DeviceFacts {
        DeviceFacts {
            endpoint: "h:8883".into(),
            thing_name: "dev".into(),
            client_id: "dev".into(),
            ca: None,
        }
    }

    fn auth(primary: &str, secondary: &str) -> Authentication {
        Authentication {
            type_: "sas".into(),
            symmetric_key: SymmetricKeys {
                primary_key: Some(primary.into()),
                secondary_key: Some(secondary.into()),
            },
            ..Authentication::default()
        }
    }

    #[test]
    fn the_slots_round_trip_as_connection_strings_and_debug_hides_keys() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let state = KeyState {
            key: Some("k-new".into()),
            previous_key: Some("k-old".into()),
            issued_at: Some(now),
            previous_revoke_at: Some(now + chrono::Duration::hours(1)),
            rotation_token: Some("r1".into()),
            ..KeyState::default()
        };
        let data = state.to_data(&facts(), "h");
        assert_eq!(
            text(&data, slots::CONNECTION_STRING).as_deref(),
            Some("HostName=h;DeviceId=dev;SharedAccessKey=k-new")
        );
        assert_eq!(
            text(&data, slots::PREVIOUS_CONNECTION_STRING).as_deref(),
            Some("HostName=h;DeviceId=dev;SharedAccessKey=k-old")
        );
        assert!(!data.contains_key(slots::NEXT_CONNECTION_STRING));
        assert_eq!(KeyState::from_data(&data), state);
        assert!(!format!("{state:?}").contains("k-new"));
        assert!(!state.overlap_over(now));
        assert!(state.overlap_over(now + chrono::Duration::hours(2)));
    }

    #[test]
    fn any_slot_proves_the_device_and_nothing_else_does() {
        let a = auth("k1", "k2");
        let with = |slot: fn(&mut KeyState) -> &mut Option<String>, key: &str| {
            let mut s = KeyState::default();
            *slot(&mut s) = Some(key.into());
            s
        };
        assert!(with(|s| &mut s.key, "k1").proves(&a));
        assert!(with(|s| &mut s.next_key, "k1").proves(&a));
        assert!(with(|s| &mut s.previous_key, "k2").proves(&a));
        assert!(!with(|s| &mut s.key, "k3").proves(&a));
        // A marker or anything else a tenant could write proves nothing.
        let mut forged = SecretData::new();
        forged.insert(keys::PENDING_SINCE.into(), b"2026-01-01T00:00:00Z".to_vec());
        forged.insert(
            slots::CONNECTION_STRING.into(),
            b"HostName=h;DeviceId=dev".to_vec(),
        );
        assert!(!KeyState::from_data(&forged).proves(&a));
    }
}
