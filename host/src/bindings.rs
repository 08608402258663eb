//! Host-side bindings generated from `wit/covey.wit`.
//!
//! Every import and export is async: host functions such as `call` wait on
//! the network or another script, and exports run under an epoch deadline
//! that yields to tokio (see `script::instance`).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "script",
    imports: { default: async },
    exports: { default: async },
    additional_derives: [PartialEq, Eq],
});

pub use self::covey::script::node::NodeInfo;
pub use self::covey::script::types::{CallError, SendError};

/// The extra import of the built-in Lua guest (world `lua-script`), sharing
/// every other interface's types with the bindings above.
pub mod lua {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "lua-script",
        imports: { default: async },
        exports: { default: async },
        with: {
            "covey:script/types": super::covey::script::types,
            "covey:script/node": super::covey::script::node,
            "covey:script/log": super::covey::script::log,
            "covey:script/events": super::covey::script::events,
            "covey:script/kv": super::covey::script::kv,
            "covey:script/timers": super::covey::script::timers,
            "covey:script/config": super::covey::script::config,
        },
    });
}
