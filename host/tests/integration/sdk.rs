//! The guest SDK's examples, built both ways the README documents.

use std::path::Path;

use crate::common::{eventually, guest, start_with};

async fn hello_emits_and_hears_itself(hello: &Path) {
    let t = start_with(&["testing/probe:probe.wasm"], |c| {
        c.extras.insert("hello_interval_ms".into(), "20".into());
    })
    .await;
    t.call("probe.subscribe", "*|hello").await.unwrap();
    std::fs::copy(hello, t.scripts.join("hello.wasm")).unwrap();
    eventually(10, "hello events", || async {
        t.kv_i64("probe-events/hello") >= 2
    })
    .await;
    let last = t.kv_string("probe-events-last/hello").unwrap();
    assert!(
        last.starts_with("n1|hello #") && last.ends_with("from n1"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_built_with_cargo_build_runs() {
    hello_emits_and_hears_itself(&guest("hello")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_built_with_cargo_component_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let wasm = root.join("target/wasm32-wasip1/release/hello.wasm");
    if !wasm.exists() {
        crate::skip::missing(&format!(
            "{} not found; `bash .ci/test` builds it with `cargo component build`",
            wasm.display()
        ));
        return;
    }
    hello_emits_and_hears_itself(&wasm).await;
}
