//! esc's later Lua API, from its own sources: one kind of message.
//! `send(to, name, payload)` delivers to node `to`, or to every node with
//! `*`; `on(from, name, fn)` hears every such message from `from` (or `*`),
//! including one a script sends to `self()`. esc's demo script
//! (`files/scripts/demo.lua`) runs unmodified.

use covey::cluster::credentials::ClusterToken;

use super::cluster::{addr, join, wait_up};
use super::common::{eventually, start_with};
use super::http::covey_logging;
use super::lua::load;

/// esc's demo, as its repository has it (text unchanged).
const DEMO: &str = r#"
log(foo)

log("CFG "..config("foo"))
log("CFG "..config("fuz"))

on("*","test",function(msg)
  log("Received "..msg.name)

  send(self(),"hello","world")
end)

on("*","hello",function(msg)
  log("Hello "..msg.payload.."!")
end)

i=0
tick(2,function()
  log("Sending hello "..i.."!")
  i = i +1
  send(self(),"test","hello")
  return i <= 5
end)
"#;

fn lines_of(script: &str) -> Vec<String> {
    let query = covey::logring::LogQuery {
        script: Some(script.into()),
        since_ms: None,
    };
    // The script's own lines (not the host's `script started`).
    (covey::logring::LOGS.recent(&query).into_iter())
        .map(|l| l.message)
        .filter(|m| !m.starts_with("script "))
        .collect()
}

#[tokio::test]
async fn esc_demo_runs_unmodified() {
    covey_logging();
    let t = start_with(&[], |c| {
        c.extras.insert("foo".into(), "bar".into());
    })
    .await;
    load(&t, "esc-demo.lua", DEMO).await;
    eventually(20, "two rounds of the demo", || async {
        let lines = lines_of("esc-demo.lua");
        lines.iter().filter(|l| *l == "Hello world!").count() >= 2
    })
    .await;
    let lines = lines_of("esc-demo.lua");
    let start: Vec<&str> = lines.iter().take(4).map(String::as_str).collect();
    assert_eq!(start, ["", "CFG bar", "CFG ", "Sending hello 0!"]);
    // Each round: the tick sends `test` to itself, its handler `hello`.
    let round: Vec<&str> = lines[4..7].iter().map(String::as_str).collect();
    assert_eq!(round, ["Received test", "Hello world!", "Sending hello 1!"]);
    assert!(!lines.iter().any(|l| l.contains("dropped")), "{lines:#?}");
}

/// Two nodes: `send("*", ...)` reaches `on` on both (the sender's too),
/// `send("esc-b", ...)` only b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_a_node_or_every_node() {
    let token = ClusterToken::generate();
    let a = join("esc-a", &token, &[], &[], |_| {}).await;
    let b = join("esc-b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    let counter = r#"
for _, name in ipairs({ "ping", "pong", "fence" }) do
  on("*", name, function(msg) covey.kv.incr(msg.name .. "/" .. self() .. "/" .. msg.from) end)
end
"#;
    for t in [&a, &b] {
        load(t, "counter.lua", counter).await;
    }
    // `go` with "TO NAME": send(TO, NAME, "x"), in the order asked.
    let sender = r#"
on("*", "go", function(msg)
  local to, name = msg.payload:match("(%S+) (%S+)")
  send(to, name, "x")
end)
"#;
    load(&a, "sender.lua", sender).await;
    let go = |what: &'static str| {
        a.node()
            .router()
            .send_command("esc-a", "go", what.as_bytes().to_vec())
            .unwrap();
    };
    // Every node, the sender's own included (again until b's subscription
    // has reached a).
    eventually(20, "ping to every node", || async {
        go("* ping");
        a.kv_i64("ping/esc-a/esc-a") > 0 && a.kv_i64("ping/esc-b/esc-a") > 0
    })
    .await;
    // Then one to b alone, and a fence to everyone behind it.
    go("esc-b pong");
    go("* fence");
    eventually(10, "the fence on both nodes", || async {
        a.kv_i64("fence/esc-a/esc-a") == 1 && a.kv_i64("fence/esc-b/esc-a") == 1
    })
    .await;
    assert_eq!(a.kv_i64("pong/esc-b/esc-a"), 1);
    assert_eq!(a.kv_i64("pong/esc-a/esc-a"), 0, "a was not a target");
}
