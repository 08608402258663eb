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

/// A burst of events arrives in batches (`on-events`); an interpreted guest
/// must see every one, whatever its garbage collector does meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_guests_see_every_event_of_a_burst() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let t = start(&["python-hello", "js-hello"]).await;
    for lang in ["py", "js"] {
        eventually(120, &format!("{lang}.count answers"), || async {
            t.call(&format!("{lang}.count"), "").await.as_deref() == Ok("0")
        })
        .await;
    }
    let memory = || async {
        let list = t.node().supervisor().list().await;
        list.iter()
            .map(|s| (s.script.clone(), s.memory_bytes, s.restarts))
            .collect::<Vec<_>>()
    };
    let before = memory().await;
    let router = t.node().router();
    const BURST: u64 = 20_000;
    // Paced like a producer that respects the mailboxes' bound (4096 by
    // default): at most 512 deliveries outstanding.
    let handled = || {
        router
            .stats
            .handled
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let base = handled();
    for sent in 0..BURST {
        // Each event is two deliveries, one to each guest.
        while (2 * sent).saturating_sub(handled() - base) >= 512 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        router.emit("hello", vec![7u8; 64]).unwrap();
    }
    for lang in ["py", "js"] {
        eventually(60, &format!("{lang} heard the whole burst"), || async {
            t.call(&format!("{lang}.count"), "").await.as_deref() == Ok(&*BURST.to_string())
        })
        .await;
    }
    let after = memory().await;
    // Linear memory growth per event, for docs/benchmarks.md (componentize-js
    // leaks the arguments of every call; see the languages bench).
    for ((script, m0, _), (_, m1, restarts)) in before.iter().zip(&after) {
        eprintln!(
            "{script}: linear memory {m0} -> {m1} bytes over {BURST} events ({:.0} bytes/event)",
            (*m1 as f64 - *m0 as f64) / BURST as f64
        );
        assert_eq!(*restarts, 0, "{script} restarted: {after:?}");
    }
    assert_eq!(
        router
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
