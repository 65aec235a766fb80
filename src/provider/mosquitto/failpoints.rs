//! Crash points for the crash-safety test (`tests/mosquitto_crash.rs`).
//!
//! With the `failpoints` feature, `FAILPOINTS="mosquitto-after-secret-written=return"` makes the
//! process exit at once when it reaches that step: a crash, as far as the broker and Kubernetes
//! can tell. Without the feature every step compiles to nothing.

/// Marks a step of provisioning. See the module docs.
macro_rules! step {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        {
            if fail::eval($name, |_| ()).is_some() {
                tracing::error!(failpoint = $name, "failpoint reached: exiting like a crash");
                std::process::exit(86);
            }
        }
    }};
}

pub(crate) use step;

/// Arms the `mosquitto-*` entries of `FAILPOINTS` (`name=action;name=action`).
pub fn configure_from_env() {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        for entry in spec.split(';') {
            if let Some((name, action)) = entry.split_once('=')
                && name.trim().starts_with("mosquitto-")
            {
                match fail::cfg(name.trim(), action.trim()) {
                    Ok(()) => tracing::warn!(failpoint = name.trim(), "failpoint armed"),
                    Err(e) => tracing::error!(failpoint = name.trim(), error = %e, "bad failpoint"),
                }
            }
        }
    }
}
