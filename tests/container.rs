//! The container image, as far as it can be checked without a container engine (none runs
//! here): the Dockerfile's shape (multi-stage, release build, distroless non-root runtime with a
//! numeric USER and no shell), and the operator binary running the way the image and the
//! Deployment run it: as uid/gid 65532, no capabilities, no new privileges, on a read-only root
//! filesystem, with the Deployment's environment. It runs this build's binary (the same source
//! the image's release build compiles; only the optimisation level differs).

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{Setup, free_port, thing, wait_for};
use serde_json::{Value, json};

const UID: &str = "65532";

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Instructions of the Dockerfile (comments and continuations folded), per stage.
fn stages(dockerfile: &str) -> Vec<Vec<String>> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        current.push_str(line.trim_end_matches('\\'));
        current.push(' ');
        if !line.ends_with('\\') {
            joined.push(current.trim().to_string());
            current.clear();
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for instruction in joined {
        if instruction.starts_with("FROM ") {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

#[test]
fn dockerfile_builds_release_into_a_distroless_nonroot_image() {
    let stages = stages(&repo_file("Dockerfile"));
    assert!(stages.len() >= 2, "not multi-stage: {stages:?}");
    let (build, runtime) = (&stages[0], stages.last().unwrap());
    assert!(
        build
            .iter()
            .any(|i| i.starts_with("RUN ") && i.contains("cargo build --release --locked")),
        "the build stage makes no locked release build: {build:?}"
    );
    assert!(
        runtime[0].contains("gcr.io/distroless/") && runtime[0].ends_with(":nonroot"),
        "runtime base is not distroless nonroot: {}",
        runtime[0]
    );
    // No RUN in the runtime stage: nothing there needs (or has) a shell.
    assert!(
        !runtime.iter().any(|i| i.starts_with("RUN ")),
        "{runtime:?}"
    );
    let user = runtime
        .iter()
        .find_map(|i| i.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    assert_eq!(user, format!("{UID}:{UID}"), "USER must be numeric");
    let entrypoint = runtime
        .iter()
        .find_map(|i| i.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    assert_eq!(argv, ["/usr/local/bin/thing-operator"]);

    // The Deployment (deploy/ and the chart) runs it as the same uid.
    let deployment: Value =
        serde_yaml::from_str(&repo_file("deploy/core/deployment.yaml")).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"].to_string(), UID);
    assert_eq!(pod["securityContext"]["runAsGroup"].to_string(), UID);

    // The build context is the sources only.
    let ignore = repo_file(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "*"), "{ignore}");
    assert!(ignore.lines().any(|l| l.trim() == "!src/"), "{ignore}");
}

/// Killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A copy of `path` that uid 65532 can read, in a directory it can enter.
fn readable_copy(dir: &Path, path: &str) -> String {
    let name = Path::new(path).file_name().unwrap();
    let dst = dir.join(name);
    std::fs::copy(path, &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    dst.display().to_string()
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

#[tokio::test]
async fn operator_runs_as_nonroot_without_capabilities_on_a_readonly_root() {
    let privileged = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        privileged,
        "this test needs `unshare -m` and setpriv (util-linux) as root, as the test environment has"
    );
    let s = Setup::new("container").await;
    let env = s.env.clone();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let kubeconfig = readable_copy(dir.path(), &env.var("OPERATOR_KUBECONFIG"));
    let password = readable_copy(dir.path(), &env.var("MQTT_ADMIN_PASSWORD_FILE"));
    let log = dir.path().join("operator.log");

    // The Deployment's environment, downward-API fields resolved as the kubelet would.
    let deployment: Value =
        serde_yaml::from_str(&repo_file("deploy/core/deployment.yaml")).unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let port = free_port();
    let mut cmd = Command::new("unshare");
    // A private mount namespace whose root is remounted read-only, then the binary as
    // 65532:65532 with no supplementary groups, capabilities or new privileges.
    cmd.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(concat!(
            "mount -o remount,bind,ro / && cd / && exec setpriv --reuid=65532 --regid=65532 ",
            "--clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all \"$@\""
        ))
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_thing-operator"));
    for arg in container["args"].as_array().unwrap() {
        cmd.arg(arg.as_str().unwrap());
    }
    cmd.args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--watch-namespace", &s.ns])
        .args(["--mqtt-url", &env.var("MQTT_URL")])
        .args(["--mqtt-username", &env.var("MQTT_ADMIN_USER")])
        .args(["--mqtt-password-file", &password])
        .args(["--mqtt-topic-prefix", "container"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("KUBECONFIG", &kubeconfig)
        // Its own lease, so no other test's operator is its rival.
        .env(
            "THING_OPERATOR_LEASE_NAME",
            format!("lease-{}", s.ns.name()),
        )
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("operator.err")).unwrap(),
        ));
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap();
        let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => env.var("OPERATOR_NAMESPACE"),
            Some("metadata.name") => "thing-operator-container-test".to_string(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => var["value"].as_str().unwrap().to_string(),
        };
        cmd.env(name, value);
    }
    let child = Guard(cmd.spawn().expect("unshare runs"));
    let pid = child.0.id();

    let ready = wait_for("operator /readyz", Duration::from_secs(60), || async {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let ok = reqwest::get(url).await.is_ok_and(|r| r.status() == 200);
        ok.then_some(())
    });
    ready.await;

    // It is the operator process that runs so: uid and gid 65532, no effective or bounding
    // capabilities, no new privileges, and its root is read-only.
    let status = proc_status(pid);
    assert!(status.contains("Name:\tthing-operator"), "{status}");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), [UID; 4], "{status}");
    assert_eq!(field("Gid:"), [UID; 4], "{status}");
    assert_eq!(field("CapEff:"), ["0000000000000000"], "{status}");
    assert_eq!(field("CapBnd:"), ["0000000000000000"], "{status}");
    assert_eq!(field("NoNewPrivs:"), ["1"], "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split_whitespace()
            .nth(3)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "{root}"
    );

    // And does its work: a Mosquitto Thing becomes Ready (a device Secret, the broker's dynamic
    // security, the leader Lease, Events), nothing of it needing a writable filesystem.
    thing("lamp")
        .broker("Mosquitto")
        .desired(json!({"on": true}))
        .create(&s.things())
        .await;
    s.wait_ready(&s.things(), "lamp").await;
    let version = Command::new(env!("CARGO_BIN_EXE_thing-operator"))
        .arg("version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("thing-operator "),
        "{version:?}"
    );
    drop(child);
}
