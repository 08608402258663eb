//! `covey:script/config`: read-only access to the node config's `extras`.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::{ScriptEnv, ScriptState};
use crate::bindings::covey::script::config as wit;
use crate::services::Services;

pub struct ConfigCtx {
    services: Arc<Services>,
}

impl ConfigCtx {
    pub fn new(env: &ScriptEnv) -> Self {
        ConfigCtx {
            services: env.services.clone(),
        }
    }
}

pub fn add_to_linker(linker: &mut Linker<ScriptState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<ScriptState, HasSelf<ConfigCtx>>(linker, |s| &mut s.config)
}

impl wit::Host for ConfigCtx {
    async fn get(&mut self, key: String) -> Option<String> {
        match self.services.extras.get(&key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}
