//! Covey's Lua guest: real Lua 5.4 (PUC-Rio, compiled by build.rs as one unit) running one
//! `.lua` script per instance. The host hands the script's text over the
//! `lua-source` import; everything else is the ordinary `script` world.
//!
//! One Lua state lives for the instance's lifetime, so globals set in one
//! callback are visible in the next. Handlers registered from Lua are kept
//! in Rust-side tables and dispatched on the matching export.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value};

// The generated import of `http.request` takes its record's ten fields.
#[allow(clippy::too_many_arguments)]
mod generated {
    wit_bindgen::generate!({
        path: "../wit",
        world: "lua-script",
    });
}
pub use generated::*;

#[path = "../../guest-sdk/src/batch.rs"]
mod batch;
#[path = "../../host/src/pattern.rs"]
mod pattern;
#[path = "../../lifecycle/src/refusal.rs"]
mod refusal;

mod api;
mod dispatch;
mod esc;
mod http;
mod stdlib;

use covey::script::log::{Level, log};
use covey::script::types::EventHead as Head;

use pattern::Pattern;

/// Lua's own allocation cap, below the host's memory cap: a memory bomb in
/// Lua raises a catchable "not enough memory" error instead of trapping.
const LUA_MEMORY_LIMIT: usize = 40 << 20;

/// Handlers registered by the script.
pub(crate) struct Handlers {
    /// Event subscriptions in registration order; the handler of entry
    /// `i` is `event_fns[i + 1]`, kept in a Lua table so that dispatch
    /// reaches it without mlua (`dispatch.rs`).
    events: Vec<(Pattern, Pattern)>,
    event_fns: Table,
    commands: Vec<(Pattern, Pattern, Function)>,
    /// Timer callbacks; `true` marks esc's `tick`, which repeats only while
    /// the callback returns true (covey's `every` repeats until it returns
    /// false).
    timers: HashMap<u64, (Function, bool)>,
    watches: HashMap<u64, (String, Function)>,
}

impl Handlers {
    fn new(lua: &Lua) -> mlua::Result<Handlers> {
        Ok(Handlers {
            events: Vec::new(),
            event_fns: lua.create_table()?,
            commands: Vec::new(),
            timers: HashMap::new(),
            watches: HashMap::new(),
        })
    }

    /// Append an event subscription.
    fn subscribe_event(&mut self, from: Pattern, name: Pattern, f: Function) -> mlua::Result<()> {
        self.event_fns.raw_set(self.events.len() + 1, f)?;
        self.events.push((from, name));
        Ok(())
    }
}

pub(crate) type SharedHandlers = Rc<RefCell<Handlers>>;

struct Runtime {
    lua: Lua,
    dispatch: dispatch::Dispatch,
    handlers: SharedHandlers,
    name: String,
}

thread_local! {
    static RUNTIME: RefCell<Option<Rc<Runtime>>> = const { RefCell::new(None) };
}

fn runtime() -> Option<Rc<Runtime>> {
    RUNTIME.with(|r| r.borrow().clone())
}

struct LuaGuest;

impl Guest for LuaGuest {
    fn init() -> Result<(), String> {
        let (name, text) = covey::script::lua_source::script();
        // Every library but `io` (replaced by `stdlib::sandbox`): the
        // sandbox boundary is the wasm instance, not Lua, so `debug`,
        // `package` and binary chunks (which mlua calls unsafe: they can
        // corrupt the Lua state) can at worst break this one script.
        let libs = StdLib::ALL ^ StdLib::IO;
        // SAFETY: see above; nothing outside this instance's memory is
        // reachable from Lua.
        let lua = unsafe { Lua::unsafe_new_with(libs, LuaOptions::default()) };
        let handlers = Handlers::new(&lua).map_err(|e| format!("setting up the Lua API: {e}"))?;
        let handlers = SharedHandlers::new(RefCell::new(handlers));
        api::install(&lua, &handlers).map_err(|e| format!("setting up the Lua API: {e}"))?;
        lua.set_memory_limit(LUA_MEMORY_LIMIT)
            .map_err(|e| e.to_string())?;
        // `covey exec FILE ARGS...`: Lua's `arg` table and the chunk's `...`.
        let args = covey::script::lua_source::args();
        let arg = lua.create_table().map_err(|e| e.to_string())?;
        arg.set(0, name.as_str()).map_err(|e| e.to_string())?;
        for (i, a) in args.iter().enumerate() {
            arg.set(i + 1, a.as_str()).map_err(|e| e.to_string())?;
        }
        lua.globals().set("arg", arg).map_err(|e| e.to_string())?;
        // Syntax errors surface here with file and line.
        let chunk = lua.load(text).set_name(format!("@{name}"));
        let dispatch = dispatch::Dispatch::new(&lua).map_err(|e| e.to_string())?;
        let rt = Rc::new(Runtime {
            lua,
            dispatch,
            handlers,
            name,
        });
        RUNTIME.with(|r| *r.borrow_mut() = Some(rt.clone()));
        chunk
            .call::<()>(mlua::Variadic::from_iter(args))
            .map_err(|e| e.to_string())
    }

    fn on_event(msg: Message) {
        let Some(rt) = runtime() else { return };
        let msgs = [dispatch::Event::from(&msg)];
        (rt.dispatch).events(&rt.lua, &rt.handlers, &rt.name, &msgs);
    }

    fn on_events(heads: Vec<Head>, bytes: Vec<u8>) {
        let Some(rt) = runtime() else { return };
        let msgs = dispatch::batch_of(&rt.name, &heads, &bytes);
        (rt.dispatch).events(&rt.lua, &rt.handlers, &rt.name, &msgs);
    }

    fn on_command(msg: Message) -> Option<Vec<u8>> {
        let rt = runtime()?;
        let handler = rt
            .handlers
            .borrow()
            .commands
            .iter()
            .find(|(from, name, _)| from.matches(&msg.from) && name.matches(&msg.name))
            .map(|(_, _, f)| f.clone())?;
        let result = rt.dispatch.one(&handler, &msg);
        match result {
            Ok(Value::Nil) => None,
            Ok(v) => api::payload_bytes(&rt.lua, v).ok(),
            Err(e) => {
                report::<()>(&rt, "command handler", Err(e));
                None
            }
        }
    }

    fn on_timer(id: u64) -> bool {
        let Some(rt) = runtime() else { return false };
        let Some((f, esc_tick)) = rt.handlers.borrow().timers.get(&id).cloned() else {
            return false;
        };
        let keep = match f.call::<Value>(()) {
            Ok(v) if esc_tick => matches!(v, Value::Boolean(true)),
            Ok(v) => !matches!(v, Value::Boolean(false)),
            Err(e) => {
                report::<()>(&rt, "timer", Err(e));
                false
            }
        };
        if !keep {
            rt.handlers.borrow_mut().timers.remove(&id);
        }
        keep
    }

    fn on_kv_change(key: String, value: Option<Vec<u8>>) {
        let Some(rt) = runtime() else { return };
        let matching: Vec<Function> = rt
            .handlers
            .borrow()
            .watches
            .values()
            .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
            .map(|(_, f)| f.clone())
            .collect();
        for f in matching {
            let value = match &value {
                Some(v) => rt.lua.create_string(v).map(Value::String),
                None => Ok(Value::Nil),
            };
            report(
                &rt,
                "watch handler",
                value.and_then(|v| f.call::<Value>((key.as_str(), v))),
            );
        }
    }
}

/// Log a failed callback (with Lua's traceback); the script keeps running.
fn report<T>(rt: &Runtime, what: &str, result: mlua::Result<T>) {
    if let Err(e) = result {
        log(Level::Error, &format!("{}: {what} failed: {e}", rt.name));
    }
}

export!(LuaGuest);
