//! Handing messages to Lua handlers: the guest's hot path.
//!
//! Why raw: the profile of the Lua event path (docs/benchmarks.md, "Events
//! in batches") put a quarter of the guest's time in mlua's per-call
//! machinery (an error-traceback closure, seven converted arguments, stack
//! bookkeeping) and another sixth in building a twelve-field message
//! table. Here a batch of events enters Lua once, protected
//! (`Lua::exec_raw`), and each (message, handler) pair is one `lua_pcall`
//! of `call_handler`, which builds the message table straight from the
//! message (borrowed from the batch) and calls the handler.
//!
//! The message table has six lower-case fields (`from`, `to`, `name`,
//! `payload`, `id`, `timestamp`); esc's capitalised names (`msg.From`,
//! `msg.Payload`, ...) are read through an `__index` alias metatable, so
//! `pairs(msg)` and `json.encode(msg)` see the six.

use std::cell::Cell;
use std::ffi::{CStr, c_int};
use std::marker::PhantomData;

use mlua::{Function, Lua, Table, Value, ffi};

use crate::Message;
use crate::SharedHandlers;
use crate::batch;
use crate::covey::script::log::{Level, log};
use crate::covey::script::types::EventHead;

/// The alias metatable and the traceback message handler, built in Lua.
/// The library functions they use are captured at init, so a script that
/// rebinds `rawget` or `debug` changes nothing here.
const LUA_SIDE: &str = r#"
local rawget, tostring, traceback = rawget, tostring, debug.traceback
local alias = {
  From = "from", To = "to", Name = "name", Payload = "payload",
  Id = "id", Timestamp = "timestamp",
}
local meta = {
  __index = function(t, k)
    local l = alias[k]
    if l then return rawget(t, l) end
  end,
}
-- The error with a traceback (once: errors raised by host calls carry
-- mlua's already), less the frames of the dispatch machinery below the
-- handler.
local function msgh(e)
  local s = tostring(e)
  if not s:find("\nstack traceback:", 1, true) then s = traceback(s, 2) end
  repeat
    local before = s
    s = s:gsub("\n\t%[C%]: in %?$", "")
  until s == before
  return s
end
return meta, msgh
"#;

/// A message as handlers get it: the shared borrowed event, from a lifted
/// `Message` (one event, a command) or from an `on-events` batch.
pub(crate) use batch::Event;

batch::impl_for_bindings!(batch, EventHead, Message);

/// The events of a batch; a malformed batch (the host never sends one) is
/// logged and cut at the first bad event.
pub(crate) fn batch_of<'a>(script: &str, heads: &[EventHead], bytes: &'a [u8]) -> Vec<Event<'a>> {
    let (msgs, read) = batch::collect(heads, bytes);
    if let Err(e) = read {
        log(Level::Error, &format!("{script}: on-events: {e}"));
    }
    msgs
}

thread_local! {
    /// The message `call_handler` builds its table from. Set only around
    /// a call; a script that reaches `call_handler` some other way (the
    /// `debug` library can) gets an error, never a stale pointer.
    static CURRENT: Cell<*const Event<'static>> = const { Cell::new(std::ptr::null()) };
}

/// Sets `CURRENT` for the guard's lifetime and restores the previous value.
/// The guard borrows the message for its lifetime, so the borrow checker
/// keeps the message alive while `CURRENT` points at it.
struct Current<'a>(*const Event<'static>, PhantomData<&'a Event<'a>>);

impl<'a> Current<'a> {
    fn set(msg: &'a Event<'_>) -> Current<'a> {
        let msg: *const Event<'_> = msg;
        Current(CURRENT.replace(msg.cast()), PhantomData)
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        CURRENT.set(self.0);
    }
}

/// What dispatch needs besides the handlers, made once per instance.
pub(crate) struct Dispatch {
    /// `call_handler` as a Lua function.
    call: Function,
    /// The alias metatable every message table gets.
    meta: Table,
    /// `lua_pcall`'s message handler: the error with a traceback.
    msgh: Function,
}

impl Dispatch {
    pub(crate) fn new(lua: &Lua) -> mlua::Result<Dispatch> {
        let (meta, msgh) = lua.load(LUA_SIDE).set_name("=covey").eval()?;
        // SAFETY: `call_handler` follows the Lua C API protocol: it reads
        // its arguments by index and returns one value.
        let call = unsafe { lua.create_c_function(call_handler)? };
        Ok(Dispatch { call, meta, msgh })
    }

    /// Run every event handler that selects each message, message by
    /// message, in the order the handlers were registered: those
    /// registered before the message, not those its handlers add
    /// (handlers are only ever appended). A failing handler is logged and
    /// the rest still run.
    pub(crate) fn events(
        &self,
        lua: &Lua,
        handlers: &SharedHandlers,
        script: &str,
        msgs: &[Event<'_>],
    ) {
        let fns = handlers.borrow().event_fns.clone();
        let args = (&self.call, &fns, &self.meta, &self.msgh);
        // SAFETY: `deliver` holds no value with a destructor across a Lua
        // call that can raise (see there), and uses stack slots 1-4 as
        // `args` pushed them.
        let entered =
            unsafe { lua.exec_raw::<()>(args, |state| deliver(state, handlers, script, msgs)) };
        if let Err(e) = entered {
            log(
                Level::Error,
                &format!("{script}: delivering events failed: {e}"),
            );
        }
    }

    /// Call one handler with `msg` and return its first result (commands).
    pub(crate) fn one(&self, f: &Function, msg: &Message) -> mlua::Result<Value> {
        let msg = Event::from(msg);
        let _current = Current::set(&msg);
        self.call.call((f, &self.meta))
    }
}

/// The body of `Dispatch::events`, inside mlua's protected call. Stack:
/// 1 `call_handler`, 2 the handler list, 3 the alias metatable, 4 the
/// message handler.
///
/// A Lua error raised here (outside the inner `lua_pcall`s) would unwind
/// past this frame without running destructors, so the only calls made
/// while a destructor-bearing value is alive (the `handlers` borrow, the
/// `Current` guard, the logged text) are ones that cannot raise:
/// `lua_pushvalue`, `lua_rawgeti`, `lua_pcall`, `lua_type`,
/// `lua_tolstring` of a string, `lua_settop`. The C function frame has
/// `LUA_MINSTACK` (20) slots, and at most three are pushed at once.
unsafe fn deliver(
    state: *mut ffi::lua_State,
    handlers: &SharedHandlers,
    script: &str,
    msgs: &[Event<'_>],
) {
    for msg in msgs {
        let _current = Current::set(msg);
        let count = handlers.borrow().events.len();
        for i in 0..count {
            let selected = {
                let h = handlers.borrow();
                let (from, name) = &h.events[i];
                from.matches(msg.from) && name.selects(msg.name)
            };
            if !selected {
                continue;
            }
            // SAFETY: indices 1-4 are as documented above; the handler
            // list holds entry i + 1 for every subscription i.
            unsafe {
                ffi::lua_pushvalue(state, 1);
                ffi::lua_rawgeti(state, 2, i as ffi::lua_Integer + 1);
                ffi::lua_pushvalue(state, 3);
                if ffi::lua_pcall(state, 2, 0, 4) != ffi::LUA_OK {
                    log(
                        Level::Error,
                        &format!("{script}: event handler failed: {}", error_text(state)),
                    );
                    ffi::lua_settop(state, 4);
                }
            }
        }
    }
}

/// The error object on top of the stack as text. The message handler
/// makes it a string; `LUA_ERRMEM` leaves Lua's preallocated message.
unsafe fn error_text(state: *mut ffi::lua_State) -> String {
    // SAFETY: a string's bytes stay valid while it is on the stack; a
    // non-string is not converted (that could allocate, and raise).
    unsafe {
        if ffi::lua_type(state, -1) != ffi::LUA_TSTRING {
            return "(error object is not a string)".into();
        }
        let mut len = 0;
        let p = ffi::lua_tolstring(state, -1, &mut len);
        String::from_utf8_lossy(std::slice::from_raw_parts(p.cast::<u8>(), len)).into_owned()
    }
}

/// `call_handler(f, meta)`: `f(msg)` for the `CURRENT` message, as a
/// six-field table with metatable `meta`; returns `f`'s first result.
/// Lua errors (including running out of memory while building the table)
/// propagate to the caller's protected call; nothing here has a
/// destructor.
unsafe extern "C-unwind" fn call_handler(state: *mut ffi::lua_State) -> c_int {
    let msg = CURRENT.get();
    // SAFETY: a non-null `CURRENT` points at the message a `Current`
    // guard up the stack borrows; the Lua calls follow the C API.
    unsafe {
        if msg.is_null() {
            return ffi::luaL_error(state, c"covey: no message is being delivered".as_ptr());
        }
        let msg = &*msg;
        ffi::lua_settop(state, 2);
        ffi::lua_pushvalue(state, 1);
        ffi::lua_createtable(state, 0, 6);
        set_bytes(state, c"from", msg.from.as_bytes());
        set_bytes(state, c"to", msg.to.as_bytes());
        set_bytes(state, c"name", msg.name.as_bytes());
        set_bytes(state, c"payload", msg.payload);
        ffi::lua_pushinteger(state, msg.id as ffi::lua_Integer);
        ffi::lua_setfield(state, -2, c"id".as_ptr());
        ffi::lua_pushinteger(state, msg.timestamp_ms as ffi::lua_Integer);
        ffi::lua_setfield(state, -2, c"timestamp".as_ptr());
        ffi::lua_pushvalue(state, 2);
        ffi::lua_setmetatable(state, -2);
        ffi::lua_call(state, 1, 1);
    }
    1
}

/// `t[key] = bytes` for the table on top of the stack.
unsafe fn set_bytes(state: *mut ffi::lua_State, key: &CStr, bytes: &[u8]) {
    // SAFETY: the caller has a table on top of the stack.
    unsafe {
        ffi::lua_pushlstring(state, bytes.as_ptr().cast(), bytes.len());
        ffi::lua_setfield(state, -2, key.as_ptr());
    }
}
