//! What this binary is: its version and the commit it was built from, for `thing-operator
//! version`, the `thing_operator_build_info` metric and the start-up log, so an operator in a
//! cluster can be matched to its source.

/// The crate version (Cargo.toml), which is also the chart's appVersion and the image tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit, when the build was given one (`THING_OPERATOR_GIT_COMMIT` at compile time,
/// as the Dockerfile does); a build straight from a checkout says `unknown` rather than guess.
pub const COMMIT: &str = match option_env!("THING_OPERATOR_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// One line for humans: `thing-operator 0.1.0 (commit abc1234)`.
pub fn describe() -> String {
    format!("thing-operator {VERSION} (commit {COMMIT})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_version_and_commit() {
        let line = describe();
        assert!(
            line.starts_with(&format!("thing-operator {VERSION} ")),
            "{line}"
        );
        assert!(line.contains(COMMIT), "{line}");
    }
}
