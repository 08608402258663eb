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
    start_in(dir, "op1", &[], true)
}

/// A node named `name` in `dir` (`dir/data` may hold a cluster token
/// already), with `ops.lua` in its scripts directory if `with_script`.
fn start_in(dir: tempfile::TempDir, name: &str, extra: &[&str], with_script: bool) -> Node {
    let (data, scripts) = (dir.path().join("data"), dir.path().join("scripts"));
    std::fs::create_dir_all(&scripts).unwrap();
    if with_script {
        std::fs::write(scripts.join("ops.lua"), super::common::OPS_SCRIPT).unwrap();
    }
    let config = dir.path().join("covey.yaml");
    // A small payload limit to hit, and a CPU budget long enough that a
    // spinning handler outlives the caller's timeout.
    std::fs::write(&config, "max_payload: 4096\ncpu_ms: 3000\n").unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", name, "--discovery", "off"])
        .args(extra)
        .arg("--config")
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

/// A free UDP port on loopback (for a node's QUIC endpoint).
fn free_port() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port().to_string()
}

#[test]
fn logs_and_scripts_of_the_whole_cluster() {
    // Two processes, so each has its own log: what `--node` and
    // `--all-nodes` show of op2 can only have come over the cluster link.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (data_a, data_b) = (dir_a.path().join("data"), dir_b.path().join("data"));
    stdout(&covey(&data_a, &["cluster", "init"]));
    let token = stdout(&covey(&data_a, &["cluster", "token"]));
    stdout(&covey(&data_b, &["cluster", "join", token.trim()]));
    let (port_a, port_b) = (free_port(), free_port());
    let peer = format!("127.0.0.1:{port_a}");
    let a = start_in(
        dir_a,
        "op1",
        &["--listen", "127.0.0.1", "--port", &port_a],
        true,
    );
    // op2 gets ops.lua from op1 (scripts sync) and runs it.
    let b = start_in(
        dir_b,
        "op2",
        &["--listen", "127.0.0.1", "--port", &port_b, "--peer", &peer],
        false,
    );
    let (a, b) = (&a.data, &b.data);

    let all = ["logs", "--all-nodes", "--script", "ops.lua"];
    until(|| {
        let t = text(&covey(a, &all));
        t.contains("op1 script [ops.lua]: ops script ready")
            && t.contains("op2 script [ops.lua]: ops script ready")
    });
    // One other node: only its lines, labelled.
    let only_b = stdout(&covey(a, &["logs", "--node", "op2"]));
    assert!(
        only_b.contains("op2 script [ops.lua]: ops script ready"),
        "{only_b}"
    );
    assert!(only_b.lines().all(|l| l.contains(" op2 ")), "{only_b}");
    let json = stdout(&covey(a, &["logs", "--node", "op2", "-n", "1", "--json"]));
    let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line["node"], "op2", "{json}");
    let nope = covey(a, &["logs", "--node", "nope"]);
    assert_eq!(nope.status.code(), Some(6), "{}", text(&nope));

    // Scripts of both nodes, from either.
    let json = stdout(&covey(b, &["scripts", "--all-nodes", "--json"]));
    let answers: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    let nodes: Vec<&str> = (answers.as_array().unwrap().iter())
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["op2", "op1"], "{json}");
    for n in answers.as_array().unwrap() {
        assert_eq!(n["scripts"][0]["script"], "ops.lua", "{json}");
    }
    let table = stdout(&covey(a, &["scripts", "--node", "op2"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ops.lua") && l.contains(" op2 ")),
        "{table}"
    );
    let nope = covey(a, &["scripts", "--node", "nope"]);
    assert_eq!(nope.status.code(), Some(6), "{}", text(&nope));

    // Following both nodes: a line logged on op2 arrives at op1's reader.
    let (mut follow, rx) = spawn_stream(a, &["logs", "--all-nodes", "-f", "--script", "ops.lua"]);
    expect_line(&rx, "op2 script [ops.lua]: got ping from-b", || {
        stdout(&covey(b, &["emit", "ping", "from-b"]));
    });
    let _ = follow.kill();
    let _ = follow.wait();
}
