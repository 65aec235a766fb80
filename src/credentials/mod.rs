//! Device credentials, apart from any one backend: the device Secret ([`secret`]: its I/O,
//! [`codec`]: its layout, pure), in-cluster keys and certificates ([`pki`]) and the operator's
//! own CA for self-hosted brokers ([`ca`]). Backends decide when to issue; this module knows how.

pub mod ca;
pub mod codec;
pub mod pki;
mod secret;

pub use codec::{SecretData, keys};
pub use secret::{DeviceSecret, SecretError, THING_LABEL};
