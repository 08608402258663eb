//! Host capabilities: one module per WIT interface, in the spirit of Spin's
//! "factors". Each module owns its per-instance state (a `*Ctx` struct held
//! in [`ScriptState`]) and links its interface with `add_to_linker`.
//! Adding a capability means one new module, one field below and one line in
//! [`link`].

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::router::{Delivery, ScriptId};
use crate::services::Services;

pub mod config;
pub mod events;
pub mod kv;
pub mod log;
pub mod lua;
pub mod node;
pub mod timers;
pub mod wasi;

/// Who an instance is: handed to every capability when a store is built.
#[derive(Clone)]
pub struct ScriptEnv {
    /// Path of the script relative to the scripts directory.
    pub script: ScriptId,
    /// Which instantiation of the script this is (new on reload or restart).
    pub generation: u64,
    /// Node-wide services (router, key-value store, config).
    pub services: Arc<Services>,
    /// The script's own mailbox, for timers.
    pub mailbox: mpsc::Sender<Delivery>,
    /// For `.lua` scripts: the source the Lua guest runs.
    pub lua: Option<lua::LuaScript>,
    /// The script's log rate limit (outlives generations).
    pub log_rate: Arc<log::LogRate>,
}

/// CPU budget of the export call in progress, counted in epoch ticks.
#[derive(Default)]
pub struct CpuBudget {
    pub used_ticks: u32,
    pub max_ticks: u32,
    /// The budget armed for the running call (for the error message).
    pub budget: std::time::Duration,
}

/// Everything one store (one instance of one script) owns.
pub struct ScriptState {
    pub env: ScriptEnv,
    pub limits: MeteredLimits,
    pub budget: CpuBudget,
    pub table: ResourceTable,
    pub wasi: WasiCtx,
    pub log: log::LogCtx,
    pub node: node::NodeCtx,
    pub events: events::EventsCtx,
    pub kv: kv::KvCtx,
    pub timers: timers::TimersCtx,
    pub config: config::ConfigCtx,
    pub lua: lua::LuaCtx,
}

impl ScriptState {
    pub fn new(env: ScriptEnv) -> Self {
        let limits = &env.services.limits;
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.memory_bytes as usize)
            .instances(32)
            .memories(4)
            .tables(32)
            .build();
        ScriptState {
            limits: MeteredLimits {
                limits: store_limits,
                memory_bytes: 0,
            },
            budget: CpuBudget::default(),
            table: ResourceTable::new(),
            wasi: wasi::sandboxed_ctx(&env),
            log: log::LogCtx::new(&env),
            node: node::NodeCtx::new(&env),
            events: events::EventsCtx::new(&env),
            kv: kv::KvCtx::new(&env),
            timers: timers::TimersCtx::new(&env),
            config: config::ConfigCtx::new(&env),
            lua: lua::LuaCtx::new(&env),
            env,
        }
    }
}

/// The store's limits, and the linear memory it holds (for `covey
/// scripts`): every growth the limits allowed, added up.
pub struct MeteredLimits {
    limits: StoreLimits,
    pub memory_bytes: usize,
}

impl wasmtime::ResourceLimiter for MeteredLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_bytes += desired.saturating_sub(current);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for ScriptState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Link WASI (sandboxed) and every Covey interface.
pub fn link(linker: &mut Linker<ScriptState>) -> Result<()> {
    wasi::add_to_linker(linker)?;
    log::add_to_linker(linker)?;
    node::add_to_linker(linker)?;
    events::add_to_linker(linker)?;
    kv::add_to_linker(linker)?;
    timers::add_to_linker(linker)?;
    config::add_to_linker(linker)?;
    lua::add_to_linker(linker)?;
    Ok(())
}
