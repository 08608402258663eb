//! The Lua-facing API: the `covey` table and `json`, with esc's globals
//! (`esc.rs`), esc's `http` module (`http.rs`) and the standard library
//! completed and fenced (`stdlib.rs`) installed beside them.
use mlua::{Function, IntoLuaMulti, Lua, LuaSerdeExt, MultiValue, Table, Value, Variadic};

use crate::SharedHandlers;
use crate::covey::script::events::{self, CallError};
use crate::covey::script::kv;
use crate::covey::script::log::{Level, log};
use crate::covey::script::types::LimitExceeded;
use crate::covey::script::{node, timers};
use crate::pattern::Pattern;

/// `covey.on_node_down(fn)` and friends: a handler for one system event
/// that gets its payload decoded (`fn(info, event)`), over plain `on`.
const SYSTEM_SUGAR: &str = r#"
for key, name in pairs({
  node_up = "covey.node.up", node_down = "covey.node.down",
  script_started = "covey.script.started", script_stopped = "covey.script.stopped",
  script_failed = "covey.script.failed",
  device_attached = "covey.device.attached", device_detached = "covey.device.detached",
  kv_conflict = "covey.kv.conflict", scripts_conflict = "covey.scripts.conflict",
}) do
  covey["on_" .. key] = function(f)
    return covey.on("*", name, function(ev) return f(json.decode(ev.payload), ev) end)
  end
end
"#;

/// A Lua value as payload bytes: strings as they are, nil as empty,
/// numbers and booleans as text, tables as JSON.
pub(crate) fn payload_bytes(lua: &Lua, v: Value) -> mlua::Result<Vec<u8>> {
    Ok(match v {
        Value::Nil => Vec::new(),
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Table(_) => json_encode(lua, v)?.into_bytes(),
        other => other.to_string()?.into_bytes(),
    })
}

fn json_encode(lua: &Lua, v: Value) -> mlua::Result<String> {
    let value: serde_json::Value = lua
        .from_value(v)
        .map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
    Ok(value.to_string())
}

fn json_decode(lua: &Lua, text: mlua::LuaString) -> mlua::Result<Value> {
    let value: serde_json::Value = serde_json::from_slice(&text.as_bytes())
        .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))?;
    lua.to_value(&value)
}

/// `true`, or `nil, why` (the `covey.*` forms).
fn sent_or_error(lua: &Lua, sent: Result<(), events::SendError>) -> mlua::Result<MultiValue> {
    match sent {
        Ok(()) => true.into_lua_multi(lua),
        Err(e) => (Value::Nil, send_error_text(e)).into_lua_multi(lua),
    }
}

pub(crate) fn send_error_text(e: events::SendError) -> String {
    match e {
        events::SendError::UnknownNode(n) => format!("unknown node `{n}`"),
        events::SendError::PayloadTooLarge(n) => format!("payload over the {n}-byte limit"),
        events::SendError::NodeDown(n) => format!("node `{n}` is down"),
        events::SendError::ReservedName(n) => crate::refusal::reserved_refusal(&n),
    }
}

fn call_error_text(e: CallError) -> String {
    match e {
        CallError::NoHandler(s) => format!("no handler: {s}"),
        CallError::Timeout => "timeout".into(),
        CallError::UnknownNode(n) => format!("unknown node `{n}`"),
        CallError::NodeDown(n) => format!("node `{n}` is down"),
        CallError::HandlerFailed(s) => format!("handler failed: {s}"),
        CallError::NoReply => "no reply".into(),
        CallError::PayloadTooLarge(n) => format!("payload over the {n}-byte limit"),
        CallError::InvalidTarget(s) => format!("invalid target: {s}"),
    }
}

pub(crate) fn kv_error(e: kv::KvError) -> mlua::Error {
    mlua::Error::runtime(match e {
        kv::KvError::InvalidKey(s) => format!("invalid key: {s}"),
        kv::KvError::ValueTooLarge(n) => format!("value over the {n}-byte limit"),
        kv::KvError::NotACounter(k) => format!("`{k}` is not a counter"),
        kv::KvError::Storage(s) => format!("storage error: {s}"),
        kv::KvError::QuotaExceeded(s) => format!("quota exceeded: {s}"),
    })
}

fn text_of(args: &Variadic<Value>) -> mlua::Result<String> {
    let parts: mlua::Result<Vec<String>> = args.iter().map(|v| v.to_string()).collect();
    Ok(parts?.join("\t"))
}

fn level_fn(lua: &Lua, level: Level) -> mlua::Result<Function> {
    lua.create_function(move |_, args: Variadic<Value>| {
        log(level, &text_of(&args)?);
        Ok(())
    })
}

/// A host limit as a Lua error ("limit reached: 10000 timers").
pub(crate) fn limit_error(e: LimitExceeded) -> mlua::Error {
    mlua::Error::runtime(format!("limit reached: {} {}", e.limit, e.what))
}

pub(crate) fn subscribe(
    h: &SharedHandlers,
    from: String,
    name: String,
    f: Function,
    command: bool,
) -> mlua::Result<()> {
    let (from_pattern, name_pattern) = (Pattern::new(&from), Pattern::new(&name));
    if command {
        events::handle(&from, &name).map_err(limit_error)?;
        (h.borrow_mut().commands).push((from_pattern, name_pattern, f));
    } else {
        events::subscribe(&from, &name).map_err(limit_error)?;
        h.borrow_mut()
            .subscribe_event(from_pattern, name_pattern, f)?;
    }
    Ok(())
}

pub(crate) fn start_timer(
    h: &SharedHandlers,
    ms: u32,
    f: Function,
    repeating: bool,
    esc_tick: bool,
) -> mlua::Result<u64> {
    let id = if repeating {
        timers::every(ms)
    } else {
        timers::after(ms)
    }
    .map_err(limit_error)?;
    h.borrow_mut().timers.insert(id, (f, esc_tick));
    Ok(id)
}

/// Install every global the script sees.
pub(crate) fn install(lua: &Lua, handlers: &SharedHandlers) -> mlua::Result<()> {
    let g = lua.globals();
    let h = handlers.clone();

    crate::esc::install(lua, handlers)?;

    // --- the covey table ---
    let covey = lua.create_table()?;
    covey.set("node", lua.create_function(|_, ()| Ok(node::name()))?)?;
    covey.set(
        "nodes",
        lua.create_function(|_, ()| {
            Ok(node::nodes()
                .into_iter()
                .map(|n| n.name)
                .collect::<Vec<_>>())
        })?,
    )?;
    covey.set(
        "emit",
        lua.create_function(|lua, (name, payload): (String, Value)| {
            let sent = events::emit(&name, &payload_bytes(lua, payload)?);
            sent_or_error(lua, sent)
        })?,
    )?;
    covey.set(
        "command",
        lua.create_function(|lua, (to, name, payload): (String, String, Value)| {
            let sent = events::send_command(&to, &name, &payload_bytes(lua, payload)?);
            sent_or_error(lua, sent)
        })?,
    )?;
    // Events only (esc's later global `on` also hears commands).
    covey.set("on", g.get::<Function>("onEvent")?)?;
    covey.set("handle", g.get::<Function>("onCommand")?)?;
    covey.set(
        "call",
        lua.create_function(
            |lua, (target, name, payload, timeout): (String, String, Value, Option<u32>)| {
                let bytes = payload_bytes(lua, payload)?;
                match events::call(&target, &name, &bytes, timeout.unwrap_or(1000)) {
                    Ok(reply) => Ok((Value::String(lua.create_string(&reply)?), Value::Nil)),
                    Err(e) => Ok((
                        Value::Nil,
                        Value::String(lua.create_string(call_error_text(e))?),
                    )),
                }
            },
        )?,
    )?;
    for (key, repeating) in [("after", false), ("every", true)] {
        let h = h.clone();
        covey.set(
            key,
            lua.create_function(move |_, (ms, f): (u32, Function)| {
                start_timer(&h, ms, f, repeating, false)
            })?,
        )?;
    }
    {
        let h = h.clone();
        covey.set(
            "cancel",
            lua.create_function(move |_, id: u64| {
                h.borrow_mut().timers.remove(&id);
                Ok(timers::cancel(id))
            })?,
        )?;
    }
    let logt = lua.create_table()?;
    for (key, level) in [
        ("trace", Level::Trace),
        ("debug", Level::Debug),
        ("info", Level::Info),
        ("warn", Level::Warn),
        ("error", Level::Error),
    ] {
        logt.set(key, level_fn(lua, level)?)?;
    }
    covey.set("log", logt)?;
    covey.set("kv", kv_table(lua, handlers)?)?;
    g.set("covey", covey)?;

    // --- json; then the standard library completed and fenced ---
    let json = lua.create_table()?;
    json.set(
        "encode",
        lua.create_function(|lua, v: Value| json_encode(lua, v))?,
    )?;
    json.set("decode", lua.create_function(json_decode)?)?;
    g.set("json", json)?;
    lua.load(SYSTEM_SUGAR).set_name("=covey").exec()?;
    crate::stdlib::install(lua)
}

fn kv_table(lua: &Lua, handlers: &SharedHandlers) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set(
        "get",
        lua.create_function(|lua, key: String| match kv::get(&key) {
            Some(v) => Ok(Value::String(lua.create_string(&v)?)),
            None => Ok(Value::Nil),
        })?,
    )?;
    t.set("set", lua.globals().get::<Function>("Set")?)?;
    t.set(
        "delete",
        lua.create_function(|_, key: String| kv::delete(&key).map_err(kv_error))?,
    )?;
    t.set(
        "keys",
        lua.create_function(|_, prefix: Option<String>| Ok(kv::keys(&prefix.unwrap_or_default())))?,
    )?;
    t.set(
        "incr",
        lua.create_function(|_, (key, delta): (String, Option<i64>)| {
            kv::incr(&key, delta.unwrap_or(1)).map_err(kv_error)
        })?,
    )?;
    let h = handlers.clone();
    t.set(
        "watch",
        lua.create_function(move |_, (prefix, f): (String, Function)| {
            let id = kv::watch(&prefix).map_err(limit_error)?;
            h.borrow_mut().watches.insert(id, (prefix, f));
            Ok(id)
        })?,
    )?;
    Ok(t)
}
