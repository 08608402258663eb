//! The device simulator (`firmware-bridge/c`, the same C library a
//! microcontroller runs), built once per test binary with the C
//! library's own Makefile, and driven as a child process.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// `covey-device`, built on first use.
pub fn simulator() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
            let out = root.join("target/covey-device");
            std::fs::create_dir_all(&out).unwrap();
            let status = std::process::Command::new("make")
                .arg("-s")
                .arg("-C")
                .arg(root.join("firmware-bridge/c"))
                .arg(format!("OUT={}", out.display()))
                .status()
                .expect("running make (the C toolchain builds the device simulator)");
            assert!(status.success(), "building covey-device failed");
            out.join("covey-device")
        })
        .clone()
}

/// A running simulator and its output lines.
pub struct Device {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Device {
    /// Start `covey-device ARGS` with `key` in its environment.
    pub fn spawn(key: &str, args: &[&str]) -> Device {
        let mut child = Command::new(simulator())
            .args(args)
            .env("COVEY_DEVICE_KEY", key)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Device { child, lines }
    }

    /// The next output line that starts with `prefix` (others skipped);
    /// panics after `secs`.
    pub async fn expect(&mut self, prefix: &str, secs: u64) -> String {
        let wait = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("covey-device exited before printing {prefix:?}");
        };
        match tokio::time::timeout(Duration::from_secs(secs), wait).await {
            Ok(line) => line,
            Err(_) => panic!("covey-device printed no {prefix:?} within {secs} s"),
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Run `covey-device ARGS` to the end: its exit success and output.
pub async fn run(key: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(simulator())
        .args(args)
        .env("COVEY_DEVICE_KEY", key)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}
