//! Host capabilities: one module per WIT interface, in the spirit of Spin's
//! "factors". Each module owns its per-instance state (a `*Ctx` struct held
//! in [`ScriptState`]) and implements [`Capability`]: how to build it, how
//! to link its interface, and whether the operator must grant it. Adding a
//! capability means one new module and one line in the `capabilities!`
//! list (the checklist, guest side included, is in docs/architecture.md).

use std::sync::Arc;

use anyhow::Result;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::router::{MailboxTx, ScriptId};
use crate::services::Services;

pub mod config;
pub mod events;
pub mod http;
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
    pub mailbox: MailboxTx,
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

/// One host capability: a WIT interface (or several), the per-instance
/// state that implements it, and, for what the operator grants rather than
/// every script having it, the name of its grant. Registered by one line in
/// the [`capabilities!`] list below.
pub trait Capability: Sized + Send + 'static {
    /// The key under a `grants:` rule that gives a script this capability
    /// (see [`crate::grants`]); `None` for the base API every script has.
    const GRANT: Option<&'static str> = None;

    /// Validate one grant's parameters when the config is read, so a typo
    /// stops the node at start rather than failing a script's first call.
    fn check_grant(_params: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    /// This capability's state in a new instance.
    fn new(env: &ScriptEnv) -> Self;

    /// Link the capability's interfaces; `get` finds its state in a store.
    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()>;
}

/// The registry: each line names a capability's field in [`ScriptState`]
/// and its type. Generates the store state, its constructor, [`link`] and
/// [`check_grant`].
macro_rules! capabilities {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// Everything one store (one instance of one script) owns.
        pub struct ScriptState {
            pub env: ScriptEnv,
            pub limits: MeteredLimits,
            pub budget: CpuBudget,
            pub table: ResourceTable,
            pub wasi: WasiCtx,
            $(pub $field: $ty,)*
        }

        impl ScriptState {
            pub fn new(env: ScriptEnv) -> Self {
                ScriptState {
                    limits: MeteredLimits::new(&env.services.limits),
                    budget: CpuBudget::default(),
                    table: ResourceTable::new(),
                    wasi: wasi::sandboxed_ctx(&env),
                    $($field: <$ty as Capability>::new(&env),)*
                    env,
                }
            }
        }

        /// Link WASI (sandboxed) and every capability.
        pub fn link(linker: &mut Linker<ScriptState>) -> Result<()> {
            wasi::add_to_linker(linker)?;
            $(<$ty as Capability>::link(linker, |s| &mut s.$field)?;)*
            Ok(())
        }

        /// Validate the parameters of a grant of capability `name`.
        pub fn check_grant(name: &str, params: &serde_json::Value) -> Result<(), String> {
            $(if <$ty as Capability>::GRANT == Some(name) {
                return <$ty as Capability>::check_grant(params);
            })*
            let grantable: Vec<&str> = [$(<$ty as Capability>::GRANT),*]
                .into_iter()
                .flatten()
                .collect();
            Err(format!(
                "unknown capability `{name}` (capabilities that can be granted: {})",
                grantable.join(", ")
            ))
        }
    };
}

capabilities! {
    log: log::LogCtx,
    node: node::NodeCtx,
    events: events::EventsCtx,
    kv: kv::KvCtx,
    timers: timers::TimersCtx,
    config: config::ConfigCtx,
    lua: lua::LuaCtx,
    http: http::HttpCtx,
}

/// The store's limits, and the linear memory it holds (for `covey
/// scripts`): every growth the limits allowed, added up.
pub struct MeteredLimits {
    limits: StoreLimits,
    pub memory_bytes: usize,
}

impl MeteredLimits {
    fn new(limits: &crate::services::ScriptLimits) -> Self {
        MeteredLimits {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes as usize)
                .instances(32)
                .memories(4)
                .tables(32)
                .build(),
            memory_bytes: 0,
        }
    }
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
