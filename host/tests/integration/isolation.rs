//! Isolation: runaway loops, memory bombs, crashes and bad files never take
//! the host or other scripts down.

use std::path::Path;
use std::time::{Duration, Instant};

use covey::bindings::CallError;

use crate::common::{eventually, guest, start, start_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_loop_is_stopped_while_others_keep_running() {
    let t = start(&["testing/spin:spin.wasm", "echo"]).await;
    // Two runaway callbacks in a row.
    t.node().router().emit("spin", vec![]).unwrap();
    t.node().router().emit("spin", vec![]).unwrap();
    // Meanwhile another script answers promptly.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(t.call("echo", "x").await.unwrap(), "x");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "echo starved: {:?}",
            started.elapsed()
        );
    }
    eventually(10, "spin restarted and alive", || async {
        t.call("alive", "").await.as_deref() == Ok("yes")
    })
    .await;
    let list = t.node().supervisor().list().await;
    let spin = list.iter().find(|s| &*s.script == "spin.wasm").unwrap();
    assert!(spin.restarts >= 1);
    let err = spin.last_error.as_deref().unwrap();
    assert!(
        err.contains("on-event") && err.contains("CPU budget"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_call_fails_with_a_clear_error() {
    let t = start(&["testing/spin:spin.wasm"]).await;
    match t.call("spin", "").await {
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("CPU budget"), "{msg}"),
        other => panic!("expected handler-failed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_capped_and_the_script_restarted() {
    let t = start_with(&["testing/bomb:bomb.wasm", "echo"], |c| {
        c.limits.memory_bytes = 16 << 20;
    })
    .await;
    match t.call("bomb", "").await {
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("trap"), "{msg}"),
        other => panic!("expected handler-failed, got {other:?}"),
    }
    eventually(10, "bomb restarted", || async {
        t.call("alive", "").await.as_deref() == Ok("yes")
    })
    .await;
    assert_eq!(t.call("echo", "fine").await.unwrap(), "fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restarts_the_script() {
    let t = start(&["testing/crash:crash.wasm"]).await;
    assert_eq!(t.kv_i64("crash/inits"), 1);
    assert!(matches!(
        t.call("crash", "").await,
        Err(CallError::HandlerFailed(_))
    ));
    eventually(10, "restarted", || async { t.kv_i64("crash/inits") == 2 }).await;
    assert_eq!(t.call("alive", "").await.unwrap(), "yes");
    // Repeated crashes back off instead of spinning.
    assert!(matches!(
        t.call("crash", "").await,
        Err(CallError::HandlerFailed(_))
    ));
    eventually(10, "restarted again", || async {
        t.kv_i64("crash/inits") == 3
    })
    .await;
    let list = t.node().supervisor().list().await;
    assert_eq!(list[0].restarts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_foreign_components_are_rejected_clearly() {
    let t = start(&["echo"]).await;
    let sup = t.node().supervisor();
    let fixture = |name: &str| {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(name),
        )
        .unwrap()
    };
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "garbage.wasm",
            b"\x00\x01 random bytes".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0".to_vec(),
            "core wasm module, not a component",
        ),
        (
            "truncated.wasm",
            std::fs::read(guest("echo")).unwrap()[..5000].to_vec(),
            "not a loadable WebAssembly component",
        ),
        (
            "foreign.wasm",
            std::fs::read(guest("testing/not-covey")).unwrap(),
            "does not fit the covey:script@0.5.0",
        ),
        (
            // The pong example as built before the 0.2.0 contract.
            "old.wasm",
            fixture("pong-wit-0.1.0.wasm"),
            "was built against covey:script@0.1.0; this host implements covey:script@0.5.0",
        ),
        (
            // The echo example as built against 0.4.0, before 0.5.0's
            // batch layout of `on-events`.
            "echo-0.4.wasm",
            fixture("echo-wit-0.4.0.wasm"),
            "was built against covey:script@0.4.0; this host implements covey:script@0.5.0: \
             rebuild it",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = t.scripts.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = format!("{:#}", sup.sync_path(&path).await.unwrap_err());
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains(name), "the error names the file: {err}");
    }
    assert_eq!(t.call("echo", "unharmed").await.unwrap(), "unharmed");
}
