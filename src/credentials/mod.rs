//! Device credentials: the Secret a device mounts, and (in submodules) key and certificate work.

mod secret;

pub use secret::{DeviceSecret, keys};
pub mod ca;
pub mod pki;
