//! thing-operator: IoT devices as Kubernetes resources.
//!
//! `api` holds the CRD types and their validation (no I/O); `controller` holds one reconciler per
//! kind; `provider` is the only code that talks to an IoT backend.

pub mod api;
pub mod build_info;
pub mod config;
pub mod controller;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod failpoints;
pub mod feed;
pub mod forwarding;
pub mod http;
pub mod merge_patch;
pub mod metrics;
pub mod mqtt;
pub mod provider;
pub mod rest_broker;
pub mod runner;
pub mod telemetry;
pub mod wiring;

pub use error::{Error, Result};
