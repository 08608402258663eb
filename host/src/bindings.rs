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

/// The version of `wit/covey.wit` this host implements.
pub const WIT_VERSION: &str = "0.5.0";

/// The `covey:script` version a component was built against, read from
/// its imports (none if it imports nothing of Covey's).
pub fn wit_version_of(
    component: &wasmtime::component::Component,
    engine: &wasmtime::Engine,
) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .find_map(|(name, _)| {
            let (_, version) = name.strip_prefix("covey:script/")?.split_once('@')?;
            Some(version.to_string())
        })
}

pub use self::covey::script::node::NodeInfo;
pub use self::covey::script::types::{CallError, LimitExceeded, SendError};

impl LimitExceeded {
    pub fn new(what: &str, limit: usize) -> Self {
        LimitExceeded {
            what: what.to_string(),
            limit: limit as u64,
        }
    }
}

/// The extra import of the built-in Lua guest (world `lua-script`), sharing
/// every other interface's types with the bindings above.
#[cfg(test)]
mod tests {
    #[test]
    fn wit_version_matches_the_wit_file() {
        let wit = include_str!("../../wit/covey.wit");
        let package = format!("package covey:script@{};", super::WIT_VERSION);
        assert!(
            wit.contains(&package),
            "wit/covey.wit does not say {package}"
        );
    }
}

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
            "covey:script/http": super::covey::script::http,
        },
    });
}
