//! Guests written in Python (componentize-py) and JavaScript
//! (componentize-js), built from `wit/` like any other toolchain's: the
//! same events, calls and key-value store as a Rust or Lua script.

use crate::common::{eventually, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_guests_handle_events_calls_and_kv() {
    let t = start(&["python-hello", "js-hello"]).await;
    for lang in ["py", "js"] {
        eventually(120, &format!("{lang}.echo answers"), || async {
            t.call(&format!("{lang}.echo"), "hi").await.as_deref() == Ok(&*format!("{lang}: hi"))
        })
        .await;
    }
    let router = t.node().router();
    for payload in ["one", "two", "três"] {
        router.emit("hello", payload.as_bytes().to_vec()).unwrap();
    }
    router.emit("other", b"not counted".to_vec()).unwrap();
    for lang in ["py", "js"] {
        eventually(20, &format!("{lang} heard three hellos"), || async {
            t.call(&format!("{lang}.count"), "").await.as_deref() == Ok("3")
        })
        .await;
        // The store, written and read back by the guest, and seen by the host.
        assert_eq!(t.call(&format!("{lang}.save"), "").await.unwrap(), "1 três");
        assert_eq!(t.call(&format!("{lang}.save"), "").await.unwrap(), "2 três");
        assert_eq!(
            t.kv_string(&format!("{lang}/last")).as_deref(),
            Some("três")
        );
        assert_eq!(t.kv_i64(&format!("{lang}/saves")), 2);
        // Bytes pass through unchanged, whatever they are.
        assert_eq!(
            t.call(&format!("{lang}.echo"), "ünïcødé ✓").await.unwrap(),
            format!("{lang}: ünïcødé ✓")
        );
    }
    let scripts = t.node().router().scripts();
    assert!(
        scripts.iter().any(|s| &**s == "python-hello.wasm"),
        "{scripts:?}"
    );
}
