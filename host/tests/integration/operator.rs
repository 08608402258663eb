//! The operator's verbs as a user types them, against a real `covey run`:
//! `emit`, `send`, `call` (replies, stdin payloads, exit codes), `kv`,
//! `kv watch`, `events`, `nodes`, `logs` (past lines, one script's, `-f`),
//! `--json`, and a clear error when no node runs.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Node {
    child: Child,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (data, scripts) = (dir.path().join("data"), dir.path().join("scripts"));
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("ops.lua"), super::common::OPS_SCRIPT).unwrap();
    let config = dir.path().join("covey.yaml");
    // A small payload limit to hit, and a CPU budget long enough that a
    // spinning handler outlives the caller's timeout.
    std::fs::write(&config, "max_payload: 4096\ncpu_ms: 3000\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", "op1", "--discovery", "off", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--scripts")
        .arg(&scripts)
        .env_remove("COVEY_CLUSTER_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let node = Node {
        child,
        data,
        _dir: dir,
    };
    // Ready when the script has logged it (through `covey logs`).
    until(|| text(&covey(&node.data, &["logs"])).contains("ops script ready"));
    node
}

fn covey(data: &Path, args: &[&str]) -> Output {
    covey_stdin(data, args, b"")
}

fn covey_stdin(data: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(args)
        .arg("--data")
        .arg(data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn until(mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < deadline, "condition not met in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A streaming verb in the background; its stdout lines arrive on the channel.
fn spawn_stream(data: &Path, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(args)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Repeat `act` until a streamed line contains `want` (a stream may start
/// after the first action).
fn expect_line(rx: &mpsc::Receiver<String>, want: &str, mut act: impl FnMut()) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        act();
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            if line.contains(want) {
                return line;
            }
        }
        assert!(Instant::now() < deadline, "no line with {want:?} in 60 s");
    }
}

#[test]
fn bus_verbs_reply_and_exit_codes() {
    let n = start();
    let d = &n.data;

    assert_eq!(stdout(&covey(d, &["call", "op1", "echo", "hi"])), "echo:hi");
    let piped = covey_stdin(d, &["call", "op1", "echo", "-"], b"from stdin\n");
    assert_eq!(stdout(&piped), "echo:from stdin\n");
    let json = stdout(&covey(d, &["call", "op1", "echo", "x", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["reply"], "echo:x");

    covey(d, &["emit", "ping", "p1"]);
    until(|| covey(d, &["kv", "get", "pinged"]).stdout == b"p1");
    stdout(&covey(d, &["send", "op1", "store", "s1"]));
    until(|| covey(d, &["kv", "get", "stored"]).stdout == b"s1");
    stdout(&covey(d, &["send", "*", "store", "s2"]));
    until(|| covey(d, &["kv", "get", "stored"]).stdout == b"s2");

    // Each failure has its own exit code and says what went wrong.
    let code = |o: &Output| o.status.code().unwrap();
    let none = covey(d, &["call", "op1", "nobody-handles-this"]);
    assert_eq!(code(&none), 3, "{}", text(&none));
    assert!(text(&none).contains("no script"), "{}", text(&none));
    let ghost = covey(d, &["call", "ghost", "echo"]);
    assert_eq!(code(&ghost), 6, "{}", text(&ghost));
    let big = "x".repeat(5000);
    let too_large = covey(d, &["emit", "ping", &big]);
    assert_eq!(code(&too_large), 7, "{}", text(&too_large));
    assert!(text(&too_large).contains("4096"), "{}", text(&too_large));
    let bad = covey(d, &["send", "a b", "store"]);
    assert_eq!(code(&bad), 2, "{}", text(&bad));
    let all = covey(d, &["call", "*", "echo"]);
    assert_eq!(code(&all), 2, "{}", text(&all));
    let slow = covey(d, &["call", "op1", "spin", "--timeout-ms", "300"]);
    assert_eq!(code(&slow), 4, "{}", text(&slow));

    // The spinning handler runs out of CPU budget: `covey scripts` shows
    // the restart and why, and the script's counters.
    let scripts = || -> serde_json::Value {
        serde_json::from_slice(&covey(d, &["scripts", "--json"]).stdout).unwrap()
    };
    until(|| scripts()["scripts"][0]["restarts"] == 1);
    let s = &scripts()["scripts"][0];
    assert_eq!(s["script"], "ops.lua");
    assert_eq!(s["state"], "running", "{s}");
    let error = s["last_error"].as_str().unwrap();
    assert!(error.contains("CPU budget"), "{error}");
    assert!(s["handled"].as_u64().unwrap() >= 7, "{s}");
    assert!(s["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["busy_ms"].as_u64().unwrap() >= 300, "{s}");
    let table = stdout(&covey(d, &["scripts"]));
    assert!(
        table.contains("ops.lua") && table.contains("op1"),
        "{table}"
    );
    assert!(
        table.contains("last error: on-command: CPU budget"),
        "{table}"
    );

    let nodes = stdout(&covey(d, &["nodes"]));
    assert!(nodes.contains("op1 (this)"), "{nodes}");
    let nodes: serde_json::Value =
        serde_json::from_slice(&covey(d, &["nodes", "--json"]).stdout).unwrap();
    assert_eq!(nodes[0]["name"], "op1");
}

#[test]
fn kv_verbs_watch_events_and_logs() {
    let n = start();
    let d = &n.data;

    stdout(&covey(d, &["kv", "set", "sensors/a", "1"]));
    stdout(&covey_stdin(
        d,
        &["kv", "set", "sensors/b", "-"],
        &[0xff, 0x00],
    ));
    assert_eq!(covey(d, &["kv", "get", "sensors/b"]).stdout, [0xff, 0x00]);
    let v: serde_json::Value =
        serde_json::from_slice(&covey(d, &["kv", "get", "sensors/b", "--json"]).stdout).unwrap();
    assert_eq!(v["value"]["hex"], "ff00");
    assert_eq!(
        stdout(&covey(d, &["kv", "ls", "sensors/"])),
        "sensors/a\nsensors/b\n"
    );
    stdout(&covey(d, &["kv", "del", "sensors/a"]));
    let missing = covey(d, &["kv", "get", "sensors/a"]);
    assert_eq!(missing.status.code(), Some(9), "{}", text(&missing));
    let bad_key = covey(d, &["kv", "set", "", "v"]);
    assert_eq!(bad_key.status.code(), Some(2), "{}", text(&bad_key));

    let (mut watch, rx) = spawn_stream(d, &["kv", "watch", "sensors/"]);
    let mut i = 0;
    let line = expect_line(&rx, "sensors/c = ", || {
        i += 1;
        covey(d, &["kv", "set", "sensors/c", &i.to_string()]);
    });
    assert!(line.starts_with("sensors/c = "), "{line}");
    expect_line(&rx, "sensors/c deleted", || {
        covey(d, &["kv", "del", "sensors/c"]);
    });
    watch.kill().unwrap();

    let (mut events, rx) = spawn_stream(d, &["events", "pi*", "--json"]);
    let line = expect_line(&rx, "\"ping\"", || {
        covey(d, &["emit", "ping", "e1"]);
    });
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (v["from"].as_str(), v["payload"].as_str()),
        (Some("op1"), Some("e1"))
    );
    events.kill().unwrap();

    // Past lines, one script's lines, the last N, and following.
    let logs = stdout(&covey(d, &["logs", "--script", "ops.lua"]));
    assert!(logs.contains("ops script ready"), "{logs}");
    assert!(logs.lines().all(|l| l.contains("[ops.lua]")), "{logs}");
    assert_eq!(stdout(&covey(d, &["logs", "-n", "1"])).lines().count(), 1);
    let (mut follow, rx) = spawn_stream(d, &["logs", "-f", "--script", "ops.lua"]);
    let mut i = 0;
    expect_line(&rx, "got ping f", || {
        i += 1;
        covey(d, &["emit", "ping", &format!("f{i}")]);
    });
    follow.kill().unwrap();
    let bad = covey(d, &["logs", "--since", "10w"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("unit"), "{}", text(&bad));
}

#[test]
fn verbs_without_a_node_say_so() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["emit", "x"][..],
        &["kv", "get", "k"],
        &["logs"],
        &["nodes"],
    ] {
        let o = covey(dir.path(), args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("no covey node is running"),
            "{}",
            text(&o)
        );
    }
}
