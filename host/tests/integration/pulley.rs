//! Scripts on Pulley, wasmtime's interpreter: what every 32-bit Pi (no
//! Cranelift backend) runs. Here on `pulley64`, the same interpreter and
//! code generator as `pulley32` with this machine's pointer width, so every
//! test run covers the 32-bit ARM engine path; `dist/qemu-smoke.sh` runs the
//! real ARM binaries. Also: precompiled artifacts (`covey compile`), which
//! are how a Pi Zero avoids compiling.

use std::time::Duration;

use covey::bindings::CallError;
use covey::engine::{EngineLimits, MemoryLayout, Precompiled, ScriptEngine, Target};

use crate::common::{eventually, guest, start_with};
use crate::lua::load;

fn pulley() -> Target {
    Target::for_machine("pulley64", None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_and_rust_scripts_talk_on_pulley() {
    let t = start_with(&["echo"], |c| c.engine_target = pulley()).await;
    assert_eq!(t.node().engine().target_name(), "pulley64");
    load(
        &t,
        "upper.lua",
        r#"
covey.handle("*", "shout", function(msg)
  local r, err = covey.call("n1", "echo.upper", msg.payload, 5000)
  covey.kv.set("pulley/last", r or err)
  return r or err
end)
covey.on("*", "count", function() covey.kv.incr("pulley/count") end)
"#,
    )
    .await;
    // Lua → Rust call and back, through the interpreter both ways.
    assert_eq!(t.call("shout", "hello pi").await.unwrap(), "HELLO PI");
    assert_eq!(t.kv_string("pulley/last").as_deref(), Some("HELLO PI"));
    for _ in 0..50 {
        t.node().router().emit("count", vec![]).unwrap();
    }
    eventually(20, "50 events counted", || async {
        t.kv_i64("pulley/count") == 50
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_loops_and_memory_bombs_are_stopped_on_pulley() {
    let t = start_with(&["testing/spin:spin.wasm"], |c| {
        c.engine_target = pulley();
        c.limits.memory_bytes = 16 << 20;
        // The interpreter is ~10x slower than native code: room for the
        // bomb to reach the memory cap before the CPU budget.
        c.limits.cpu_budget = Duration::from_secs(10);
    })
    .await;
    // Epoch interruption works in the interpreter: a Rust guest's loop...
    let long = Duration::from_secs(30);
    match t.call_timeout("spin", "", long).await {
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("CPU budget"), "{msg}"),
        other => panic!("expected the CPU budget to stop spin, got {other:?}"),
    }
    // ...and a Lua one; the memory cap holds too.
    load(
        &t,
        "heavy.lua",
        r#"
covey.handle("*", "lua.spin", function() while true do end end)
covey.handle("*", "lua.bomb", function()
  local ok, err = pcall(function()
    local s = "x"
    for _ = 1, 20 do s = s .. s end
    local t = {}
    for i = 1, 1e9 do t[i] = s .. i end
  end)
  collectgarbage()
  return tostring(ok) .. "|" .. tostring(err)
end)
covey.handle("*", "lua.alive", function() return "yes" end)
"#,
    )
    .await;
    match t.call_timeout("lua.spin", "", long).await {
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("CPU budget"), "{msg}"),
        other => panic!("expected the CPU budget to stop lua.spin, got {other:?}"),
    }
    eventually(20, "heavy.lua restarted", || async {
        t.call("lua.alive", "").await.as_deref() == Ok("yes")
    })
    .await;
    // With a 16 MiB cap the bomb ends in Lua's "not enough memory" or, when
    // an allocation in the guest's Rust glue is the one that fails, in an
    // abort: either way the script fails cleanly and comes back.
    match t.call_timeout("lua.bomb", "", long).await {
        Ok(r) => assert_eq!(r, "false|not enough memory"),
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("out of memory"), "{msg}"),
        Err(other) => panic!("expected the memory cap to stop the bomb, got {other:?}"),
    }
    eventually(20, "heavy.lua alive after the bomb", || async {
        t.call("lua.alive", "").await.as_deref() == Ok("yes")
    })
    .await;
}

/// `covey compile` output next to a component is used only by a node that
/// trusts precompiled code, only for the exact source bytes, and a bad one
/// is ignored (the node compiles instead) rather than trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precompiled_artifacts_are_verified_and_used_only_when_trusted() {
    let source = std::fs::read(guest("echo")).unwrap();
    let limits = EngineLimits {
        target: pulley(),
        ..EngineLimits::default()
    };
    let engine = ScriptEngine::new(limits.clone()).unwrap();
    let artifact = engine.precompile(&source).unwrap();

    // Loads for the same bytes; refuses other bytes and other settings.
    unsafe { engine.load_precompiled(&source, &artifact) }.unwrap();
    let mut other = source.clone();
    other.push(0);
    let err = unsafe { engine.load_precompiled(&other, &artifact) }.unwrap_err();
    assert!(format!("{err:#}").contains("other source bytes"), "{err:#}");
    let roomier = ScriptEngine::new(EngineLimits {
        memory_bytes: 128 << 20,
        ..limits.clone()
    })
    .unwrap();
    assert!(unsafe { roomier.load_precompiled(&source, &artifact) }.is_err());
    let native = ScriptEngine::new(EngineLimits::default()).unwrap();
    assert!(unsafe { native.load_precompiled(&source, &artifact) }.is_err());
    let garbage = b"COVEYPC1 certainly not machine code".to_vec();
    assert!(unsafe { engine.load_precompiled(&source, &garbage) }.is_err());
    assert_eq!(
        Target::for_machine("armv6", None).unwrap(),
        Target::Cross {
            triple: "pulley32".into(),
            layout: MemoryLayout::Compact
        }
    );

    // In a node: a trusted, matching artifact is used; a corrupt one next
    // to a component is ignored and the component still runs.
    for (trust, corrupt) in [(true, false), (true, true), (false, false)] {
        let t = start_with(&[], |c| {
            c.engine_target = pulley();
            if trust {
                c.precompiled = Precompiled::Trust;
            }
        })
        .await;
        let mut bytes = artifact.clone();
        if corrupt {
            let n = bytes.len();
            bytes.truncate(n / 2);
        }
        std::fs::write(t.scripts.join("echo.pulley64.cwasm"), &bytes).unwrap();
        let path = t.install("echo", "echo.wasm");
        t.node().supervisor().sync_path(&path).await.unwrap();
        assert_eq!(t.call("echo", "pre").await.unwrap(), "pre");
        // The cache directory shows whether the node compiled it itself.
        let compiled_here = std::fs::read_dir(t.data.join("cache"))
            .map(|d| d.count())
            .unwrap_or(0)
            > 0;
        assert_eq!(
            compiled_here,
            !trust || corrupt,
            "trust={trust} corrupt={corrupt}"
        );
    }
}
