//! The Lua-facing API: esc's globals, the `covey` table, `json`, `require`,
//! and the sandbox refusals.

use std::rc::Rc;

use mlua::{Function, Lua, LuaSerdeExt, MultiValue, Table, Value, Variadic};

use crate::Message;
use crate::SharedHandlers;
use crate::covey::script::events::{self, CallError};
use crate::covey::script::kv;
use crate::covey::script::log::{Level, log};
use crate::covey::script::types::LimitExceeded;
use crate::covey::script::{config, lua_source, node, timers};
use crate::pattern::Pattern;

const SANDBOX: &str = "not available in the Covey sandbox";

/// Calls `f(msg)` with the message as a Lua table carrying esc's
/// capitalised fields and lower-case aliases. The table is built by a Lua
/// table constructor: one call into Lua instead of a dozen protected
/// `set`s from Rust (measured: the dispatch cost halves).
const INVOKE: &str = r#"
return function(f, from, to, name, payload, id, ts)
  return f({
    From = from, from = from, To = to, to = to, Name = name, name = name,
    Payload = payload, payload = payload, Id = id, id = id,
    Timestamp = ts, timestamp = ts,
  })
end
"#;

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

/// The compiled `INVOKE` trampoline.
pub(crate) fn invoker(lua: &Lua) -> mlua::Result<Function> {
    lua.load(INVOKE).set_name("=covey").eval()
}

/// Call handler `f` with `msg` through the trampoline.
pub(crate) fn invoke(
    lua: &Lua,
    invoker: &Function,
    f: &Function,
    msg: &Message,
) -> mlua::Result<Value> {
    let payload = lua.create_string(&msg.payload)?;
    invoker.call((
        f,
        msg.from.as_str(),
        msg.to.as_str(),
        msg.name.as_str(),
        payload,
        msg.id as i64,
        msg.timestamp_ms as i64,
    ))
}

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

fn send_error(e: events::SendError) -> mlua::Error {
    mlua::Error::runtime(match e {
        events::SendError::UnknownNode(n) => format!("unknown node `{n}`"),
        events::SendError::PayloadTooLarge(n) => format!("payload over the {n}-byte limit"),
        events::SendError::NodeDown(n) => format!("node `{n}` is down"),
        events::SendError::ReservedName(n) => {
            format!("`{n}` is a system event name (`covey.*`): only the node emits those")
        }
    })
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

fn kv_error(e: kv::KvError) -> mlua::Error {
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
fn limit_error(e: LimitExceeded) -> mlua::Error {
    mlua::Error::runtime(format!("limit reached: {} {}", e.limit, e.what))
}

fn subscribe(
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
        (h.borrow_mut().events).push((from_pattern, name_pattern, Rc::new(f)));
    }
    Ok(())
}

fn start_timer(
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

    // --- esc compatibility ---
    g.set("log", level_fn(lua, Level::Info)?)?;
    g.set("print", level_fn(lua, Level::Info)?)?;
    g.set("self", lua.create_function(|_, ()| Ok(node::name()))?)?;
    for (global, command) in [("onEvent", false), ("on", false), ("onCommand", true)] {
        let h = h.clone();
        g.set(
            global,
            lua.create_function(move |_, (from, name, f): (String, String, Function)| {
                subscribe(&h, from, name, f, command)
            })?,
        )?;
    }
    g.set(
        "sendEvent",
        lua.create_function(|lua, (name, payload): (String, Value)| {
            events::emit(&name, &payload_bytes(lua, payload)?).map_err(send_error)
        })?,
    )?;
    for global in ["sendCommand", "send"] {
        g.set(
            global,
            lua.create_function(|lua, (to, name, payload): (String, String, Value)| {
                events::send_command(&to, &name, &payload_bytes(lua, payload)?).map_err(send_error)
            })?,
        )?;
    }
    g.set(
        "Get",
        lua.create_function(|lua, key: String| match kv::get(&key) {
            Some(v) => Ok(Value::String(lua.create_string(&v)?)),
            None => Ok(Value::Nil),
        })?,
    )?;
    g.set(
        "Set",
        lua.create_function(|lua, (key, value): (String, Value)| {
            kv::set(&key, &payload_bytes(lua, value)?).map_err(kv_error)
        })?,
    )?;
    {
        let h = h.clone();
        g.set(
            "tick",
            lua.create_function(move |_, (seconds, f): (f64, Function)| {
                let ms = (seconds * 1000.0).clamp(1.0, u32::MAX as f64) as u32;
                start_timer(&h, ms, f, true, true)
            })?,
        )?;
    }
    g.set(
        "config",
        lua.create_function(|_, key: String| Ok(config::get(&key)))?,
    )?;

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
    covey.set("emit", g.get::<Function>("sendEvent")?)?;
    covey.set("command", g.get::<Function>("sendCommand")?)?;
    covey.set("on", g.get::<Function>("on")?)?;
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

    // --- json, require, sandbox ---
    let json = lua.create_table()?;
    json.set(
        "encode",
        lua.create_function(|lua, v: Value| json_encode(lua, v))?,
    )?;
    json.set("decode", lua.create_function(json_decode)?)?;
    g.set("json", json)?;
    lua.load(SYSTEM_SUGAR).set_name("=covey").exec()?;
    g.set("require", require_fn(lua)?)?;
    sandbox(lua)
}

fn kv_table(lua: &Lua, handlers: &SharedHandlers) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("get", lua.globals().get::<Function>("Get")?)?;
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

/// `require(name)`: modules come from the scripts directory's `lib/`,
/// through the host; each is loaded once and cached like Lua's own.
fn require_fn(lua: &Lua) -> mlua::Result<Function> {
    let loaded = lua.create_table()?;
    for lib in ["string", "table", "math", "utf8", "coroutine", "os", "json"] {
        if let Ok(v) = lua.globals().get::<Value>(lib) {
            loaded.set(lib, v)?;
        }
    }
    lua.create_function(move |lua, name: String| {
        if let Some(v) = loaded.get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        let Some(text) = lua_source::module(&name) else {
            return Err(mlua::Error::runtime(format!(
                "module '{name}' not found (looked for lib/{}.lua in the scripts directory)",
                name.replace('.', "/")
            )));
        };
        let chunk = lua
            .load(text)
            .set_name(format!("@lib/{}.lua", name.replace('.', "/")));
        let value: Value = chunk.call(name.as_str())?;
        let value = if value.is_nil() {
            Value::Boolean(true)
        } else {
            value
        };
        loaded.set(name.as_str(), value.clone())?;
        Ok(value)
    })
}

/// Everything that would reach outside the sandbox raises a clear error.
fn sandbox(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    let refuse = |what: String| {
        lua.create_function(move |_, _: MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::runtime(format!("{what}: {SANDBOX}")))
        })
    };
    let os: Table = g.get("os")?;
    // WASI has no process CPU clock (C's clock() is unsupported there):
    // os.clock() is monotonic time since the instance started, which is
    // what scripts use it for (timing their own work).
    let started = std::time::Instant::now();
    os.set(
        "clock",
        lua.create_function(move |_, ()| Ok(started.elapsed().as_secs_f64()))?,
    )?;
    for f in [
        "execute",
        "exit",
        "getenv",
        "remove",
        "rename",
        "tmpname",
        "setlocale",
    ] {
        os.set(f, refuse(format!("os.{f}"))?)?;
    }
    let io = lua.create_table()?;
    for f in [
        "open", "popen", "read", "lines", "input", "output", "tmpfile", "close",
    ] {
        io.set(f, refuse(format!("io.{f}"))?)?;
    }
    io.set("write", level_fn(lua, Level::Info)?)?;
    g.set("io", io)?;
    let package = lua.create_table()?;
    package.set("loadlib", refuse("package.loadlib".into())?)?;
    g.set("package", package)?;
    for f in ["dofile", "loadfile"] {
        g.set(f, refuse(f.to_string())?)?;
    }
    Ok(())
}
