//! `.lua` scripts run by the built-in Lua guest (real Lua 5.4).

use std::time::Duration;

use covey::bindings::CallError;

use crate::common::{TestNode, eventually, start, start_with};

pub(crate) fn write(t: &TestNode, name: &str, text: &str) -> std::path::PathBuf {
    let path = t.scripts.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = t
        .scripts
        .join(format!(".{}.partial", name.replace('/', "_")));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

pub(crate) async fn load(t: &TestNode, name: &str, text: &str) {
    let path = write(t, name, text);
    t.node().supervisor().sync_path(&path).await.unwrap();
}

const ESC: &str = r#"
-- esc's API, unchanged
onEvent("*", "ping", function(msg)
  Set("lua/last", msg.From .. "|" .. msg.Payload .. "|" .. msg.name)
end)
onCommand("*", "lua.echo", function(msg) return "echo:" .. msg.payload end)
on("*", "count", function(msg) covey.kv.incr("lua/count") end)
local n = 0
tick(0.01, function()
  n = n + 1
  Set("lua/ticks", tostring(n))
  return n < 3
end)
Set("lua/self", self())
Set("lua/config", config("greeting") or "none")
calls = 0
onCommand("*", "lua.calls", function()
  calls = calls + 1
  return tostring(calls)
end)
onCommand("n1", "lua.send", function(msg)
  sendEvent("ping", "from-lua")
  send("*", "echo", "ignored reply")
  sendCommand("n1", "lua.echo", "x")
  return "sent"
end)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esc_scripts_run_unchanged() {
    let t = start_with(&[], |c| {
        c.extras.insert("greeting".into(), "hej".into());
    })
    .await;
    load(&t, "esc.lua", ESC).await;
    assert_eq!(t.kv_string("lua/self").unwrap(), "n1");
    assert_eq!(t.kv_string("lua/config").unwrap(), "hej");
    assert_eq!(t.call("lua.echo", "hi").await.unwrap(), "echo:hi");
    t.node().router().emit("ping", b"42".to_vec()).unwrap();
    eventually(5, "event handled", || async {
        t.kv_string("lua/last").as_deref() == Some("n1|42|ping")
    })
    .await;
    for _ in 0..3 {
        t.node().router().emit("count", vec![]).unwrap();
    }
    eventually(5, "counted", || async { t.kv_i64("lua/count") == 3 }).await;
    // Globals persist from one callback to the next.
    assert_eq!(t.call("lua.calls", "").await.unwrap(), "1");
    assert_eq!(t.call("lua.calls", "").await.unwrap(), "2");
    // tick repeats while its function returns true.
    eventually(5, "three ticks", || async { t.kv_i64("lua/ticks") == 3 }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.kv_i64("lua/ticks"), 3);
    assert_eq!(t.call("lua.send", "").await.unwrap(), "sent");
    eventually(5, "own event seen", || async {
        t.kv_string("lua/last").as_deref() == Some("n1|from-lua|ping")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covey_api_calls_kv_timers_json_and_require() {
    let t = start(&["echo"]).await;
    write(
        &t,
        "lib/util/strings.lua",
        "local M = {}\nfunction M.shout(s) return string.upper(s) .. '!' end\nreturn M\n",
    );
    let script = r#"
local strings = require("util.strings")
covey.handle("*", "lua.call", function(msg)
  local reply, err = covey.call("n1", msg.payload, "via lua", 1000)
  return reply or ("err:" .. err)
end)
covey.handle("*", "lua.kv", function()
  covey.kv.set("k/a", "1")
  covey.kv.set("k/b", { x = 1 })
  local n = covey.kv.incr("k/n", 5)
  local keys = table.concat(covey.kv.keys("k/"), ",")
  local existed = covey.kv.delete("k/a")
  return keys .. "|" .. n .. "|" .. tostring(existed) .. "|" .. tostring(covey.kv.get("k/a"))
    .. "|" .. covey.kv.get("k/b")
end)
covey.kv.watch("w/", function(key, value)
  covey.kv.set("seen/" .. key, value or "<deleted>")
end)
local fired = 0
covey.after(10, function() covey.kv.set("after", "fired") end)
local every = covey.every(10, function()
  fired = fired + 1
  covey.kv.set("every", tostring(fired))
  if fired == 2 then return false end
end)
covey.handle("*", "lua.json", function(msg)
  local ok, err = pcall(json.decode, "{not json")
  local t = json.decode(msg.payload)
  return json.encode({ sum = t.a + t.b, err = tostring(err):match("json.decode") ~= nil })
end)
covey.handle("*", "lua.require", function(msg)
  local ok, err = pcall(require, "missing.mod")
  return strings.shout(msg.payload) .. "|" .. tostring(err):match("module 'missing.mod' not found")
end)
covey.handle("*", "lua.misc", function()
  local id = covey.after(20, function() covey.kv.set("cancelled-fired", "yes") end)
  local cancelled = covey.cancel(id)
  covey.emit("misc.event", "e")
  covey.command("n1", "echo", "ignored")
  for _, level in ipairs({ "trace", "debug", "info", "warn", "error" }) do
    covey.log[level]("level " .. level)
  end
  return covey.node() .. "|" .. table.concat(covey.nodes(), ",") .. "|" .. tostring(cancelled)
end)
covey.on("*", "misc.event", function(msg) covey.kv.set("misc", msg.payload) end)
covey.log.info("covey api ready")
"#;
    load(&t, "api.lua", script).await;
    assert_eq!(t.call("lua.call", "echo.upper").await.unwrap(), "VIA LUA");
    let r = t.call("lua.call", "nobody.home").await.unwrap();
    assert!(r.starts_with("err:no handler"), "{r}");
    assert_eq!(
        t.call("lua.kv", "").await.unwrap(),
        r#"k/a,k/b,k/n|5|true|nil|{"x":1}"#
    );
    t.node().kv().set("w/x", b"7").unwrap();
    t.node().kv().delete("w/x").unwrap();
    eventually(5, "watch", || async {
        t.kv_string("seen/w/x").as_deref() == Some("<deleted>")
    })
    .await;
    eventually(5, "timers", || async {
        t.kv_string("after").as_deref() == Some("fired") && t.kv_i64("every") == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(
        t.kv_i64("every"),
        2,
        "every stops when its function returns false"
    );
    assert_eq!(
        t.call("lua.json", r#"{"a":2,"b":3}"#).await.unwrap(),
        r#"{"err":true,"sum":5}"#
    );
    assert_eq!(
        t.call("lua.require", "hi").await.unwrap(),
        "HI!|module 'missing.mod' not found"
    );
    assert_eq!(t.call("lua.misc", "").await.unwrap(), "n1|n1|true");
    eventually(5, "covey.emit reached covey.on", || async {
        t.kv_string("misc").as_deref() == Some("e")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        t.kv_string("cancelled-fired"),
        None,
        "a cancelled timer never fires"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_refuses_host_access_clearly() {
    let t = start(&[]).await;
    let script = r#"
covey.handle("*", "try", function(msg)
  local f = load("return " .. msg.payload)()
  local ok, err = pcall(f)
  return tostring(ok) .. "|" .. tostring(err)
end)
"#;
    load(&t, "sandbox.lua", script).await;
    for what in [
        "os.execute",
        "io.popen",
        "io.open",
        "package.loadlib",
        "dofile",
    ] {
        let r = t.call("try", what).await.unwrap();
        assert!(r.starts_with("false|"), "{what}: {r}");
        assert!(
            r.contains(&format!("{what}: not available in the Covey sandbox")),
            "{what}: {r}"
        );
    }
    // What is allowed works; the environment is empty, not refused.
    let r = t
        .call(
            "try",
            "function() return os.time() > 0 and os.date('%Y') ~= nil end",
        )
        .await;
    assert_eq!(r.unwrap(), "true|true");
    let r = t
        .call("try", "function() return os.getenv('HOME') end")
        .await;
    assert_eq!(r.unwrap(), "true|nil");
    let r = t.call("try", "function() return os.getenv() end").await;
    assert!(r.unwrap().starts_with("false|"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_lua_54_standard_library() {
    let t = start(&[]).await;
    let script = r#"
covey.handle("*", "std", function()
  local out = {}
  out[#out + 1] = string.format("%5.2f|%d|%s", math.pi, 7 // 2, math.type(3))
  out[#out + 1] = ("k=v; a=b"):gsub("(%w+)=(%w+)", "%2=%1")
  out[#out + 1] = utf8.char(72, 228) .. "|" .. utf8.len("hä")
  local co = coroutine.wrap(function() coroutine.yield(1); coroutine.yield(2) end)
  out[#out + 1] = co() + co()
  local t = { 5, 2, 9, 1 }
  table.sort(t)
  out[#out + 1] = table.concat(t, ",")
  do
    local closed = false
    do local x <close> = setmetatable({}, { __close = function() closed = true end }) end
    out[#out + 1] = tostring(closed)
  end
  out[#out + 1] = math.maxinteger
  return table.concat(out, " ")
end)
"#;
    load(&t, "std.lua", script).await;
    assert_eq!(
        t.call("std", "").await.unwrap(),
        " 3.14|3|integer v=k; b=a H\u{e4}|2 3 1,2,5,9 true 9223372036854775807"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syntax_and_runtime_errors_are_reported_and_survived() {
    let t = start(&[]).await;
    let bad = write(&t, "bad.lua", "log('hi')\nfunction (\n");
    let err = format!(
        "{:#}",
        t.node().supervisor().sync_path(&bad).await.unwrap_err()
    );
    assert!(err.contains("bad.lua:2"), "{err}");

    load(
        &t,
        "v.lua",
        "covey.handle('*', 'version', function() return 'one' end)\n\
        covey.handle('*', 'fail', function() error('deliberate') end)",
    )
    .await;
    // A runtime error in a callback: no reply, the script keeps working.
    assert_eq!(t.call("fail", "").await, Err(CallError::NoReply));
    assert_eq!(t.call("version", "").await.unwrap(), "one");
    // A reload with a syntax error keeps the old version.
    let path = write(
        &t,
        "v.lua",
        "covey.handle('*', 'version', function() return 'two' end",
    );
    let err = format!(
        "{:#}",
        t.node().supervisor().sync_path(&path).await.unwrap_err()
    );
    assert!(
        err.contains("v.lua:1") && err.contains("previous version keeps running"),
        "{err}"
    );
    assert_eq!(t.call("version", "").await.unwrap(), "one");
    // A good version is hot-reloaded by the watcher.
    write(
        &t,
        "v.lua",
        "covey.handle('*', 'version', function() return 'two' end)",
    );
    eventually(10, "reloaded", || async {
        t.call("version", "").await.as_deref() == Ok("two")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_in_pcall_and_runaway_loop() {
    // A budget that leaves the bomb time to hit Lua's memory limit even in a
    // loaded test run; the runaway loop still gets stopped by it.
    let t = start_with(&[], |c| c.limits.cpu_budget = Duration::from_secs(1)).await;
    let script = r#"
covey.handle("*", "bomb", function()
  local ok, err = pcall(function()
    local t = {}
    for i = 1, 1e9 do t[i] = string.rep("x", 1 << 20) .. i end
  end)
  collectgarbage()
  return tostring(ok) .. "|" .. tostring(err)
end)
covey.handle("*", "spin", function() while true do end end)
covey.handle("*", "alive", function() return "yes" end)
"#;
    load(&t, "heavy.lua", script).await;
    let r = t.call("bomb", "").await.unwrap();
    assert_eq!(r, "false|not enough memory");
    assert_eq!(t.call("alive", "").await.unwrap(), "yes");
    match t.call("spin", "").await {
        Err(CallError::HandlerFailed(msg)) => assert!(msg.contains("CPU budget"), "{msg}"),
        other => panic!("expected the runaway loop to be stopped, got {other:?}"),
    }
    eventually(10, "restarted", || async {
        t.call("alive", "").await.as_deref() == Ok("yes")
    })
    .await;
}

/// Lua's C code is compiled against preview-1 wasi-libc headers but linked
/// with Rust's wasip2 libc: a layout mismatch (struct tm, time_t, clock_t,
/// printf) would show up in exactly these functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libc_abi_between_lua_and_the_rust_link_matches() {
    let t = start(&[]).await;
    let script = r#"
covey.handle("*", "abi", function()
  local d = os.date("!*t", 951825600)
  local parts = {
    os.date("!%Y-%m-%d %H:%M:%S %j %a", 951825600),
    string.format("%d-%d-%d %d:%d yday=%d wday=%d", d.year, d.month, d.day, d.hour, d.min, d.yday, d.wday),
    os.time({ year = 2000, month = 2, day = 29, hour = 12 }) - os.time({ year = 2000, month = 2, day = 28, hour = 12 }),
    math.type(os.clock()),
    string.format("%.3f %g %e %x %5s|%-5s|", 1 / 3, 1e300, 12345.678, 255, "ab", "cd"),
    tostring(2^63),
    math.tointeger(2^53),
    string.format("%q", 1 / 0),
  }
  local now = os.time()
  parts[#parts + 1] = tostring(now > 1700000000 and os.date("!%Y", now) >= "2023")
  return table.concat(parts, " | ")
end)
"#;
    load(&t, "abi.lua", script).await;
    assert_eq!(
        t.call("abi", "").await.unwrap(),
        "2000-02-29 12:00:00 060 Tue | 2000-2-29 12:0 yday=60 wday=3 | 86400 | float \
         | 0.333 1e+300 1.234568e+04 ff    ab|cd   | | 9.2233720368548e+18 | 9007199254740992 \
         | 1e9999 | true"
    );
}

/// A runaway handler of an event delivered in a batch is stopped (the
/// batch runs under twice the budget), the script comes back, and the
/// events behind the batch reach the new instance.
#[tokio::test]
async fn a_runaway_event_inside_a_batch_is_stopped_and_the_script_comes_back() {
    let t = start_with(&[], |c| c.limits.cpu_budget = Duration::from_millis(200)).await;
    let script = r#"
seen = 0
covey.on("*", "tick", function(m)
  seen = seen + 1
  if m.payload == "spin" then while true do end end
end)
covey.handle("*", "seen", function() return tostring(seen) end)
"#;
    load(&t, "batched.lua", script).await;
    let router = t.node().router();
    // One thread: these all wait in the mailbox; by the 1,500th event the
    // script's events have shown they are quick and go in batches.
    for i in 0..3000 {
        let payload = if i == 1500 { "spin" } else { "x" };
        router.emit("tick", payload.as_bytes().to_vec()).unwrap();
    }
    eventually(30, "the script failed and came back", || async {
        let list = t.node().supervisor().list().await;
        let s = list.iter().find(|s| &*s.script == "batched.lua").unwrap();
        s.restarts >= 1 && s.state == "running"
    })
    .await;
    let list = t.node().supervisor().list().await;
    let s = list.iter().find(|s| &*s.script == "batched.lua").unwrap();
    let err = s.last_error.as_deref().unwrap();
    assert!(
        err.contains("on-events") && err.contains("CPU budget of 400ms"),
        "{err}"
    );
    // The new instance starts from zero and gets what was behind the batch
    // (up to 256 events went down with the failing one).
    eventually(30, "the events behind the batch arrived", || async {
        let seen: u32 = t.call("seen", "").await.unwrap().parse().unwrap();
        (3000 - 1500 - 256..3000 - 1500).contains(&seen)
    })
    .await;
}

/// How events reach Lua handlers (lua-guest/src/dispatch.rs): the message
/// table's shape and esc's capitalised aliases, every matching handler run
/// in order even when one fails (in Lua or in a host call), handlers added
/// during an event only seeing later events, and the error logged with
/// its traceback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_handlers_see_six_fields_and_fail_alone() {
    crate::http::covey_logging();
    let t = start(&[]).await;
    let script = r#"
covey.on("*", "shape", function(msg)
  local keys = {}
  for k in pairs(msg) do keys[#keys + 1] = k end
  table.sort(keys)
  covey.kv.set("shape/keys", table.concat(keys, ","))
  covey.kv.set("shape/alias", table.concat({ msg.From, msg.To, msg.Name, msg.Payload,
    tostring(msg.Id == msg.id), tostring(msg.Timestamp == msg.timestamp),
    tostring(msg.Other), tostring(msg.from == msg.From) }, "|"))
end)
local function deep() error("first fails") end
covey.on("*", "multi", function(msg) deep() end)
covey.on("*", "multi", function(msg)
  covey.kv.incr("multi/second")
  covey.on("*", "multi", function() covey.kv.incr("multi/late") end)
end)
covey.on("*", "multi", function(msg) covey.kv.incr("multi/third", "not a number") end)
covey.on("*", "multi", function(msg) covey.kv.incr("multi/fourth") end)
covey.on("*", "fence", function() covey.kv.incr("fence") end)
covey.handle("*", "shape.cmd", function(msg)
  msg.payload = "changed"
  return msg.Name .. ":" .. msg.Payload .. ":" .. tostring(msg.Id == msg.id)
end)
"#;
    load(&t, "shape.lua", script).await;
    t.node().router().emit("shape", b"p".to_vec()).unwrap();
    eventually(5, "shape seen", || async {
        t.kv_string("shape/alias").is_some()
    })
    .await;
    assert_eq!(
        t.kv_string("shape/keys").unwrap(),
        "from,id,name,payload,timestamp,to"
    );
    assert_eq!(
        t.kv_string("shape/alias").unwrap(),
        "n1|*|shape|p|true|true|nil|true"
    );
    // A command's message has the same shape; a handler may write to it.
    assert_eq!(
        t.call("shape.cmd", "x").await.unwrap(),
        "shape.cmd:changed:true"
    );

    // Events reach the script in order, so once the fence event has been
    // handled every handler of the event before it has run.
    t.node().router().emit("multi", vec![]).unwrap();
    t.node().router().emit("fence", vec![]).unwrap();
    eventually(5, "first multi", || async { t.kv_i64("fence") == 1 }).await;
    assert_eq!(t.kv_i64("multi/fourth"), 1);
    assert_eq!(t.kv_i64("multi/second"), 1);
    assert_eq!(t.kv_i64("multi/late"), 0, "added during the event");
    t.node().router().emit("multi", vec![]).unwrap();
    t.node().router().emit("fence", vec![]).unwrap();
    eventually(5, "second multi", || async { t.kv_i64("fence") == 2 }).await;
    assert_eq!(t.kv_i64("multi/fourth"), 2);
    assert_eq!(t.kv_i64("multi/second"), 2);
    assert_eq!(t.kv_i64("multi/late"), 1, "one added before, one during");

    let query = covey::logring::LogQuery {
        script: Some("shape.lua".into()),
        since_ms: None,
    };
    let lines = covey::logring::LOGS.recent(&query);
    let failed: Vec<&str> = (lines.iter())
        .map(|l| l.message.as_str())
        .filter(|m| m.contains("event handler failed"))
        .collect();
    assert_eq!(failed.len(), 4, "two handlers failed twice: {failed:#?}");
    for line in &failed {
        assert_eq!(line.matches("stack traceback:").count(), 1, "{line}");
        assert!(!line.ends_with("in ?"), "no dispatch frames: {line}");
    }
    assert!(
        failed[0].contains("first fails") && failed[0].contains("in upvalue 'deep'"),
        "the Lua error with its traceback: {}",
        failed[0]
    );
    assert!(
        failed[1].contains("error converting Lua string to i64")
            && failed[1].contains("in field 'incr'"),
        "the host call's error: {}",
        failed[1]
    );
}
