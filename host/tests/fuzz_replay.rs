//! Replays the committed fuzz corpora (`host/fuzz/corpus/<target>/`) through
//! the same targets cargo-fuzz runs (`covey::fuzz`), on stable, in every
//! test run: each input that once crashed the host stays a regression test.
//! `cargo +nightly fuzz run <target> --fuzz-dir host/fuzz` explores further.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let files = corpus(target);
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if let Err(e) = std::panic::catch_unwind(|| run(&data)) {
            std::panic::resume_unwind(Box::new(format!(
                "{target}: input {name} fails: {:?}",
                e.downcast_ref::<String>()
                    .map(String::as_str)
                    .or(e.downcast_ref::<&str>().copied())
            )));
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn frame() {
    replay("frame", covey::fuzz::frame);
}

#[test]
fn manifest() {
    replay("manifest", covey::fuzz::manifest);
}

#[test]
fn sync_message() {
    replay("sync_message", covey::fuzz::sync_message);
}

#[test]
fn config() {
    replay("config", covey::fuzz::config);
}

#[test]
fn device_frame() {
    replay("device_frame", covey::fuzz::device_frame);
}

#[test]
fn wit_boundary() {
    replay("wit_boundary", covey::fuzz::wit_boundary);
}

/// Writes seed inputs (real frames, sync messages, a config file, a
/// manifest, script ops) into the corpora: run once by hand with
/// `cargo test -p covey --test fuzz_replay -- --ignored`.
#[test]
#[ignore]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    for (i, m) in covey::fuzz::sync_seeds().iter().enumerate() {
        put("sync_message", &format!("seed-{i}"), m);
    }
    for (i, f) in covey::fuzz::frame_seeds().iter().enumerate() {
        put("frame", &format!("seed-{i}"), f);
    }
    for (i, f) in covey::fuzz::device_seeds().iter().enumerate() {
        put("device_frame", &format!("seed-{i}"), f);
    }
    put(
        "config",
        "seed-0",
        b"node: kitchen\nscripts: ./scripts\nport: 7466\ndiscovery: mdns\niface: eth0\n\
          peers: [pi-garage.lan:7466]\nlisten: \"::\"\npeer_timeout_ms: 3000\ndata: ./d\n\
          memory_mb: 64\ncpu_ms: 100\nmax_scripts: 64\nmax_payload: 1048576\nmailbox: 4096\n\
          log_rate: 100\nkv_quota_keys: 10\nkv_quota_bytes: 100\nlog: info\n\
          extras:\n  hello_interval_ms: 3000\n",
    );
    put(
        "manifest",
        "seed-0",
        "a.lua\u{1f}n1\u{1f}print(1)\u{1e}../x\u{1f}../o\u{1f}y\u{1e}link/z.lua\u{1f}raw\u{1f}z"
            .as_bytes(),
    );
    // Script ops: emit, kv.set, on, call, incr, watch.
    put(
        "wit_boundary",
        "seed-0",
        b"\x00\x04temp\x0221\x03\x01k\x01v\x08\x01*\x01x\x02\x01n\x04echo\x00\x10\x06\x01c\x81\x09\x01k",
    );
}
