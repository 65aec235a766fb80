//! The device Secret's layout, pure: which key holds what, and how the operator's bookkeeping
//! (certificate ids, issuance times, an interrupted issuance) is spelled next to the
//! credentials. No I/O: [`super::DeviceSecret`] reads and writes the bytes, the backends decide
//! what goes in, and this module is the one place that knows how it is encoded.
//!
//! Every layout starts from the same [`DeviceFacts`] (endpoint, thing name, client id, CA):
//! - [`CertificateState`]: an X.509 identity the backend registers (AWS), with the journal the
//!   crash-safe issuance and rotation flows keep in the Secret;
//! - [`LoginSecret`]: a broker login (Mosquitto), with a client certificate from the operator's
//!   CA when devices may use mTLS.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// A Secret's `data`, by key.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// Key names inside the device Secret, chosen to be mountable as-is.
pub mod keys {
    /// PEM device certificate.
    pub const CERTIFICATE: &str = "tls.crt";
    /// PEM private key.
    pub const PRIVATE_KEY: &str = "tls.key";
    /// PEM root CA(s) of the server the device connects to.
    pub const CA: &str = "ca.crt";
    /// Host (and port) of the MQTT endpoint.
    pub const ENDPOINT: &str = "endpoint";
    pub const THING_NAME: &str = "thingName";
    pub const CLIENT_ID: &str = "clientId";
    pub const USERNAME: &str = "username";
    pub const PASSWORD: &str = "password";
    /// Id of the certificate in `tls.crt` as the backend knows it.
    pub const CERTIFICATE_ID: &str = "certificateId";
    /// The Thing's topic tree (the REST message broker's topic of its URL).
    pub const TOPIC: &str = "topic";
    /// `host:port` of the mTLS listener, when devices get certificates from the operator's CA.
    pub const TLS_ENDPOINT: &str = "tlsEndpoint";

    // Operator bookkeeping kept next to the credentials (identifiers and times only).
    /// When the current certificate was issued.
    pub const ISSUED_AT: &str = "issuedAt";
    /// A certificate replaced by rotation, still valid until `previousRevokeAt`.
    pub const PREVIOUS_CERTIFICATE_ID: &str = "previousCertificateId";
    pub const PREVIOUS_REVOKE_AT: &str = "previousRevokeAt";
    /// Set just before a call that creates a key in the backend, cleared by the write that
    /// stores the key.
    pub const PENDING_SINCE: &str = "pendingCertificateSince";
    /// `start/end` of each key-creating call whose answer was lost, comma-separated.
    pub const ORPHAN_WINDOW: &str = "orphanWindow";
    /// A rotation's new certificate and key, kept apart from `tls.crt`/`tls.key` (which the
    /// device keeps using) until the new certificate is registered, active and attached.
    pub const NEXT_CERTIFICATE: &str = "next.crt";
    pub const NEXT_PRIVATE_KEY: &str = "next.key";
    pub const NEXT_CERTIFICATE_ID: &str = "nextCertificateId";
    /// The last handled value of the rotate annotation.
    pub const ROTATION_TOKEN: &str = "rotationToken";
}

/// Creation times of the backend and of this operator's clock may differ a little: an
/// interrupted issuance's window is widened by this much on both sides.
pub const CLOCK_SKEW: chrono::Duration = chrono::Duration::seconds(10);

/// One key as UTF-8 text.
pub fn text(data: &SecretData, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.clone()).ok())
}

fn time(data: &SecretData, key: &str) -> Option<DateTime<Utc>> {
    text(data, key)
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn put(data: &mut SecretData, key: &str, value: Option<String>) {
    if let Some(v) = value {
        data.insert(key.to_string(), v.into_bytes());
    }
}

/// Non-secret facts every device Secret carries next to its credentials.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceFacts {
    /// `host:port` the device connects to.
    pub endpoint: String,
    pub thing_name: String,
    pub client_id: String,
    /// PEM root CA(s) of that endpoint, when the device needs them.
    pub ca: Option<Vec<u8>>,
}

impl DeviceFacts {
    fn put_into(&self, data: &mut SecretData) {
        put(data, keys::ENDPOINT, Some(self.endpoint.clone()));
        put(data, keys::THING_NAME, Some(self.thing_name.clone()));
        put(data, keys::CLIENT_ID, Some(self.client_id.clone()));
        if let Some(ca) = &self.ca {
            data.insert(keys::CA.to_string(), ca.clone());
        }
    }
}

/// The certificate and key in `data` (PEM), when both are there.
pub fn certificate_pair(data: &SecretData) -> Option<(String, String)> {
    Some((
        text(data, keys::CERTIFICATE)?,
        text(data, keys::PRIVATE_KEY)?,
    ))
}

/// An X.509 device identity registered with the backend, and the operator's journal of it.
/// `Debug` leaves the key out.
#[derive(Clone, Default, PartialEq)]
pub struct CertificateState {
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
    pub cert_id: Option<String>,
    pub issued_at: Option<DateTime<Utc>>,
    pub previous_cert_id: Option<String>,
    pub previous_revoke_at: Option<DateTime<Utc>>,
    pub pending_since: Option<DateTime<Utc>>,
    /// One window per interrupted key-creating call, each bounded by that call (never merged:
    /// a merged window would span the time between the calls).
    pub orphan_windows: Vec<(DateTime<Utc>, DateTime<Utc>)>,
    pub rotation_token: Option<String>,
    /// A rotation in progress: the certificate that replaces `cert_pem` once it is active and
    /// attached. Until then the device keeps the working key.
    pub next_cert_pem: Option<String>,
    pub next_key_pem: Option<String>,
    pub next_cert_id: Option<String>,
}

impl std::fmt::Debug for CertificateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateState")
            .field("has_key", &self.key_pem.is_some())
            .field("cert_id", &self.cert_id)
            .field("previous_cert_id", &self.previous_cert_id)
            .field("pending_since", &self.pending_since)
            .field("orphan_windows", &self.orphan_windows)
            .field("next_cert_id", &self.next_cert_id)
            .finish_non_exhaustive()
    }
}

impl CertificateState {
    /// Reads the state back; missing, empty or malformed entries count as absent.
    pub fn from_data(data: &SecretData) -> Self {
        let text = |k| text(data, k).filter(|s| !s.is_empty());
        let orphan_windows = text(keys::ORPHAN_WINDOW)
            .map(|all| {
                all.split(',')
                    .filter_map(|w| {
                        let (a, b) = w.split_once('/')?;
                        let a = DateTime::parse_from_rfc3339(a).ok()?.with_timezone(&Utc);
                        let b = DateTime::parse_from_rfc3339(b).ok()?.with_timezone(&Utc);
                        Some((a, b))
                    })
                    .collect()
            })
            .unwrap_or_default();
        CertificateState {
            cert_pem: text(keys::CERTIFICATE),
            key_pem: text(keys::PRIVATE_KEY),
            cert_id: text(keys::CERTIFICATE_ID),
            issued_at: time(data, keys::ISSUED_AT),
            previous_cert_id: text(keys::PREVIOUS_CERTIFICATE_ID),
            previous_revoke_at: time(data, keys::PREVIOUS_REVOKE_AT),
            pending_since: time(data, keys::PENDING_SINCE),
            orphan_windows,
            rotation_token: text(keys::ROTATION_TOKEN),
            next_cert_pem: text(keys::NEXT_CERTIFICATE),
            next_key_pem: text(keys::NEXT_PRIVATE_KEY),
            next_cert_id: text(keys::NEXT_CERTIFICATE_ID),
        }
    }

    /// The whole Secret: the facts, the credentials and the journal.
    pub fn to_data(&self, facts: &DeviceFacts) -> SecretData {
        let mut d = SecretData::new();
        facts.put_into(&mut d);
        put(&mut d, keys::CERTIFICATE, self.cert_pem.clone());
        put(&mut d, keys::PRIVATE_KEY, self.key_pem.clone());
        put(&mut d, keys::CERTIFICATE_ID, self.cert_id.clone());
        put(
            &mut d,
            keys::ISSUED_AT,
            self.issued_at.map(|t| t.to_rfc3339()),
        );
        put(
            &mut d,
            keys::PREVIOUS_CERTIFICATE_ID,
            self.previous_cert_id.clone(),
        );
        put(
            &mut d,
            keys::PREVIOUS_REVOKE_AT,
            self.previous_revoke_at.map(|t| t.to_rfc3339()),
        );
        put(
            &mut d,
            keys::PENDING_SINCE,
            self.pending_since.map(|t| t.to_rfc3339()),
        );
        let windows: Vec<String> = self
            .orphan_windows
            .iter()
            .map(|(a, b)| format!("{}/{}", a.to_rfc3339(), b.to_rfc3339()))
            .collect();
        put(
            &mut d,
            keys::ORPHAN_WINDOW,
            (!windows.is_empty()).then(|| windows.join(",")),
        );
        put(&mut d, keys::ROTATION_TOKEN, self.rotation_token.clone());
        put(&mut d, keys::NEXT_CERTIFICATE, self.next_cert_pem.clone());
        put(&mut d, keys::NEXT_PRIVATE_KEY, self.next_key_pem.clone());
        put(&mut d, keys::NEXT_CERTIFICATE_ID, self.next_cert_id.clone());
        d
    }

    pub fn has_credentials(&self) -> bool {
        self.cert_pem.is_some() && self.key_pem.is_some()
    }

    /// Turns a pending key-creating call (one whose answer was never stored) into an orphan
    /// window. The call started no later than `call_bound` after the mark and took no longer
    /// than that, so the window ends at `since + call_bound` (or `now`, when the caller knows the
    /// call has ended), widened by the clock skew: it never stays open until the next reconcile,
    /// however late that comes. Returns whether there was one.
    pub fn close_pending(&mut self, call_bound: chrono::Duration, now: DateTime<Utc>) -> bool {
        let Some(since) = self.pending_since.take() else {
            return false;
        };
        let end = (since + call_bound).min(now.max(since));
        self.orphan_windows
            .push((since - CLOCK_SKEW, end + CLOCK_SKEW));
        true
    }
}

/// What a password-authenticated device's Secret holds (Mosquitto): the facts, its broker
/// login and topic tree, and a client certificate when devices may use mTLS.
pub struct LoginSecret<'a> {
    pub facts: &'a DeviceFacts,
    pub username: &'a str,
    pub password: &'a str,
    pub topic: &'a str,
    pub client_certificate: Option<ClientCertificate<'a>>,
}

/// A client certificate from the operator's CA, with its key and the listener that takes it.
pub struct ClientCertificate<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
    pub tls_endpoint: &'a str,
}

impl LoginSecret<'_> {
    pub fn to_data(&self) -> SecretData {
        let mut d = SecretData::new();
        self.facts.put_into(&mut d);
        put(&mut d, keys::USERNAME, Some(self.username.to_string()));
        put(&mut d, keys::PASSWORD, Some(self.password.to_string()));
        put(&mut d, keys::TOPIC, Some(self.topic.to_string()));
        if let Some(c) = &self.client_certificate {
            put(&mut d, keys::CERTIFICATE, Some(c.cert_pem.to_string()));
            put(&mut d, keys::PRIVATE_KEY, Some(c.key_pem.to_string()));
            put(&mut d, keys::TLS_ENDPOINT, Some(c.tls_endpoint.to_string()));
        }
        d
    }

    /// The password in `data` when it is `username`'s: a Secret written for another name holds
    /// no password this device may keep.
    pub fn password_of(data: &SecretData, username: &str) -> Option<String> {
        (text(data, keys::USERNAME).as_deref() == Some(username))
            .then(|| text(data, keys::PASSWORD))
            .flatten()
            .filter(|p| !p.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn facts() -> DeviceFacts {
        DeviceFacts {
            endpoint: "e:8883".into(),
            thing_name: "n".into(),
            client_id: "n".into(),
            ca: Some(b"CA".to_vec()),
        }
    }

    #[test]
    fn certificate_state_round_trips_and_hides_the_key() {
        let at = t("2026-01-02T03:04:05Z");
        let s = CertificateState {
            cert_pem: Some("CERT".into()),
            key_pem: Some("KEY-MATERIAL".into()),
            cert_id: Some("abc".into()),
            issued_at: Some(at),
            previous_cert_id: Some("old".into()),
            previous_revoke_at: Some(at),
            pending_since: Some(at),
            orphan_windows: vec![(at, at), (at, at + chrono::Duration::seconds(1))],
            rotation_token: Some("1".into()),
            next_cert_pem: Some("NEXT".into()),
            next_key_pem: Some("NEXT-KEY-MATERIAL".into()),
            next_cert_id: Some("def".into()),
        };
        let data = s.to_data(&facts());
        assert_eq!(CertificateState::from_data(&data), s);
        assert_eq!(text(&data, keys::CA).as_deref(), Some("CA"));
        assert_eq!(text(&data, keys::ENDPOINT).as_deref(), Some("e:8883"));
        assert!(!format!("{s:?}").contains("KEY-MATERIAL"));
        // A window written by an earlier version (one `start/end`) still reads.
        let old = SecretData::from([(
            keys::ORPHAN_WINDOW.into(),
            b"2026-01-01T00:00:00Z/2026-01-01T00:01:00Z".to_vec(),
        )]);
        assert_eq!(
            CertificateState::from_data(&old).orphan_windows,
            vec![(t("2026-01-01T00:00:00Z"), t("2026-01-01T00:01:00Z"))]
        );
    }

    #[test]
    fn absent_or_malformed_entries_read_as_absent() {
        let data = SecretData::from([
            (keys::CERTIFICATE_ID.into(), Vec::new()),
            (keys::ISSUED_AT.into(), b"yesterday".to_vec()),
            (keys::ORPHAN_WINDOW.into(), b"2026-01-01T00:00:00Z".to_vec()),
            (keys::PRIVATE_KEY.into(), vec![0xff, 0xfe]),
        ]);
        assert_eq!(
            CertificateState::from_data(&data),
            CertificateState::default()
        );
        assert_eq!(certificate_pair(&data), None);
    }

    #[test]
    fn an_interrupted_call_leaves_a_window_bounded_by_the_call() {
        let bound = chrono::Duration::seconds(25);
        let mut s = CertificateState::default();
        assert!(!s.close_pending(bound, t("2026-01-01T00:10:00Z")));
        assert!(s.orphan_windows.is_empty());

        // Closed long after the call (a crash, an API-server outage): the window still ends
        // where the call must have ended, not at the late reconcile.
        s.pending_since = Some(t("2026-01-01T00:05:00Z"));
        assert!(s.close_pending(bound, t("2026-01-01T00:40:00Z")));
        assert_eq!(s.pending_since, None);
        assert_eq!(
            s.orphan_windows,
            vec![(t("2026-01-01T00:04:50Z"), t("2026-01-01T00:05:35Z"))]
        );
        // Closed by the caller right after a failed call: it ends at the failure.
        s.pending_since = Some(t("2026-01-01T00:20:00Z"));
        assert!(s.close_pending(bound, t("2026-01-01T00:20:02Z")));
        // Two interrupted calls keep two windows, not one spanning the time between them.
        assert_eq!(
            s.orphan_windows,
            vec![
                (t("2026-01-01T00:04:50Z"), t("2026-01-01T00:05:35Z")),
                (t("2026-01-01T00:19:50Z"), t("2026-01-01T00:20:12Z")),
            ]
        );
    }

    #[test]
    fn login_secret_layout() {
        let f = facts();
        let login = LoginSecret {
            facts: &f,
            username: "n",
            password: "pw",
            topic: "things/ns/dev",
            client_certificate: None,
        };
        let data = login.to_data();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "ca.crt",
                "clientId",
                "endpoint",
                "password",
                "thingName",
                "topic",
                "username"
            ]
        );
        assert_eq!(LoginSecret::password_of(&data, "n").as_deref(), Some("pw"));
        // A password written for another username is not reused.
        assert_eq!(LoginSecret::password_of(&data, "other"), None);

        let with_cert = LoginSecret {
            client_certificate: Some(ClientCertificate {
                cert_pem: "C",
                key_pem: "K",
                tls_endpoint: "broker:8884",
            }),
            ..login
        };
        let data = with_cert.to_data();
        assert_eq!(certificate_pair(&data), Some(("C".into(), "K".into())));
        assert_eq!(
            text(&data, keys::TLS_ENDPOINT).as_deref(),
            Some("broker:8884")
        );
    }
}
