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

pub use self::covey::script::types::{CallError, SendError};
