//! The key-value store through the `kv` interface, and its persistence.

use std::time::Duration;

use crate::common::{eventually, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_operations_and_limits() {
    let t = start(&["testing/probe:probe.wasm"]).await;
    assert_eq!(
        t.call("probe.set", "room/kitchen|21").await.unwrap(),
        "Ok(())"
    );
    assert_eq!(t.call("probe.set", "room/hall|19").await.unwrap(), "Ok(())");
    assert_eq!(t.call("probe.set", "other|x").await.unwrap(), "Ok(())");
    assert_eq!(t.call("probe.get", "room/kitchen").await.unwrap(), "21");
    assert_eq!(t.call("probe.get", "nope").await.unwrap(), "<none>");
    assert_eq!(
        t.call("probe.keys", "room/").await.unwrap(),
        "room/hall,room/kitchen"
    );
    assert_eq!(t.call("probe.incr", "hits|5").await.unwrap(), "Ok(5)");
    assert_eq!(t.call("probe.incr", "hits|-2").await.unwrap(), "Ok(3)");
    assert_eq!(t.call("probe.get", "hits").await.unwrap(), "3");
    let r = t.call("probe.incr", "other|1").await.unwrap();
    assert!(r.contains("NotACounter"), "{r}");
    assert_eq!(t.call("probe.delete", "other").await.unwrap(), "Ok(true)");
    assert_eq!(t.call("probe.delete", "other").await.unwrap(), "Ok(false)");
    let long_key = "k".repeat(2000);
    let r = t.call("probe.set", &format!("{long_key}|v")).await.unwrap();
    assert!(r.contains("InvalidKey"), "{r}");
    let r = t.call("probe.set", "|v").await.unwrap();
    assert!(r.contains("InvalidKey"), "{r}");
    // Values over 1 MiB do not fit in a call payload either; go direct.
    let r = t.node().kv().set("big", &vec![0u8; (1 << 20) + 1]);
    assert_eq!(r, Err(covey::kvdoc::KvError::ValueTooLarge(1 << 20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_each_change_once() {
    let t = start(&["testing/probe:probe.wasm"]).await;
    let id = t.call("probe.watch", "w/").await.unwrap();
    let kv = t.node().kv();
    kv.set("w/a", b"1").unwrap();
    kv.set("w/a", b"2").unwrap();
    kv.incr("w/n", 7).unwrap();
    kv.set("unwatched", b"x").unwrap();
    kv.delete("w/a").unwrap();
    // The probe counts a change, then records its value: wait for both.
    eventually(5, "changes seen", || async {
        t.kv_i64("probe-seen/w/a") == 3
            && t.kv_i64("probe-seen/w/n") == 1
            && t.kv_string("probe-last/w/a").as_deref() == Some("<deleted>")
            && t.kv_string("probe-last/w/n").as_deref() == Some("7")
    })
    .await;
    assert_eq!(t.kv_i64("probe-seen/unwatched"), 0);
    assert_eq!(t.call("probe.unwatch", &id).await.unwrap(), "true");
    kv.set("w/b", b"1").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.kv_i64("probe-seen/w/b"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_survives_restart() {
    let mut t = start(&["testing/probe:probe.wasm"]).await;
    t.call("probe.set", "keep|me").await.unwrap();
    t.call("probe.incr", "count|41").await.unwrap();
    let cfg = t.config();
    t.restart(cfg).await;
    assert_eq!(t.call("probe.get", "keep").await.unwrap(), "me");
    assert_eq!(t.call("probe.incr", "count|1").await.unwrap(), "Ok(42)");
    // Many writes, then a restart that must reload the appended chunks.
    for i in 0..300 {
        t.node()
            .kv()
            .set(&format!("bulk/{i}"), &[i as u8; 100])
            .unwrap();
    }
    let cfg = t.config();
    t.restart(cfg).await;
    assert_eq!(t.node().kv().keys("bulk/").len(), 300);
    assert_eq!(t.call("probe.get", "count").await.unwrap(), "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_kv_file_is_moved_aside_and_valid_prefix_kept() {
    let mut t = start(&[]).await;
    t.node().kv().set("before", b"1").unwrap();
    let cfg = t.config();
    t.stop().await;
    let path = t.data.join("kv.automerge");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"\x85\x6f\x4a\x83garbage that is not an automerge chunk");
    std::fs::write(&path, &bytes).unwrap();
    t.restart(cfg).await;
    assert_eq!(t.kv_string("before").as_deref(), Some("1"));
    let aside: Vec<_> = std::fs::read_dir(&t.data)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert_eq!(aside.len(), 1, "the corrupted file is kept for inspection");
    // And the store works and persists again.
    t.node().kv().set("after", b"2").unwrap();
    let cfg = t.config();
    t.restart(cfg).await;
    assert_eq!(t.kv_string("after").as_deref(), Some("2"));
    assert_eq!(t.kv_string("before").as_deref(), Some("1"));
}
