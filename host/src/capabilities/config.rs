//! `covey:script/config`: read-only access to the node config's `extras`.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::covey::script::config as wit;
use crate::services::Services;

pub struct ConfigCtx {
    services: Arc<Services>,
}

impl Capability for ConfigCtx {
    fn new(env: &ScriptEnv) -> Self {
        ConfigCtx {
            services: env.services.clone(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl wit::Host for ConfigCtx {
    async fn get(&mut self, key: String) -> Option<String> {
        match self.services.extras.get(&key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}
