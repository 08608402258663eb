//! System events as scripts see them: nodes going down (killed, stopped,
//! flapping) and coming back, scripts failing on another node, merge
//! conflicts, and the reserved `covey.` names.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use covey::NodeConfig;
use covey::bindings::SendError;
use covey::cluster::credentials::ClusterToken;
use covey::lifecycle::{DownReason, NodeEvent, ScriptEvent, StartKind, SystemEvent};
use serde_json::Value;

use crate::cluster::{addr, join, wait_up};
use crate::common::{TestNode, eventually};

/// Records every system event it sees (answers `seen` with them) and what
/// emitting a reserved name did.
const WATCH: &str = r#"
local seen = {}
covey.on("*", "covey.*", function(ev)
  table.insert(seen, { name = ev.name, from = ev.from, info = json.decode(ev.payload) })
end)
local downs = 0
covey.on_node_down(function(info) downs = downs + 1 end)
covey.handle("*", "seen", function() return json.encode(seen) end)
covey.handle("*", "downs", function() return tostring(downs) end)
local ok, err = covey.emit("covey.node.down", "{}")
covey.kv.set("reserved/" .. covey.node(), tostring(ok) .. " " .. tostring(err))
"#;

/// The system events `t`'s watcher has seen, in order.
async fn seen(t: &TestNode) -> Vec<SystemEvent> {
    let Ok(json) = t.call("seen", "").await else {
        return Vec::new();
    };
    let list: Vec<Value> = match serde_json::from_str(&json) {
        Ok(Value::Array(list)) => list,
        _ => return Vec::new(), // `{}`: nothing yet
    };
    list.iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap();
            let payload = serde_json::to_vec(&e["info"]).unwrap();
            SystemEvent::parse(name, &payload)
                .unwrap_or_else(|| panic!("unreadable system event {e}"))
        })
        .collect()
}

/// What `t` saw of node `of`: (up or down, the event).
async fn node_events(t: &TestNode, of: &str) -> Vec<(bool, NodeEvent)> {
    (seen(t).await.into_iter())
        .filter_map(|e| match e {
            SystemEvent::NodeUp(n) if n.node == of => Some((true, n)),
            SystemEvent::NodeDown(n) if n.node == of => Some((false, n)),
            _ => None,
        })
        .collect()
}

fn with_watcher(flap_ms: u64) -> impl Fn(&mut NodeConfig) + Copy {
    move |c: &mut NodeConfig| {
        std::fs::write(c.scripts_dir.join("watch.lua"), WATCH).unwrap();
        let cluster = c.cluster.as_mut().unwrap();
        cluster.flap_window = Duration::from_millis(flap_ms);
    }
}

/// `covey run` as node `name` of `token`'s cluster, linked to `peer`.
fn run_process(name: &str, token: &ClusterToken, peer: &str, dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_covey"))
        .args([
            "run",
            "--node",
            name,
            "--discovery",
            "off",
            "--listen",
            "127.0.0.1",
        ])
        .args([
            "--peer",
            peer,
            "--peer-timeout-ms",
            "1000",
            "--flap-window-ms",
            "300",
        ])
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--scripts")
        .arg(dir.join("scripts"))
        .env("COVEY_CLUSTER_TOKEN", token.encode())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_killed_stopped_and_back_are_seen_once_each_with_the_reason() {
    let token = ClusterToken::generate();
    // The Rust `watchdog` example reads the same events with the SDK.
    let a = join("a", &token, &[], &["watchdog"], with_watcher(300)).await;
    let mut b = join("b", &token, &[addr(&a)], &[], with_watcher(300)).await;
    wait_up(&[&a, &b]).await;
    // c: a separate process, so it can be killed without a goodbye.
    let dir = tempfile::tempdir().unwrap();
    let mut c = run_process("c", &token, &addr(&a).to_string(), dir.path());
    for t in [&a, &b] {
        eventually(60, &format!("{} sees c up", t.name), || async {
            node_events(t, "c").await.len() == 1
        })
        .await;
    }
    // b's watcher loaded after a was up (or a's before b): either way each
    // saw the other up exactly once, live or replayed.
    assert_eq!(node_events(&a, "b").await.len(), 1);
    let (up, ev) = node_events(&b, "a").await.remove(0);
    assert!(up && ev.address.starts_with("127.0.0.1:"), "{ev:?}");

    // Killed: no goodbye, so the others time out.
    c.kill().unwrap();
    c.wait().unwrap();
    for t in [&a, &b] {
        eventually(60, &format!("{} sees c down", t.name), || async {
            node_events(t, "c").await.len() == 2
        })
        .await;
        let (up, ev) = node_events(t, "c").await.remove(1);
        assert!(!up, "{ev:?}");
        assert_eq!(ev.reason, Some(DownReason::Timeout), "{ev:?}");
    }

    // Back (same data, a new process): up once; then stopped cleanly:
    // down at once with the reason `shutdown`.
    let mut c = run_process("c", &token, &addr(&a).to_string(), dir.path());
    eventually(60, "a sees c up again", || async {
        node_events(&a, "c").await.len() == 3
    })
    .await;
    assert!(node_events(&a, "c").await[2].0);
    let term = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    assert!(term.unwrap().success());
    c.wait().unwrap();
    eventually(60, "a sees c stop", || async {
        node_events(&a, "c").await.len() == 4
    })
    .await;
    let (up, ev) = node_events(&a, "c").await.remove(3);
    assert!(!up);
    assert_eq!(ev.reason, Some(DownReason::Shutdown), "{ev:?}");

    // An in-process node stopped cleanly: the same.
    b.stop().await;
    eventually(30, "a sees b stop", || async {
        node_events(&a, "b").await.len() == 2
    })
    .await;
    let (up, ev) = node_events(&a, "b").await.remove(1);
    assert!(!up && ev.reason == Some(DownReason::Shutdown), "{ev:?}");
    // The sugar saw the same downs as the plain subscription, and the
    // Rust watchdog read them typed.
    assert_eq!(a.call("downs", "").await.unwrap(), "3");
    eventually(30, "the watchdog recorded both", || async {
        a.kv_string("watchdog/a/node/b").as_deref() == Some("down: shutdown")
            && a.kv_string("watchdog/a/node/c").as_deref() == Some("down: shutdown")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_is_not_an_event_storm() {
    let token = ClusterToken::generate();
    // A minute-long window: no drop below is ever reported as such.
    let a = join("a", &token, &[], &[], with_watcher(60_000)).await;
    let mut b = join("b", &token, &[addr(&a)], &[], with_watcher(60_000)).await;
    wait_up(&[&a, &b]).await;
    eventually(30, "a sees b up", || async {
        node_events(&a, "b").await.len() == 1
    })
    .await;
    let cluster = a.node().cluster().unwrap().clone();
    let since = || {
        let peers = cluster.peers();
        let b = peers.iter().find(|p| p.name == "b").unwrap();
        (b.up, b.since_ms)
    };
    for _ in 0..3 {
        let (_, before) = since();
        assert!(cluster.sever("b"));
        // Down (the link closed), then up again (re-dialled): a new link.
        eventually(30, "the link comes back", || async {
            let (up, now) = since();
            up && now != before
        })
        .await;
        wait_up(&[&a, &b]).await;
    }
    assert_eq!(node_events(&a, "b").await.len(), 1, "no event per flap");
    // A clean stop is reported at once, with the flaps it hid.
    b.stop().await;
    eventually(30, "a sees b stop", || async {
        node_events(&a, "b").await.len() == 2
    })
    .await;
    let (up, ev) = node_events(&a, "b").await.remove(1);
    assert!(!up, "{ev:?}");
    assert_eq!(ev.reason, Some(DownReason::Shutdown));
    assert_eq!(ev.flaps, 3, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_failing_on_another_node_is_seen_with_its_error() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &["watchdog"], with_watcher(300)).await;
    let b = join("b", &token, &[addr(&a)], &[], with_watcher(300)).await;
    wait_up(&[&a, &b]).await;
    eventually(30, "a's watcher sees b", || async {
        node_events(&a, "b").await.len() == 1
    })
    .await;
    // Synced to both nodes; fails to start on b only.
    let crash = "if covey.node() == 'b' then error('no pump relay on ' .. covey.node()) end\n";
    std::fs::write(a.scripts.join("pump.lua"), crash).unwrap();
    let failed_on_b = |events: Vec<SystemEvent>| -> Option<ScriptEvent> {
        events.into_iter().find_map(|e| match e {
            SystemEvent::ScriptFailed(s) if s.node == "b" && s.script == "pump.lua" => Some(s),
            _ => None,
        })
    };
    eventually(60, "a sees pump.lua fail on b", || async {
        failed_on_b(seen(&a).await).is_some()
    })
    .await;
    let ev = failed_on_b(seen(&a).await).unwrap();
    assert!(
        ev.error.as_deref().unwrap().contains("no pump relay on b"),
        "{ev:?}"
    );
    assert_eq!(ev.callback.as_deref(), Some("init"));
    assert_eq!(ev.version.len(), 64, "{ev:?}");
    assert!(ev.retry_in_ms.is_some());
    eventually(30, "the watchdog recorded it", || async {
        (a.kv_string("watchdog/a/failed/b/pump.lua"))
            .is_some_and(|e| e.contains("no pump relay on b"))
    })
    .await;
    // And it started on a.
    assert!(seen(&a).await.iter().any(|e| matches!(e,
        SystemEvent::ScriptStarted(s) if s.node == "a" && s.script == "pump.lua"
            && s.start == Some(StartKind::Loaded))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_names_are_refused_to_scripts_and_clients() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], with_watcher(300)).await;
    eventually(30, "the watcher ran", || async {
        a.kv_string("reserved/a").is_some()
    })
    .await;
    let tried = a.kv_string("reserved/a").unwrap();
    assert!(
        tried.starts_with("nil ") && tried.contains("system event name"),
        "{tried}"
    );
    let r = a.node().router().emit("covey.node.down", b"{}".to_vec());
    assert_eq!(r, Err(SendError::ReservedName("covey.node.down".into())));
    // Nothing was delivered: the watcher saw no system event at all
    // (a lone node has no peers to report).
    assert!(
        !seen(&a)
            .await
            .iter()
            .any(|e| matches!(e, SystemEvent::NodeDown(_))),
    );
}

/// A modified peer puts system events on the wire itself (a router would
/// refuse them): only a `covey.script.*`/`covey.device.*` event about
/// the peer itself gets through; one about another node, or a local-only
/// event (node up/down, conflicts), is dropped at the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_events_forged_by_a_peer_are_dropped() {
    use serde_json::json;
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], with_watcher(300)).await;
    let evil = join("evil", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &evil]).await;
    let router = evil.node().router();
    let remote = router.remote().unwrap().clone();
    let script = |node: &str, name: &str| {
        json!({"node": node, "script": name, "version": "0".repeat(64), "restarts": 0,
               "callback": "init", "error": "forged"})
    };
    let forged = [
        (
            "covey.node.down",
            json!({"node": "ghost", "address": "10.0.0.9:7465",
            "since_ms": 0, "reason": "timeout", "flaps": 0, "replay": false}),
        ),
        (
            "covey.node.up",
            json!({"node": "ghost", "address": "10.0.0.9:7465",
            "since_ms": 0, "reason": null, "flaps": 0, "replay": false}),
        ),
        ("covey.script.failed", script("a", "pump.lua")),
        ("covey.script.failed", json!({"script": "no-node.lua"})),
        (
            "covey.device.attached",
            json!({"node": "a", "device": "relay"}),
        ),
        (
            "covey.kv.conflict",
            json!({"node": "evil", "key": "k", "winner": "evil", "losers": []}),
        ),
    ];
    for (name, payload) in &forged {
        let msg = router.message("*", name, serde_json::to_vec(payload).unwrap());
        remote.broadcast_event(&msg);
    }
    // Sent last on the same link (frames arrive in order): about itself.
    let own = router.message(
        "*",
        "covey.script.failed",
        serde_json::to_vec(&script("evil", "marker.lua")).unwrap(),
    );
    remote.broadcast_event(&own);
    let marker =
        |e: &SystemEvent| matches!(e, SystemEvent::ScriptFailed(s) if s.script == "marker.lua");
    eventually(30, "a sees evil's event about itself", || async {
        seen(&a).await.iter().any(marker)
    })
    .await;
    let events = seen(&a).await;
    let leaked: Vec<_> = (events.iter())
        .filter(|e| match e {
            SystemEvent::NodeUp(n) | SystemEvent::NodeDown(n) => n.node == "ghost",
            SystemEvent::ScriptFailed(s) => s.node != "evil",
            SystemEvent::DeviceAttached(_) | SystemEvent::KvConflict(_) => true,
            _ => false,
        })
        .collect();
    assert!(leaked.is_empty(), "forged events delivered: {leaked:?}");
    assert_eq!(events.iter().filter(|e| marker(e)).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_in_a_partition_are_one_conflict_event_on_each_node() {
    let token = ClusterToken::generate();
    // Two nodes of one cluster that have not met, as in a partition.
    let a = join("a", &token, &[], &[], with_watcher(300)).await;
    let b = join("b", &token, &[], &[], with_watcher(300)).await;
    for t in [&a, &b] {
        eventually(30, "the watcher ran", || async {
            t.kv_string(&format!("reserved/{}", t.name)).is_some()
        })
        .await;
    }
    a.node().kv().set("pump", b"on (a)").unwrap();
    b.node().kv().set("pump", b"off (b)").unwrap();
    // And one file of the scripts directory, edited on both sides.
    for t in [&a, &b] {
        std::fs::write(t.scripts.join("notes.txt"), format!("by {}", t.name)).unwrap();
        t.node().scripts_sync().unwrap().rescan().await.unwrap();
    }
    b.node().cluster().unwrap().add_peer(&addr(&a).to_string());
    wait_up(&[&a, &b]).await;
    let conflicts = |events: Vec<SystemEvent>| -> Vec<_> {
        (events.into_iter())
            .filter_map(|e| match e {
                SystemEvent::KvConflict(c) if c.key == "pump" => Some(c),
                _ => None,
            })
            .collect()
    };
    for t in [&a, &b] {
        eventually(30, &format!("{} sees the conflict", t.name), || async {
            !conflicts(seen(t).await).is_empty()
        })
        .await;
    }
    eventually(30, "both read one value", || async {
        a.node().kv().heads() == b.node().kv().heads()
    })
    .await;
    let value = a.kv_string("pump").unwrap();
    let winner = if value == "on (a)" { "a" } else { "b" };
    for t in [&a, &b] {
        let c = conflicts(seen(t).await);
        assert_eq!(c.len(), 1, "{} saw {c:?}", t.name);
        assert_eq!(c[0].winner, winner, "{c:?}");
        let loser = if winner == "a" { "b" } else { "a" };
        assert_eq!(c[0].losers, [loser], "{c:?}");
    }
    let file_conflicts = |events: Vec<SystemEvent>| -> Vec<_> {
        (events.into_iter())
            .filter_map(|e| match e {
                SystemEvent::ScriptsConflict(c) => Some(c),
                _ => None,
            })
            .collect()
    };
    for t in [&a, &b] {
        eventually(
            30,
            &format!("{} sees the file conflict", t.name),
            || async { !file_conflicts(seen(t).await).is_empty() },
        )
        .await;
    }
    for t in [&a, &b] {
        let c = file_conflicts(seen(t).await);
        assert_eq!(c.len(), 1, "{} saw {c:?}", t.name);
        assert_eq!(c[0].key, "notes.txt");
        let copy = c[0].copy.as_deref().unwrap();
        let kept = std::fs::read_to_string(t.scripts.join(copy)).unwrap();
        assert_eq!(kept, format!("by {}", c[0].losers[0]), "{c:?}");
        let on_disk = std::fs::read_to_string(t.scripts.join("notes.txt")).unwrap();
        assert_eq!(on_disk, format!("by {}", c[0].winner), "{c:?}");
    }
}
