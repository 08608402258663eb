//! `covey:script/kv`: the replicated key-value store as a script sees it.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::LimitExceeded;
use crate::bindings::covey::script::kv::{self as wit, KvError as WitError};
use crate::kvdoc::KvError;
use crate::router::{ScriptId, SubKind};
use crate::services::Services;

/// Watches one script may hold at once; more is almost certainly a leak.
pub const MAX_WATCHES: usize = 10_000;

pub struct KvCtx {
    script: ScriptId,
    generation: u64,
    services: Arc<Services>,
    /// This generation's watches: id → prefix.
    watches: HashMap<u64, String>,
}

impl KvCtx {
    /// Is `watch` one of this generation's watches?
    pub fn is_watching(&self, watch: u64) -> bool {
        self.watches.contains_key(&watch)
    }
}

impl From<KvError> for WitError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::InvalidKey(s) => WitError::InvalidKey(s),
            KvError::ValueTooLarge(n) => WitError::ValueTooLarge(n),
            KvError::NotACounter(s) => WitError::NotACounter(s),
            KvError::Storage(s) => WitError::Storage(s),
            KvError::QuotaExceeded(s) => WitError::QuotaExceeded(s),
        }
    }
}

impl Capability for KvCtx {
    fn new(env: &ScriptEnv) -> Self {
        KvCtx {
            script: env.script.clone(),
            generation: env.generation,
            services: env.services.clone(),
            watches: HashMap::new(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl wit::Host for KvCtx {
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.services.kv.get(&key)
    }

    // Writes return once they are on disk: a script that saw `set`
    // succeed never loses the value to a crash (the fsync is shared by the
    // writes that arrive meanwhile).
    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), WitError> {
        self.services.kv.set_by(Some(&self.script), &key, &value)?;
        Ok(self.services.kv.durable().await?)
    }

    async fn delete(&mut self, key: String) -> Result<bool, WitError> {
        let existed = self.services.kv.delete(&key)?;
        self.services.kv.durable().await?;
        Ok(existed)
    }

    async fn keys(&mut self, prefix: String) -> Vec<String> {
        self.services.kv.keys(&prefix)
    }

    async fn incr(&mut self, key: String, delta: i64) -> Result<i64, WitError> {
        let value = self.services.kv.incr_by(Some(&self.script), &key, delta)?;
        self.services.kv.durable().await?;
        Ok(value)
    }

    async fn watch(&mut self, prefix: String) -> Result<u64, LimitExceeded> {
        if self.watches.len() >= MAX_WATCHES {
            // Only a repeat of one it holds (answered with its id).
            return self
                .watches
                .iter()
                .find(|(_, p)| **p == prefix)
                .map(|(id, _)| *id)
                .ok_or_else(|| LimitExceeded::new("watches", MAX_WATCHES));
        }
        let id = self.services.router.subscribe(
            &self.script,
            self.generation,
            SubKind::Watch {
                prefix: prefix.clone(),
            },
        );
        self.watches.insert(id, prefix);
        Ok(id)
    }

    async fn unwatch(&mut self, id: u64) -> bool {
        self.watches.remove(&id).is_some() && self.services.router.unsubscribe(&self.script, id)
    }
}
