//! Per-script bounds: subscriptions, watches and timers are capped (the
//! call returns an error, it does not pretend with an id of 0), each
//! script's share of the key-value store is capped, and a script printing
//! in a loop is rate-limited. The script that hits a limit keeps running.

use std::time::Duration;

use crate::common::start_with;
use crate::lua::load;

/// Registers its handler first, then asks for 10,000 more of `what` in a
/// loop: the last must fail with a clear error, the rest succeed.
const CAPS: &str = r#"
local results = {}
covey.handle("*", "caps", function() return table.concat(results, "\n") end)
local function try(what, make)
  local made = 0
  local ok, err = pcall(function()
    for i = 1, 10001 do make(i); made = made + 1 end
  end)
  local msg = tostring(err)
  results[#results + 1] = what .. "|" .. made .. "|" .. (msg:match("limit reached: [^\n]*") or msg)
end
-- Handlers and subscriptions share one cap; the handler above is one.
try("subscriptions", function(i) covey.on("*", "s" .. i, function() end) end)
-- At the cap, subscribing again to what it holds is not a new one.
results[#results + 1] = "repeat|" .. tostring(pcall(covey.on, "*", "s1", function() end))
try("timers", function(i) covey.after(3600000, function() end) end)
try("watches", function(i) covey.kv.watch("w" .. i, function() end) end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_timers_and_watches_are_capped_with_an_error() {
    // Ten thousand subscriptions take longer than the default budget in a
    // debug build.
    let t = start_with(&[], |c| c.limits.cpu_budget = Duration::from_secs(120)).await;
    load(&t, "caps.lua", CAPS).await;
    let reply = t.call("caps", "").await.unwrap();
    let lines: Vec<&str> = reply.lines().collect();
    assert_eq!(
        lines,
        [
            "subscriptions|9999|limit reached: 10000 subscriptions",
            "repeat|true",
            "timers|10000|limit reached: 10000 timers",
            "watches|10000|limit reached: 10000 watches",
        ],
        "{reply}"
    );
    // Still alive and answering.
    assert_eq!(t.call("caps", "").await.unwrap(), reply);
}

const QUOTA: &str = r#"
covey.handle("*", "set", function(msg)
  local key, size = msg.payload:match("([^ ]+) (%d+)")
  local ok, err = pcall(covey.kv.set, key, string.rep("x", tonumber(size)))
  return ok and "ok" or tostring(err)
end)
covey.handle("*", "incr", function(msg)
  local ok, err = pcall(covey.kv.incr, msg.payload, 1)
  return ok and "ok" or tostring(err)
end)
covey.handle("*", "del", function(msg)
  covey.kv.delete(msg.payload)
  return "ok"
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_cannot_hold_more_than_its_share_of_the_store() {
    let t = start_with(&[], |c| {
        c.kv.quota_keys = 3;
        c.kv.quota_bytes = 100;
    })
    .await;
    load(&t, "quota.lua", QUOTA).await;
    assert_eq!(t.call("set", "a 10").await.unwrap(), "ok");
    assert_eq!(t.call("set", "b 10").await.unwrap(), "ok");
    assert_eq!(t.call("incr", "c").await.unwrap(), "ok");
    // A fourth key: refused, nothing written.
    let err = t.call("set", "d 1").await.unwrap();
    assert!(
        err.contains("quota exceeded") && err.contains("3 keys"),
        "{err}"
    );
    assert_eq!(t.kv_string("d"), None);
    let err = t.call("incr", "e").await.unwrap();
    assert!(err.contains("quota exceeded"), "{err}");
    // Rewriting a key it holds is fine, within the byte quota.
    assert_eq!(t.call("set", "a 50").await.unwrap(), "ok");
    let err = t.call("set", "a 90").await.unwrap();
    assert!(
        err.contains("quota exceeded") && err.contains("bytes"),
        "{err}"
    );
    assert_eq!(t.kv_string("a").unwrap().len(), 50);
    // Deleting makes room.
    assert_eq!(t.call("del", "b").await.unwrap(), "ok");
    assert_eq!(t.call("set", "d 1").await.unwrap(), "ok");
    // Writes not made by a script (CLI, HTTP, peers) are not charged.
    t.node().kv().set("operator", &[0; 500]).unwrap();
    assert_eq!(
        t.node().kv().usage("quota.lua"),
        (3, (1 + 50) + (1 + 8) + (1 + 1))
    );
}

const FLOOD: &str = r#"
covey.handle("*", "flood", function()
  for i = 1, 2000 do print("line " .. i) end
  return "done"
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_printing_in_a_loop_is_rate_limited() {
    let t = start_with(&[], |_| {}).await;
    load(&t, "flood.lua", FLOOD).await;
    assert_eq!(t.call("flood", "").await.unwrap(), "done");
    let dropped = || async {
        let list = t.node().supervisor().list().await;
        list.iter()
            .find(|s| &*s.script == "flood.lua")
            .unwrap()
            .log_dropped
    };
    // 100 lines/s with bursts of 200: most of the 2000 are dropped.
    let n = dropped().await;
    assert!((1..2000).contains(&n), "{n} dropped");
    // Still running; the next flood is cut too.
    assert_eq!(t.call("flood", "").await.unwrap(), "done");
    assert!(dropped().await > n);
}
