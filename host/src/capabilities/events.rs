//! `covey:script/events`: subscriptions, handlers, emit, send-command, call.
//!
//! The context remembers this generation's own subscriptions so the instance
//! can tell, after a reload or restart, whether a queued message is still
//! wanted by the generation that is live now.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::covey::script::events as wit;
use crate::bindings::covey::script::types;
use crate::bindings::{CallError, LimitExceeded, SendError};
use crate::lifecycle;
use crate::pattern::Pattern;
use crate::router::{Message, ScriptId, SubKind};
use crate::services::Services;

/// Subscriptions and handlers one script may hold at once.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

pub struct EventsCtx {
    script: ScriptId,
    generation: u64,
    services: Arc<Services>,
    /// This generation's subscriptions by id. A repeat is told apart by
    /// the router, which answers it with the existing id.
    subs: HashMap<u64, SubKind>,
    /// Whether this generation got its replay of the nodes up (at its
    /// first subscription that selects `covey.node.up`).
    nodes_replayed: bool,
}

impl EventsCtx {
    /// Does this generation subscribe to `msg` as an event?
    pub fn wants_event(&self, msg: &Message) -> bool {
        self.subs.values().any(|k| k.matches_event(msg))
    }

    /// Does this generation handle `msg` as a command?
    pub fn wants_command(&self, msg: &Message) -> bool {
        self.subs.values().any(|k| k.matches_command(msg))
    }

    fn add(&mut self, kind: SubKind) -> Result<u64, LimitExceeded> {
        // At the cap a repeat still gets its id (a scan, only at the cap).
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            let repeat = self.subs.iter().find(|(_, k)| **k == kind);
            return repeat
                .map(|(id, _)| *id)
                .ok_or_else(|| LimitExceeded::new("subscriptions", MAX_SUBSCRIPTIONS));
        }
        let id = self
            .services
            .router
            .subscribe(&self.script, self.generation, kind.clone());
        let router = &self.services.router;
        if !self.nodes_replayed && kind.selects_event(router.node_name(), lifecycle::NODE_UP) {
            self.nodes_replayed = true;
            router.replay_nodes_up(&self.script, self.generation);
        }
        if id != 0 {
            self.subs.entry(id).or_insert(kind);
        }
        Ok(id)
    }
}

impl Capability for EventsCtx {
    fn new(env: &ScriptEnv) -> Self {
        EventsCtx {
            script: env.script.clone(),
            generation: env.generation,
            services: env.services.clone(),
            subs: HashMap::new(),
            nodes_replayed: false,
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        types::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)?;
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl types::Host for EventsCtx {}

impl wit::Host for EventsCtx {
    async fn subscribe(&mut self, from: String, name: String) -> Result<u64, LimitExceeded> {
        self.add(SubKind::Event {
            from: Pattern::new(&from),
            name: Pattern::new(&name),
        })
    }

    async fn handle(&mut self, from: String, name: String) -> Result<u64, LimitExceeded> {
        self.add(SubKind::Command {
            from: Pattern::new(&from),
            name: Pattern::new(&name),
        })
    }

    async fn unsubscribe(&mut self, id: u64) -> bool {
        if self.subs.remove(&id).is_none() {
            return false;
        }
        self.services.router.unsubscribe(&self.script, id)
    }

    async fn emit(&mut self, name: String, payload: Vec<u8>) -> Result<(), SendError> {
        self.services.router.emit(&name, payload).map(drop)
    }

    async fn send_command(
        &mut self,
        target: String,
        name: String,
        payload: Vec<u8>,
    ) -> Result<(), SendError> {
        self.services
            .router
            .send_command(&target, &name, payload)
            .map(drop)
    }

    async fn call(
        &mut self,
        target: String,
        name: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, CallError> {
        let timeout = Duration::from_millis(timeout_ms.into());
        self.services
            .router
            .call(Some(&self.script), &target, &name, payload, timeout)
            .await
    }
}
