//! The cluster commands of the `covey` binary as a user types them:
//! `cluster init/join/token`, `status`, and one node per data directory.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn covey(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(args)
        .arg("--data")
        .arg(data)
        .env("NO_COLOR", "1")
        .env_remove("COVEY_CLUSTER_TOKEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `covey run ARGS` on `data` and `scripts`, mDNS off, quiet.
fn run_node(args: &[&str], data: &Path, scripts: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_covey"))
        .arg("run")
        .args(args)
        .args(["--discovery", "off", "--data"])
        .arg(data)
        .arg("--scripts")
        .arg(scripts)
        .env_remove("COVEY_CLUSTER_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// `covey STATUS_ARGS` until the node answers (or 30 s pass).
fn wait_status(data: &Path, status_args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = covey(status_args, data);
        if s.status.success() || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_init_join_status_and_one_node_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));

    let init = covey(&["cluster", "init"], &a);
    assert!(init.status.success(), "{}", text(&init));
    let printed = text(&init);
    let token = printed
        .split_whitespace()
        .find(|w| w.starts_with("covey1-"))
        .expect("init prints the token")
        .to_string();
    // A second init would split the cluster: refused.
    let again = covey(&["cluster", "init"], &a);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("already has a cluster token"),
        "{}",
        text(&again)
    );
    let join = covey(&["cluster", "join", &token], &b);
    assert!(join.status.success(), "{}", text(&join));
    let shown = covey(&["cluster", "token"], &b);
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), token);
    let bad = covey(&["cluster", "join", "covey1-nope"], &b);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("malformed cluster token"),
        "{}",
        text(&bad)
    );

    // No node yet: status says so.
    let none = covey(&["status"], &a);
    assert!(!none.status.success());
    assert!(
        text(&none).contains("no covey node is running"),
        "{}",
        text(&none)
    );

    let args = ["--node", "cli-a", "--listen", "127.0.0.1", "--port", "0"];
    let mut node = run_node(&args, &a, &dir.path().join("scripts"));
    let status = wait_status(&a, &["status"]);
    let shown = text(&status);
    assert!(status.status.success(), "{shown}");
    assert!(shown.contains("node cli-a"), "{shown}");
    assert!(shown.contains("listening on 127.0.0.1:"), "{shown}");
    assert!(shown.contains("0 of 0 peers up"), "{shown}");
    let json = covey(&["status", "--json"], &a);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["node"], "cli-a");
    assert_eq!(v["cluster"]["peers"], serde_json::json!([]));

    // A second node on the same data directory stops before touching it.
    let second = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", "cli-b", "--discovery", "off", "--data"])
        .arg(&a)
        .arg("--scripts")
        .arg(dir.path().join("scripts"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        text(&second).contains("another covey node is running"),
        "{}",
        text(&second)
    );

    node.kill().unwrap();
    node.wait().unwrap();
}

#[test]
fn device_add_list_remove_with_and_without_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    // No node running: the registry file is edited directly.
    let add = covey(&["device", "add", "esp-1"], &data);
    assert!(add.status.success(), "{}", text(&add));
    let key = text(&add)
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .expect("add prints the key")
        .to_string();
    let again = covey(&["device", "add", "esp-1"], &data);
    assert!(!again.status.success() && text(&again).contains("already exists"));
    let bad = covey(&["device", "add", "../x"], &data);
    assert!(!bad.status.success() && text(&bad).contains("invalid device name"));

    let args = ["--node", "cli-d", "--bridge-udp", "127.0.0.1:0"];
    let mut node = run_node(&args, &data, &dir.path().join("scripts"));
    let status = wait_status(&data, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let udp = v["bridge_udp"]
        .as_str()
        .expect("bridge listens")
        .to_string();
    // Through the running node: the device added before the start works.
    let add2 = covey(&["device", "add", "esp-2", "--json"], &data);
    let added: serde_json::Value = serde_json::from_slice(&add2.stdout).unwrap();
    assert_eq!(added["key"].as_str().unwrap().len(), 64);
    let list = covey(&["device", "list"], &data);
    assert!(text(&list).contains("esp-1") && text(&list).contains("esp-2"));
    assert!(!text(&list).contains(&key), "keys are never listed");
    let sim = crate::bridge::device::simulator();
    let emit = Command::new(sim)
        .args([
            "--udp", &udp, "--name", "esp-1", "--qos", "1", "emit", "t", "1",
        ])
        .env("COVEY_DEVICE_KEY", &key)
        .output()
        .unwrap();
    assert!(emit.status.success(), "{}", text(&emit));
    let shown = text(&covey(&["status"], &data));
    assert!(
        shown.contains("device bridge on UDP") && shown.contains("esp-1"),
        "{shown}"
    );
    assert!(!shown.contains(&key), "{shown}");
    let rm = covey(&["device", "remove", "esp-1"], &data);
    assert!(rm.status.success(), "{}", text(&rm));
    let rm = covey(&["device", "remove", "esp-1"], &data);
    assert!(!rm.status.success() && text(&rm).contains("no device"));
    assert!(!text(&covey(&["device", "list"], &data)).contains("esp-1"));
    node.kill().unwrap();
    node.wait().unwrap();
}
