//! Write Covey scripts in Rust.
//!
//! A script is a type implementing [`Script`] plus one [`export_script!`]:
//!
//! ```ignore
//! use covey_guest::{Event, Script, events, log};
//!
//! struct Hello;
//!
//! impl Script for Hello {
//!     fn init() -> Result<Self, String> {
//!         events::subscribe("*", "greet")?;
//!         Ok(Hello)
//!     }
//!     fn on_event(&mut self, msg: Event<'_>) {
//!         log::info(&format!("{} says {}", msg.from, msg.text()));
//!     }
//! }
//!
//! covey_guest::export_script!(Hello);
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release` (or
//! `cargo component build --release`) and drop the `.wasm` into a node's
//! scripts directory.
//!
//! The host calls one callback at a time, so `&mut self` is all the
//! synchronisation a script needs. Events are handed over borrowed
//! ([`Event`]: `&str` and `&[u8]` into the batch the host delivered), so
//! receiving one allocates nothing; [`Event::to_message`] keeps a copy.
//! The modules below wrap the imported WIT interfaces with string and JSON
//! conveniences; the raw bindings are in [`bindings`].

use std::borrow::Cow;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "script",
        pub_export_macro: true,
        export_macro_name: "__export_script",
        default_bindings_module: "covey_guest::bindings",
    });
}

#[doc(hidden)]
pub mod batch;

pub use bindings::covey::script::kv::KvError;
pub use bindings::covey::script::node::NodeInfo;
use bindings::covey::script::types::EventHead;
pub use bindings::covey::script::types::{CallError, LimitExceeded, Message, SendError};

/// So `init` (which returns `Result<Self, String>`) can use `?` on
/// `subscribe`, `watch`, `every`….
impl From<LimitExceeded> for String {
    fn from(e: LimitExceeded) -> String {
        format!("limit of {} {} reached", e.limit, e.what)
    }
}

/// A Covey script. Only `init` is required; every callback has a default.
pub trait Script: Sized + 'static {
    /// Called once when the script starts: subscribe, start timers, read
    /// config. An `Err` aborts loading (a reload keeps the old version).
    fn init() -> Result<Self, String>;

    /// An event matching one of the subscriptions, borrowed for the call.
    fn on_event(&mut self, _msg: Event<'_>) {}

    /// Several events at once, oldest first (the host batches a backlog).
    /// The default hands each to [`Script::on_event`]; override it only to
    /// handle a batch as a whole (e.g. one KV write for many readings).
    fn on_events(&mut self, events: &[Event<'_>]) {
        for &msg in events {
            self.on_event(msg);
        }
    }

    /// A command or call matching one of the handlers. The returned bytes
    /// are the reply to a `call`; `None` means "no reply".
    fn on_command(&mut self, _msg: Message) -> Option<Vec<u8>> {
        None
    }

    /// A timer fired. For a repeating timer, return `false` to stop it.
    fn on_timer(&mut self, _id: u64) -> bool {
        true
    }

    /// A watched key changed (`None`: it was deleted).
    fn on_kv_change(&mut self, _key: String, _value: Option<Vec<u8>>) {}
}

/// Export a [`Script`] implementation as the component's entry points.
#[macro_export]
macro_rules! export_script {
    ($ty:ty) => {
        const _: () = {
            use ::std::cell::RefCell;
            use $crate::Script as _;

            ::std::thread_local! {
                static STATE: RefCell<Option<$ty>> = const { RefCell::new(None) };
            }

            fn with<R>(f: impl FnOnce(&mut $ty) -> R, default: R) -> R {
                STATE.with(|s| match s.borrow_mut().as_mut() {
                    Some(script) => f(script),
                    None => default,
                })
            }

            struct CoveyExport;

            impl $crate::bindings::Guest for CoveyExport {
                fn init() -> Result<(), String> {
                    let script = <$ty as $crate::Script>::init()?;
                    STATE.with(|s| *s.borrow_mut() = Some(script));
                    Ok(())
                }
                fn on_event(msg: $crate::Message) {
                    with(|s| s.on_event($crate::Event::from(&msg)), ())
                }
                fn on_events(
                    heads: ::std::vec::Vec<$crate::bindings::covey::script::types::EventHead>,
                    bytes: ::std::vec::Vec<u8>,
                ) {
                    let events = $crate::batch_events(&heads, &bytes);
                    with(|s| s.on_events(&events), ())
                }
                fn on_command(msg: $crate::Message) -> Option<Vec<u8>> {
                    with(|s| s.on_command(msg), None)
                }
                fn on_timer(id: u64) -> bool {
                    with(|s| s.on_timer(id), false)
                }
                fn on_kv_change(key: String, value: Option<Vec<u8>>) {
                    with(|s| s.on_kv_change(key, value), ())
                }
            }

    $crate::bindings::__export_script!(CoveyExport with_types_in $crate::bindings);
        };
    };
}

pub use batch::Event;

impl Event<'_> {
    /// The payload as UTF-8 text (invalid sequences replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(self.payload)
    }

    /// The payload parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.payload)
    }

    /// An owned copy, to keep beyond the callback.
    pub fn to_message(&self) -> Message {
        Message {
            id: self.id,
            from: self.from.into(),
            to: self.to.into(),
            name: self.name.into(),
            payload: self.payload.to_vec(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

batch::impl_for_bindings!(batch, EventHead, Message);

/// An `on-events` batch as events borrowed from its buffer. A malformed
/// batch (the host never sends one) is logged and cut at the first bad
/// event.
#[doc(hidden)]
pub fn batch_events<'a>(heads: &[EventHead], bytes: &'a [u8]) -> Vec<Event<'a>> {
    let (events, read) = batch::collect(heads, bytes);
    if let Err(e) = read {
        log::error(&format!("on-events: {e}"));
    }
    events
}

impl Message {
    /// The payload as UTF-8 text (invalid sequences replaced).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.payload)
    }

    /// The payload parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Serialise `value` as a JSON payload.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serialising to JSON")
}

/// Log lines, tagged by the host with the node and script name.
pub mod log {
    use crate::bindings::covey::script::log::{Level, log};

    pub fn trace(msg: &str) {
        log(Level::Trace, msg)
    }
    pub fn debug(msg: &str) {
        log(Level::Debug, msg)
    }
    pub fn info(msg: &str) {
        log(Level::Info, msg)
    }
    pub fn warn(msg: &str) {
        log(Level::Warn, msg)
    }
    pub fn error(msg: &str) {
        log(Level::Error, msg)
    }
}

/// This node and the cluster.
pub mod node {
    pub use crate::bindings::covey::script::node::{name, nodes, now_ms};
}

/// Events, commands and calls. Patterns: `*` matches anything.
pub mod events {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::bindings::covey::script::events as wit;
    pub use wit::{handle, subscribe, unsubscribe};

    use crate::{CallError, SendError, to_json};

    /// Broadcast an event with a raw payload.
    pub fn emit(name: &str, payload: &[u8]) -> Result<(), SendError> {
        wit::emit(name, payload)
    }

    /// Broadcast an event with a text payload.
    pub fn emit_str(name: &str, text: &str) -> Result<(), SendError> {
        wit::emit(name, text.as_bytes())
    }

    /// Broadcast an event with a JSON payload.
    pub fn emit_json<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<(), SendError> {
        wit::emit(name, &to_json(value))
    }

    /// Send a command to a node (or `*`); replies are dropped.
    pub fn send_command(target: &str, name: &str, payload: &[u8]) -> Result<(), SendError> {
        wit::send_command(target, name, payload)
    }

    /// Request/reply with a raw payload.
    pub fn call(
        target: &str,
        name: &str,
        payload: &[u8],
        timeout_ms: u32,
    ) -> Result<Vec<u8>, CallError> {
        wit::call(target, name, payload, timeout_ms)
    }

    /// Request/reply with JSON on both sides. A reply that is not valid
    /// JSON of type `R` comes back as `CallError::HandlerFailed`.
    pub fn call_json<T: Serialize + ?Sized, R: DeserializeOwned>(
        target: &str,
        name: &str,
        request: &T,
        timeout_ms: u32,
    ) -> Result<R, CallError> {
        let reply = wit::call(target, name, &to_json(request), timeout_ms)?;
        serde_json::from_slice(&reply)
            .map_err(|e| CallError::HandlerFailed(format!("reply is not the expected JSON: {e}")))
    }
}

/// The replicated key-value store.
/// System events (`covey.node.down`, `covey.script.failed`, …): their
/// names and typed payloads. Subscribe like any event
/// (`events::subscribe("*", "covey.node.*")`), then read one with
/// [`system::SystemEvent::parse`]`(&msg.name, &msg.payload)`.
pub mod system {
    pub use covey_lifecycle::{
        ConflictEvent, DEVICE_ATTACHED, DEVICE_DETACHED, DeviceEvent, DownReason, KV_CONFLICT,
        NODE_DOWN, NODE_UP, NodeEvent, SCRIPT_FAILED, SCRIPT_STARTED, SCRIPT_STOPPED,
        SCRIPTS_CONFLICT, ScriptEvent, StartKind, SystemEvent, is_reserved,
    };
}

pub mod kv {
    use crate::bindings::covey::script::kv as wit;
    pub use wit::{delete, get, incr, keys, unwatch, watch};

    use crate::KvError;

    /// Set a raw value.
    pub fn set(key: &str, value: &[u8]) -> Result<(), KvError> {
        wit::set(key, value)
    }

    /// Read a value as UTF-8 text.
    pub fn get_string(key: &str) -> Option<String> {
        wit::get(key).map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Set a text value.
    pub fn set_string(key: &str, value: &str) -> Result<(), KvError> {
        wit::set(key, value.as_bytes())
    }
}

/// Timers; all stop when the script stops or is reloaded.
pub mod timers {
    pub use crate::bindings::covey::script::timers::{after, cancel, every};
}

/// The node config's `extras` map.
pub mod config {
    pub use crate::bindings::covey::script::config::get;
}

/// Outgoing HTTP(S), to the hosts the node's operator granted this script
/// (config `grants:`); anything else fails with `HttpError::NotGranted`.
/// A request waits for the whole response (its timeout, not the CPU
/// budget, bounds the wait).
pub mod http {
    pub use crate::bindings::covey::script::http::{HttpError, Request, Response, fetch};

    /// `GET url`.
    pub fn get(url: &str) -> Result<Response, HttpError> {
        fetch(&request("GET", url, Vec::new(), Vec::new()))
    }

    /// `POST url` with a body of the given content type.
    pub fn post(url: &str, content_type: &str, body: &[u8]) -> Result<Response, HttpError> {
        let headers = vec![("content-type".to_string(), content_type.to_string())];
        fetch(&request("POST", url, headers, body.to_vec()))
    }

    /// A request with the grant's timeout.
    pub fn request(
        method: &str,
        url: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Request {
        Request {
            method: method.to_string(),
            url: url.to_string(),
            headers,
            body,
            timeout_ms: 0,
        }
    }
}
