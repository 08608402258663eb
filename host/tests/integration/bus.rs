//! Events, commands and calls among the scripts of one node.

use std::time::Duration;

use covey::bindings::{CallError, SendError};

use crate::common::{eventually, start, start_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_events_flow_and_are_counted() {
    let t = start(&["ping", "pong", "counter"]).await;
    t.node().router().emit("serve", b"5".to_vec()).unwrap();
    eventually(10, "5 rallies", || async {
        t.kv_i64("pingpong/rallies") == 5
    })
    .await;
    eventually(10, "counter saw every event", || async {
        t.kv_i64("counter/by-name/ping") == 5
            && t.kv_i64("counter/by-name/pong") == 5
            && t.kv_i64("counter/by-name/serve") == 1
    })
    .await;
    // The game is over: no more traffic.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.kv_i64("counter/total"), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_get_replies_and_clear_errors() {
    let t = start(&["echo", "testing/probe:probe.wasm"]).await;
    assert_eq!(t.call("echo", "hi there").await.unwrap(), "hi there");
    assert_eq!(t.call("echo.upper", "hi there").await.unwrap(), "HI THERE");
    // Script to script, through the guest's `call` import.
    assert_eq!(
        t.call("probe.call", "n1|echo.upper|1000|abc")
            .await
            .unwrap(),
        "ok:ABC"
    );

    match t.call("nobody.handles.this", "").await {
        Err(CallError::NoHandler(msg)) => assert!(msg.contains("nobody.handles.this"), "{msg}"),
        other => panic!("expected no-handler, got {other:?}"),
    }
    let router = t.node().router();
    let r = router
        .call(None, "*", "echo", vec![], Duration::from_secs(1))
        .await;
    assert!(matches!(r, Err(CallError::InvalidTarget(_))), "{r:?}");
    let r = router
        .call(None, "elsewhere", "echo", vec![], Duration::from_secs(1))
        .await;
    assert_eq!(r, Err(CallError::UnknownNode("elsewhere".into())));
    let big = vec![0u8; (1 << 20) + 1];
    let r = router
        .call(None, "n1", "echo", big.clone(), Duration::from_secs(1))
        .await;
    assert_eq!(r, Err(CallError::PayloadTooLarge(1 << 20)));
    assert_eq!(
        router.emit("x", big),
        Err(SendError::PayloadTooLarge(1 << 20))
    );
    assert_eq!(t.call("probe.silent", "").await, Err(CallError::NoReply));
    // A script is never chosen to answer its own call (it would deadlock).
    let own = t.call("probe.call", "n1|probe.node|500|").await.unwrap();
    assert!(
        own.starts_with("err:") && own.contains("NoHandler"),
        "{own}"
    );
    assert_eq!(t.call("probe.node", "").await.unwrap(), "n1|1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_gets_no_answer_in_time_times_out() {
    // `spin` never answers `spin`; its budget is longer than the timeout.
    let t = start_with(
        &["testing/spin:spin.wasm", "testing/probe:probe.wasm"],
        |c| c.limits.cpu_budget = Duration::from_secs(2),
    )
    .await;
    let r = t.call_timeout("spin", "", Duration::from_millis(100)).await;
    assert_eq!(r, Err(CallError::Timeout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_call_timeout_is_reported_to_the_guest() {
    let t = start_with(
        &["testing/spin:spin.wasm", "testing/probe:probe.wasm"],
        |c| c.limits.cpu_budget = Duration::from_secs(2),
    )
    .await;
    let r = t.call("probe.call", "n1|spin|100|").await.unwrap();
    assert_eq!(r, "err:CallError::Timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_commands_and_patterns() {
    let t = start(&["testing/probe:probe.wasm"]).await;
    t.call("probe.subscribe", "*|sensor.*").await.unwrap();
    let router = t.node().router();
    router.emit("sensor.temp", b"21.5".to_vec()).unwrap();
    router.emit("other", b"x".to_vec()).unwrap();
    // The probe counts an event, then records it: wait for both.
    eventually(5, "sensor event seen", || async {
        t.kv_i64("probe-events/sensor.temp") == 1
            && t.kv_string("probe-events-last/sensor.temp").as_deref() == Some("n1|21.5")
    })
    .await;
    assert_eq!(t.kv_i64("probe-events/other"), 0);
    // From-pattern: only events from node `elsewhere`.
    t.call("probe.subscribe", "elsewhere|from.test")
        .await
        .unwrap();
    router.emit("from.test", vec![]).unwrap();
    // Commands to `*` and to this node reach handlers; unknown nodes error.
    assert_eq!(
        router.send_command("*", "probe.emit", b"sensor.x|1".to_vec()),
        Ok(1)
    );
    assert_eq!(
        router.send_command("n1", "probe.emit", b"sensor.y|2".to_vec()),
        Ok(1)
    );
    assert_eq!(
        router.send_command("ghost", "probe.emit", vec![]),
        Err(SendError::UnknownNode("ghost".into()))
    );
    eventually(5, "events emitted by commands", || async {
        t.kv_i64("probe-events/sensor.x") == 1 && t.kv_i64("probe-events/sensor.y") == 1
    })
    .await;
    assert_eq!(t.kv_i64("probe-events/from.test"), 0);
    // Subscribing twice returns the same id: delivered once.
    let a = t.call("probe.subscribe", "*|dup").await.unwrap();
    let b = t.call("probe.subscribe", "*|dup").await.unwrap();
    assert_eq!(a, b);
    router.emit("dup", vec![]).unwrap();
    eventually(5, "dup seen", || async {
        t.kv_i64("probe-events/dup") == 1
    })
    .await;
    assert_eq!(t.call("probe.unsubscribe", &a).await.unwrap(), "true");
    router.emit("dup", vec![]).unwrap();
    router.emit("sensor.z", vec![]).unwrap();
    eventually(5, "later event seen", || async {
        t.kv_i64("probe-events/sensor.z") == 1
    })
    .await;
    assert_eq!(t.kv_i64("probe-events/dup"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_repeat_and_cancel() {
    let t = start(&["testing/probe:probe.wasm"]).await;
    let once = t.call("probe.after", "20").await.unwrap();
    let thrice = t.call("probe.every", "10|3").await.unwrap();
    let cancelled = t.call("probe.after", "300").await.unwrap();
    assert_eq!(t.call("probe.cancel", &cancelled).await.unwrap(), "true");
    assert_eq!(t.call("probe.cancel", &cancelled).await.unwrap(), "false");
    eventually(5, "timers fired", || async {
        t.kv_i64(&format!("probe-timer/{once}")) == 1
            && t.kv_i64(&format!("probe-timer/{thrice}")) == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.kv_i64(&format!("probe-timer/{once}")), 1);
    assert_eq!(
        t.kv_i64(&format!("probe-timer/{thrice}")),
        3,
        "stopped after on-timer returned false"
    );
    assert_eq!(t.kv_i64(&format!("probe-timer/{cancelled}")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_extras_reach_scripts() {
    let t = start_with(&["testing/probe:probe.wasm"], |c| {
        c.extras.insert("greeting".into(), "hello".into());
        c.extras
            .insert("limits".into(), serde_json::json!({"max": 3}));
    })
    .await;
    assert_eq!(t.call("probe.config", "greeting").await.unwrap(), "hello");
    assert_eq!(
        t.call("probe.config", "limits").await.unwrap(),
        r#"{"max":3}"#
    );
    assert_eq!(t.call("probe.config", "missing").await.unwrap(), "<none>");
}

/// Events waiting in a script's mailbox reach it in batches (`on-events`),
/// in the order they were sent, and a command sent between two of them is
/// handled between them.
#[tokio::test]
async fn a_backlog_arrives_in_batches_in_order_around_a_command() {
    let t = start(&["testing/sink:sink.wasm"]).await;
    let router = t.node().router();
    // One thread: the script runs only when this test awaits, so all of
    // these wait in its mailbox together (4,096 places by default).
    for i in 0..3000u32 {
        router.emit("numbered", i.to_string().into_bytes()).unwrap();
        if i == 1999 {
            router.send_command("n1", "mark", vec![]).unwrap();
        }
    }
    assert_eq!(t.call("count", "").await.unwrap(), "3000");
    assert_eq!(
        t.call("order", "").await.unwrap(),
        "true Some(2999) Some(2000)"
    );
    let batches = t.call("batches", "").await.unwrap();
    let (calls, largest) = batches.split_once(' ').unwrap();
    let (calls, largest): (u32, u32) = (calls.parse().unwrap(), largest.parse().unwrap());
    assert!(calls > 0 && largest > 1, "no batch: {batches}");
    assert!(largest <= 256, "a batch over the limit: {batches}");
    let stats = &router.stats;
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// A backlog of large events is cut into batches of about 1 MiB
/// (`MAX_BATCH_BYTES`), however many events a batch could otherwise take:
/// a batch is copied into the script's memory at once.
#[tokio::test]
async fn a_backlog_of_large_events_goes_in_batches_of_bounded_size() {
    let t = start(&["testing/sink:sink.wasm"]).await;
    let router = t.node().router();
    // Small events first, so batches grow to their full count.
    for i in 0..3000u32 {
        router.emit("numbered", i.to_string().into_bytes()).unwrap();
    }
    assert_eq!(t.call("count", "").await.unwrap(), "3000");
    let big = vec![b'x'; 64 << 10];
    for _ in 0..100 {
        router.emit("bench", big.clone()).unwrap();
    }
    assert_eq!(t.call("count", "").await.unwrap(), "3100");
    let largest: usize = t.call("batch-bytes", "").await.unwrap().parse().unwrap();
    let cap = covey::script::batch::MAX_BATCH_BYTES;
    assert!(
        largest > big.len() && largest < cap + big.len(),
        "the largest batch carried {largest} payload bytes"
    );
}
