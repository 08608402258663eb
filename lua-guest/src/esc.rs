//! esc's globals, behaving as they do in esc (`log`, `self`, `on`,
//! `onEvent`, `onCommand`, the `send*` family, `Get`/`Set`, `tick`,
//! `config`, `fullName`/`shortName`): scripts written for esc run as
//! written.

use mlua::{Function, Lua, Value, Variadic};

use crate::SharedHandlers;
use crate::api::{kv_error, payload_bytes, send_error_text, start_timer, subscribe};
use crate::covey::script::events;
use crate::covey::script::kv;
use crate::covey::script::log::{Level, log};
use crate::covey::script::{config, node};

/// Install esc's globals.
pub(crate) fn install(lua: &Lua, handlers: &SharedHandlers) -> mlua::Result<()> {
    let g = lua.globals();
    let h = handlers.clone();
    g.set(
        "log",
        lua.create_function(|_, args: Variadic<Value>| esc_log(&args))?,
    )?;
    g.set("self", lua.create_function(|_, ()| Ok(node::name()))?)?;
    for (global, command) in [("onEvent", false), ("onCommand", true)] {
        let h = h.clone();
        g.set(
            global,
            lua.create_function(move |_, (from, name, f): (String, String, Function)| {
                subscribe(&h, from, name, f, command)
            })?,
        )?;
    }
    // esc's later API has one kind of message: `on(from, name, f)` hears
    // what `send` sends, to this node or to every node (`*`), and what
    // `sendEvent`/`sendCommand` send.
    {
        let h = h.clone();
        g.set(
            "on",
            lua.create_function(move |_, (from, name, f): (String, String, Function)| {
                subscribe(&h, from.clone(), name.clone(), f.clone(), false)?;
                subscribe(&h, from, name, f, true)
            })?,
        )?;
    }
    // esc's sends never raise: a send to an unknown or down node is
    // logged and dropped (so a script that sends at init, before the
    // cluster formed, still loads).
    g.set(
        "sendEvent",
        lua.create_function(|lua, (name, payload): (String, Value)| {
            esc_sent(
                "sendEvent",
                events::emit(&name, &payload_bytes(lua, payload)?),
            );
            Ok(())
        })?,
    )?;
    // `send(to, name, payload)`: to node `to`, or to every node (this one
    // included) when `to` is `*`.
    g.set(
        "send",
        lua.create_function(|lua, (to, name, payload): (String, String, Value)| {
            let payload = payload_bytes(lua, payload)?;
            let sent = match to.as_str() {
                "*" => events::emit(&name, &payload),
                _ => events::send_command(&to, &name, &payload),
            };
            esc_sent("send", sent);
            Ok(())
        })?,
    )?;
    for global in ["sendCommand", "sendC", "sendCommandC"] {
        // sendC's fourth argument (esc's `coalesce`) is accepted; Covey
        // delivers every command.
        g.set(
            global,
            lua.create_function(move |lua, (to, name, payload): (String, String, Value)| {
                let sent = events::send_command(&to, &name, &payload_bytes(lua, payload)?);
                esc_sent(global, sent);
                Ok(())
            })?,
        )?;
    }
    // Go's zero value for a missing key, as in esc.
    g.set(
        "Get",
        lua.create_function(|lua, key: String| {
            lua.create_string(kv::get(&key).unwrap_or_default())
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
        lua.create_function(|_, key: String| Ok(config::get(&key).unwrap_or_default()))?,
    )?;
    // esc named nodes by their mDNS service instance; Covey's names are
    // the plain node names, which `fullName` keeps and `shortName` recovers.
    g.set("fullName", lua.create_function(|_, name: String| Ok(name))?)?;
    g.set(
        "shortName",
        lua.create_function(|_, name: String| Ok(short_name(&name).to_string()))?,
    )?;

    Ok(())
}

/// esc's forms: a failed send is logged and dropped.
fn esc_sent(what: &str, sent: Result<(), events::SendError>) {
    if let Err(e) = sent {
        log(
            Level::Warn,
            &format!("{what}: dropped: {}", send_error_text(e)),
        );
    }
}

/// esc's `log(x)`: strings and numbers as text, anything else (nil
/// included) as an empty line, as gopher-lua's `ToString`; further
/// arguments (which esc ignored) are appended, tab-separated.
fn esc_log(args: &Variadic<Value>) -> mlua::Result<()> {
    let parts: mlua::Result<Vec<String>> = args
        .iter()
        .map(|v| match v {
            Value::String(_) | Value::Integer(_) | Value::Number(_) => v.to_string(),
            _ => Ok(String::new()),
        })
        .collect();
    log(Level::Info, &parts?.join("\t"));
    Ok(())
}

/// A node name without esc's mDNS suffix (`node._esc._tcp.local.`).
fn short_name(name: &str) -> &str {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.strip_suffix("._esc._tcp.local").unwrap_or(name)
}
