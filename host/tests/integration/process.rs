//! The `covey` binary as a user runs it: clean shutdown on SIGTERM, and
//! starting inside a tight address-space limit (a small 32-bit-ish or
//! `ulimit -v`-capped machine), where the pooling allocator cannot reserve
//! its pool and the node must fall back to on-demand allocation.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use covey::kvdoc::{KvDoc, KvLimits};
use covey::router::Router;

use crate::common::guest;

/// Start `covey run` under `ulimit -v <kib>` (0 = unlimited) with the
/// `crash` script (which bumps `crash/inits` in its `init`).
fn spawn_node(dir: &Path, vmem_kib: u64) -> Child {
    let scripts = dir.join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::copy(guest("testing/crash"), scripts.join("crash.wasm")).unwrap();
    let limit = if vmem_kib == 0 {
        "unlimited".to_string()
    } else {
        vmem_kib.to_string()
    };
    Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {limit} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", "proc", "--log", "info"])
        .arg("--scripts")
        .arg(&scripts)
        .arg("--data")
        .arg(dir.join("data"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until the node has started (the store file appears once the
/// script's `init` wrote to it), then SIGTERM it; return its output.
fn stop_when_started(mut child: Child, dir: &Path) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.join("data/kv.automerge").exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    unsafe { kill(child.id() as i32, 15) };
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status.success(), out)
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

fn kv_inits(dir: &Path) -> Option<Vec<u8>> {
    let router = Arc::new(Router::new("check", 1024));
    let kv = KvDoc::open(
        Some(dir.join("data/kv.automerge")),
        KvLimits::default(),
        router,
    )
    .unwrap();
    kv.get("crash/inits")
}

#[test]
fn sigterm_stops_scripts_and_flushes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    // 64 GiB of address space: a quarter of what a Raspberry Pi's 39-bit
    // user space offers; the pool must fit in it.
    let (ok, out) = stop_when_started(spawn_node(dir.path(), 64 << 20), dir.path());
    assert!(ok, "clean exit expected:\n{out}");
    // Guarded 4 GiB memories do not fit; compact ones in a pool do.
    assert!(out.contains("allocator=Pooling memory=Compact"), "{out}");
    assert!(
        out.contains("script stopped") && out.contains("node stopped"),
        "{out}"
    );
    assert_eq!(kv_inits(dir.path()).as_deref(), Some(&b"1"[..]));
}

#[test]
#[cfg(target_arch = "x86_64")]
fn a_roomy_address_space_gets_guarded_memories() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = stop_when_started(spawn_node(dir.path(), 0), dir.path());
    assert!(ok, "clean exit expected:\n{out}");
    assert!(out.contains("allocator=Pooling memory=Guarded"), "{out}");
    assert_eq!(kv_inits(dir.path()).as_deref(), Some(&b"1"[..]));
}

#[test]
fn falls_back_to_on_demand_allocation_when_the_pool_cannot_be_reserved() {
    let dir = tempfile::tempdir().unwrap();
    // 6 GiB of address space: too little for the default pool (~18 GiB),
    // plenty for on-demand instances.
    let (ok, out) = stop_when_started(spawn_node(dir.path(), 6 << 20), dir.path());
    assert!(ok, "clean exit expected:\n{out}");
    assert!(
        out.contains("a roomier setup did not fit this machine"),
        "{out}"
    );
    assert!(out.contains("allocator=OnDemand memory=Compact"), "{out}");
    assert!(out.contains("script started"), "{out}");
    assert_eq!(kv_inits(dir.path()).as_deref(), Some(&b"1"[..]));
}

pub(crate) fn covey_exec(file: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_covey"))
        .arg("exec")
        .arg("--node")
        .arg("ex")
        .arg("--data")
        .arg(file.parent().unwrap().join("data"))
        .arg(file)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn exec_runs_plain_lua_programs_with_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prog.lua");
    std::fs::write(
        &file,
        "local function fib(n) if n < 2 then return n end return fib(n-1) + fib(n-2) end\n\
         print('args', ...)\n\
         print(arg[0], #arg, fib(20), self())\n\
         io.write('no newline')\n",
    )
    .unwrap();
    let (ok, out, err) = covey_exec(&file, &["one", "--two"]);
    assert!(ok, "{err}");
    assert_eq!(out, "args\tone\t--two\nprog.lua\t2\t6765\tex\nno newline");
}

#[test]
fn exec_fails_with_the_error_and_a_nonzero_status() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.lua");
    std::fs::write(&file, "print('before')\nerror('nope')\n").unwrap();
    let (ok, out, err) = covey_exec(&file, &[]);
    assert!(!ok);
    assert_eq!(out, "before\n");
    assert!(
        err.contains("bad.lua:2: nope") && err.contains("traceback"),
        "{err}"
    );
    let file = dir.path().join("syntax.lua");
    std::fs::write(&file, "x = (\n").unwrap();
    let (ok, _, err) = covey_exec(&file, &[]);
    assert!(!ok);
    assert!(
        err.contains("syntax error") && err.contains("syntax.lua:2"),
        "{err}"
    );
}

#[test]
fn exec_runs_a_component_init() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crash.wasm");
    std::fs::copy(guest("testing/crash"), &file).unwrap();
    let (ok, _, err) = covey_exec(&file, &[]);
    assert!(ok, "{err}");
    let file = dir.path().join("broken.wasm");
    std::fs::copy(guest("testing/broken-init"), &file).unwrap();
    let (ok, _, err) = covey_exec(&file, &[]);
    assert!(!ok);
    assert!(err.contains("refuses to start"), "{err}");
}

/// esc's semantics where they differ from Lua's or Covey's: missing keys
/// read as "" (Go's zero value), esc-form sends never raise (logged and
/// dropped), `log` stringifies as gopher-lua's `ToString`. Modelled on
/// esc's README and its demo script, which logs an undefined global first.
#[test]
fn esc_scripts_get_esc_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.lua");
    std::fs::write(
        &file,
        r#"log(foo)
log("CFG "..config("foo"))
log(1.5, "and", true)
log("Get ["..Get("missing").."]")
print(covey.kv.get("missing"))
sendCommand("nodeb", "blink", "led3")
send("nodeb", "blink", "led3")
sendC("nodeb", "blink", "led3", true)
sendEvent("covey.fake", "x")
print(covey.command("nodeb", "blink", "led3"))
print(covey.emit("fine", "x"))
print(fullName("ex"), shortName(fullName("ex")), shortName("ex._esc._tcp.local."))
onEvent("*", "test", function(msg) sendCommand(self(), "hello", "world") end)
"#,
    )
    .unwrap();
    let (ok, out, err) = covey_exec(&file, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "\nCFG \n1.5\tand\t\nGet []\nnil\nnil\tunknown node `nodeb`\ntrue\nex\tex\tex\n"
    );
    for dropped in [
        "sendCommand: dropped: unknown node `nodeb`",
        "send: dropped: unknown node `nodeb`",
        "sendC: dropped: unknown node `nodeb`",
        "sendEvent: dropped: `covey.fake` is a system event name",
    ] {
        assert!(err.contains(dropped), "{dropped}: {err}");
    }
}

/// `covey exec FILE.lua` reads beside the file as `lua FILE.lua` would from
/// there: `require` (`./?.lua`, `./?/init.lua`, then `lib/`), `dofile`,
/// `loadfile` with mode and env; nothing outside the file's directory.
/// Sources are bytes: a string literal may hold any byte.
#[test]
fn exec_reads_beside_the_file_like_lua() {
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, text: &[u8]| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    put(
        "helper.lua",
        b"return { twice = function(x) return 2 * x end }",
    );
    put("pkg/init.lua", b"return { name = (...) }");
    put("lib/util.lua", b"return 'from lib'");
    put("data.lua", b"return x or 'no x'");
    std::fs::write(dir.path().parent().unwrap().join("outside.lua"), "return 1").ok();
    put(
        "main.lua",
        b"local h = require('helper')\n\
          print(h.twice(21), require('pkg').name, (require('util')))\n\
          print(dofile('data.lua'), loadfile('data.lua', 't', { x = 'env x' })())\n\
          print(loadfile('../outside.lua'))\n\
          print(pcall(dofile, 'missing.lua'))\n\
          local bytes = '\xff\xfe'\n\
          print(#bytes, bytes:byte(1), package.path)\n",
    );
    let (ok, out, err) = covey_exec(&dir.path().join("main.lua"), &[]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "42\tpkg\tfrom lib\n\
         no x\tenv x\n\
         nil\tcannot open ../outside.lua\n\
         false\tcannot open missing.lua\n\
         2\t255\t./?.lua;./?/init.lua;lib/?.lua;lib/?/init.lua\n"
    );
}

/// A burst of writes, then quiet: a Lua script writes 3,000 keys while the
/// node starts (before the compactor's first look) and never writes again.
/// The history is compacted all the same, without another write — in a real
/// `covey run` process, as an operator would see it in the log.
#[test]
fn a_burst_then_quiet_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(
        scripts.join("burst.lua"),
        "for i = 1, 3000 do covey.kv.set('k/' .. i, 'v' .. i) end\ncovey.log.info('burst done')\n",
    )
    .unwrap();
    let config = dir.path().join("covey.yaml");
    std::fs::write(&config, "kv_compact_after: 1000\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args([
            "run", "--node", "burst", "--log", "info", "--cpu-ms", "60000",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--scripts")
        .arg(&scripts)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log as it comes, until the compaction line (or a minute).
    let mut err = child.stdout.take().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let compacted = || seen.lock().unwrap().contains("key-value history compacted");
    while !compacted() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { kill(child.id() as i32, 15) };
    child.wait().unwrap();
    reader.join().unwrap();
    let log = seen.lock().unwrap().clone();
    assert!(log.contains("burst done"), "{log}");
    assert!(compacted(), "no compaction after the burst:\n{log}");
}
