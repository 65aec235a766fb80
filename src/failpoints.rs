//! Crash points for the crash-safety tests (`tests/aws_crash.rs`, `tests/mosquitto_crash.rs`).
//!
//! With the `failpoints` feature, `FAILPOINTS="aws-after-register-certificate=return"` makes the
//! process exit at once when it reaches that step (a crash, as far as the backend and Kubernetes
//! can tell); `panic`, `sleep(ms)` and `pause` work as in the `fail` crate. Without the feature
//! every step compiles to nothing. Step names start with their backend (`aws-`, `mosquitto-`).

/// Marks a step of a backend flow. See the module docs.
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

/// Whether a test switched a check off (`FAILPOINTS="<name>=return"`): only for tests that
/// prove a second line of defence holds when the first one is gone. Always false without the
/// `failpoints` feature.
pub fn check_disabled(name: &'static str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::eval(name, |_| ()).is_some()
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Reads `FAILPOINTS` (`name=action;name=action`) into the fail registry. Called once at start-up.
pub fn configure_from_env() {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("FAILPOINTS") {
        for entry in spec.split(';').filter(|e| !e.trim().is_empty()) {
            if let Some((name, action)) = entry.split_once('=') {
                match fail::cfg(name.trim(), action.trim()) {
                    Ok(()) => tracing::warn!(
                        failpoint = name.trim(),
                        action = action.trim(),
                        "failpoint armed"
                    ),
                    Err(e) => tracing::error!(failpoint = name.trim(), error = %e, "bad failpoint"),
                }
            }
        }
    }
}
