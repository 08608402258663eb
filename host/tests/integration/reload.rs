//! Hot reload: swaps without losing events, bad versions keep the old one,
//! deletes stop scripts, the compiled-code cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use covey::bindings::CallError;
use covey::script::LoadOutcome;

use crate::common::{eventually, guest, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_version_without_losing_events() {
    let t = start(&["testing/version-a:v.wasm"]).await;
    assert_eq!(t.call("version", "").await.unwrap(), "a");
    let router = t.node().router().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let emitter = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(router.emit("tick", vec![]).unwrap(), 1, "every tick queued");
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.install("testing/version-b", "v.wasm");
    eventually(10, "version b answers", || async {
        t.call("version", "").await.as_deref() == Ok("b")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    emitter.await.unwrap();
    let sent = sent.load(Ordering::Relaxed) as i64;
    eventually(10, "every tick counted by a or b", || async {
        t.kv_i64("seen/a") + t.kv_i64("seen/b") == sent
    })
    .await;
    assert!(t.kv_i64("seen/a") > 0 && t.kv_i64("seen/b") > 0);
    // The old version's timer went away with it.
    let a_timer = t.kv_i64("timer/a");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.kv_i64("timer/a"), a_timer);
    assert!(t.kv_i64("timer/b") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_new_versions_keep_the_old_one_running() {
    let t = start(&["testing/version-a:v.wasm"]).await;
    let path = t.scripts.join("v.wasm");
    let sup = t.node().supervisor();

    std::fs::copy(guest("testing/broken-init"), &path).unwrap();
    let err = format!("{:#}", sup.sync_path(&path).await.unwrap_err());
    assert!(
        err.contains("refuses to start") && err.contains("previous version keeps running"),
        "{err}"
    );
    assert_eq!(t.call("version", "").await.unwrap(), "a");

    std::fs::write(&path, b"definitely not wasm").unwrap();
    let err = format!("{:#}", sup.sync_path(&path).await.unwrap_err());
    assert!(err.contains("not a WebAssembly file"), "{err}");
    assert_eq!(t.call("version", "").await.unwrap(), "a");

    // The old version still gets events too.
    t.node().router().emit("tick", vec![]).unwrap();
    eventually(5, "old version still counts", || async {
        t.kv_i64("seen/a") == 1
    })
    .await;

    // A good version afterwards is picked up by the watcher.
    t.install("testing/version-b", "v.wasm");
    eventually(10, "b takes over", || async {
        t.call("version", "").await.as_deref() == Ok("b")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_script_stops_it() {
    let t = start(&["testing/version-a:sub/dir/v.wasm", "echo"]).await;
    let ids: Vec<String> = t
        .node()
        .supervisor()
        .list()
        .await
        .iter()
        .map(|s| s.script.clone())
        .collect();
    assert_eq!(ids, ["echo.wasm", "sub/dir/v.wasm"]);
    assert_eq!(t.call("version", "").await.unwrap(), "a");
    std::fs::remove_dir_all(t.scripts.join("sub")).unwrap();
    eventually(10, "v stopped", || async {
        matches!(t.call("version", "").await, Err(CallError::NoHandler(_)))
    })
    .await;
    let a_timer = t.kv_i64("timer/a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.kv_i64("timer/a"), a_timer, "its timers stopped too");
    assert_eq!(t.call("echo", "still here").await.unwrap(), "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_and_editor_files_are_ignored_and_new_files_picked_up() {
    let t = start(&["echo:.hidden.wasm", "echo:e.wasm~", "echo:e.wasm.swp"]).await;
    assert!(t.node().supervisor().list().await.is_empty());
    t.install("echo", "late/e.wasm");
    eventually(10, "new file loaded", || async {
        t.call("echo", "x").await.is_ok()
    })
    .await;
    let path = t.scripts.join("late/e.wasm");
    assert_eq!(
        t.node().supervisor().sync_path(&path).await.unwrap(),
        LoadOutcome::Unchanged
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_and_bad_cache_entries_recovered() {
    let mut t = start(&["echo"]).await;
    let cache = t.data.join("cache");
    let artifacts: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    // A damaged artifact is discarded and the component compiled again.
    std::fs::write(&artifacts[0], b"junk").unwrap();
    let cfg = t.config();
    t.restart(cfg).await;
    assert_eq!(t.call("echo", "ok").await.unwrap(), "ok");
    assert!(
        std::fs::read(&artifacts[0]).unwrap().len() > 1000,
        "artifact rewritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_overwrite_is_picked_up() {
    // Editors and `cp` write in place: the watcher may see a truncated file
    // first; that version fails to load, the old one keeps running, and the
    // final write brings the new version.
    let t = start(&["testing/version-a:v.wasm"]).await;
    std::fs::copy(guest("testing/version-b"), t.scripts.join("v.wasm")).unwrap();
    eventually(10, "b takes over", || async {
        t.call("version", "").await.as_deref() == Ok("b")
    })
    .await;
    std::fs::copy(guest("testing/version-a"), t.scripts.join("v.wasm")).unwrap();
    eventually(10, "a is back", || async {
        t.call("version", "").await.as_deref() == Ok("a")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_busy_script_does_not_wait_for_its_backlog() {
    // Each event costs a fsynced KV write and a few ms of CPU: a backlog of
    // 600 takes seconds to drain. A stop waits for the delivery in hand,
    // not for the batch behind it (the watcher waits on the stop).
    let t = start(&[]).await;
    let busy = r#"
covey.on("*", "work", function()
  local t = os.clock()
  while os.clock() - t < 0.005 do end
  covey.kv.incr("handled")
end)
covey.log.info("busy ready")
"#;
    std::fs::write(t.scripts.join("busy.lua"), busy).unwrap();
    let supervisor = t.node().supervisor().clone();
    eventually(30, "busy.lua running", || async {
        supervisor
            .list()
            .await
            .iter()
            .any(|s| s.script == "busy.lua")
    })
    .await;
    for _ in 0..600 {
        t.node().router().emit("work", Vec::new()).unwrap();
    }
    eventually(30, "it started on the backlog", || async {
        t.kv_i64("handled") >= 1
    })
    .await;
    assert!(supervisor.stop("busy.lua").await);
    let handled = t.kv_i64("handled");
    // Without the check, a stop waited for the rest of a 256-delivery batch.
    assert!(
        handled < 100,
        "{handled} deliveries handled before the stop"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.kv_i64("handled"), handled, "nothing ran after the stop");
}
