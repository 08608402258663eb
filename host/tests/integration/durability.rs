//! `kill -9` while a script writes as fast as it can: after a restart,
//! every write the script saw succeed is in the store.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covey::kvdoc::{KvDoc, KvLimits};
use covey::router::Router;

const WRITER: &str = r#"
local n = 0
covey.every(1, function()
  for _ = 1, 20 do
    n = n + 1
    covey.kv.set("ack/" .. n, tostring(n))
    print("acked " .. n)
  end
  return true
end)
"#;

#[test]
fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("writer.lua"), WRITER).unwrap();
    let log = dir.path().join("node.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", "dur", "--log", "info"])
        .arg("--scripts")
        .arg(&scripts)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("NO_COLOR", "1")
        .env_remove("COVEY_CLUSTER_TOKEN")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let it write a while, then kill it without warning.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("acked 2000") || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let acked = text
        .lines()
        .filter_map(|l| l.split("acked ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or_else(|| panic!("the writer never acknowledged a write:\n{text}"));
    assert!(acked >= 2000, "only {acked} writes before the deadline");

    let kv = KvDoc::open(
        Some(dir.path().join("data/kv.automerge")),
        KvLimits::default(),
        Arc::new(Router::new("check", 1024)),
    )
    .unwrap();
    let missing: Vec<u64> = (1..=acked)
        .filter(|n| kv.get(&format!("ack/{n}")).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {acked} acknowledged writes lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}
