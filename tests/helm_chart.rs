//! The Helm chart against the real control plane (through helm-python-sdk, the Helm SDK).

mod common;

use std::process::Command;

#[test]
fn helm_chart_installs_upgrades_and_uninstalls() {
    let env = common::TestEnv::load();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/helm/check_chart.py");
    let out = Command::new("python3")
        .arg(script)
        .env("KUBECONFIG", env.var("KUBECONFIG"))
        .env("KUBECTL", env.var("KUBECTL"))
        .env("THING_OPERATOR_BIN", env!("CARGO_BIN_EXE_thing-operator"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "chart checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
