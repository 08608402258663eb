//! The wasmtime engine shared by every script of a node, and the on-disk
//! cache of compiled components.
//!
//! Memory layout is chosen by what the machine's address space allows, best
//! first (nothing is committed until a script uses it; these are *virtual*
//! reservations):
//!
//! 1. **Guarded**: 4 GiB per linear memory plus a guard region, so compiled
//!    code needs no bounds checks (Lua runs 1.3–1.6x faster than with
//!    explicit checks). The pool for 64 scripts reserves ~1.6 TiB: fine on
//!    x86_64 and 48-bit arm64, impossible on a Raspberry Pi's 39-bit
//!    (512 GiB) address space — the classic "cannot reserve terabytes"
//!    failure of wasm hosts on a Pi.
//! 2. **Compact**: each memory reserves exactly the per-script cap; bounds
//!    checks are explicit; the pool for 64 scripts is ~18 GiB.
//! 3. Compact with on-demand allocation, when no pool fits (32-bit hosts,
//!    tight `ulimit -v`).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Length of one epoch tick. CPU budgets are counted in ticks, so this is
/// also their granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Resource limits that shape the engine (they change generated code or the
/// allocator, so they are fixed for the engine's lifetime).
#[derive(Clone, Debug)]
pub struct EngineLimits {
    /// Maximum linear memory of one script, in bytes.
    pub memory_bytes: u64,
    /// How many scripts the pooling allocator is sized for.
    pub max_scripts: u32,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            memory_bytes: 64 << 20,
            max_scripts: 64,
        }
    }
}

/// How instances are allocated; reported in logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorKind {
    Pooling,
    OnDemand,
}

/// How linear memories are laid out in the address space (see module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryLayout {
    Guarded,
    Compact,
}

/// A wasmtime [`Engine`] configured for Covey, plus its epoch ticker.
#[derive(Clone)]
pub struct ScriptEngine {
    engine: Engine,
    allocator: AllocatorKind,
    layout: MemoryLayout,
    limits: EngineLimits,
}

impl ScriptEngine {
    /// Build the engine with the best memory layout and allocator the
    /// address space allows (see module docs).
    pub fn new(limits: EngineLimits) -> Result<Self> {
        use AllocatorKind::*;
        use MemoryLayout::*;
        let mut last_err = None;
        for (layout, allocator) in [(Guarded, Pooling), (Compact, Pooling), (Compact, OnDemand)] {
            match Engine::new(&base_config(&limits, layout, allocator)) {
                Ok(engine) => {
                    if let Some(err) = last_err {
                        tracing::info!(
                            "using {layout:?} memories with {allocator:?} allocation \
                             (a roomier setup did not fit this machine: {err:#})"
                        );
                    }
                    start_epoch_ticker(&engine);
                    return Ok(ScriptEngine {
                        engine,
                        allocator,
                        layout,
                        limits,
                    });
                }
                Err(err) => last_err = Some(err),
            }
        }
        let err = anyhow::Error::from(last_err.expect("tried at least once"));
        Err(err.context("creating the wasm engine"))
    }

    pub fn layout(&self) -> MemoryLayout {
        self.layout
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn allocator(&self) -> AllocatorKind {
        self.allocator
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// A hex digest of everything that makes a compiled artifact loadable
    /// only by this engine: wasmtime's own compatibility hash (version,
    /// target, tunables such as memory reservation and epoch checks).
    pub fn compat_key(&self) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}

fn base_config(limits: &EngineLimits, layout: MemoryLayout, allocator: AllocatorKind) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // setjmp/longjmp in C guests (Lua's error handling) compile to wasm
    // exceptions.
    config.wasm_exceptions(true);
    match layout {
        MemoryLayout::Guarded => {
            config.memory_reservation(4 << 30);
            config.memory_guard_size(32 << 20);
        }
        MemoryLayout::Compact => {
            config.memory_reservation(limits.memory_bytes);
            config.memory_guard_size(64 << 10);
        }
    }
    config.memory_reservation_for_growth(0);
    config.max_wasm_stack(512 << 10);
    config.async_stack_size(1 << 20);
    if allocator == AllocatorKind::Pooling {
        // During a hot reload two generations of a script coexist.
        let instances = limits.max_scripts * 2 + 8;
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(instances)
            .total_core_instances(instances * 8)
            .max_core_instances_per_component(16)
            .max_memories_per_component(2)
            .max_tables_per_component(8)
            .total_memories(instances * 2)
            .total_tables(instances * 8)
            .table_elements(20_000)
            .total_stacks(instances)
            .total_gc_heaps(instances)
            .max_memory_size(limits.memory_bytes as usize);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Advance the engine's epoch every [`EPOCH_TICK`] on a plain thread, so the
/// ticks keep coming even when the async runtime is saturated. The thread
/// holds only a weak reference: it runs as long as anything (a store, a
/// component) keeps the engine alive — a store still executing must keep
/// getting ticks, or a runaway guest could never be interrupted — and ends
/// with the engine.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("covey-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .expect("spawning the epoch thread");
}

/// Compiled components cached on disk, keyed by content hash and engine
/// compatibility key, so restarts and reloads of a known component skip
/// Cranelift.
#[derive(Clone)]
pub struct ComponentCache {
    engine: ScriptEngine,
    dir: Option<PathBuf>,
}

impl ComponentCache {
    /// A cache in `dir` (created if needed). `None` disables caching.
    pub fn new(engine: ScriptEngine, dir: Option<PathBuf>) -> Self {
        ComponentCache { engine, dir }
    }

    pub fn engine(&self) -> &ScriptEngine {
        &self.engine
    }

    /// Compile `bytes` (or load the cached artifact). Blocking: call it from
    /// `spawn_blocking`.
    pub fn load(&self, bytes: &[u8]) -> Result<Component> {
        let hash = blake3::hash(bytes).to_hex();
        let path = self.dir.as_ref().map(|d| {
            d.join(format!(
                "{}-{}.cwasm",
                &hash[..32],
                self.engine.compat_key()
            ))
        });
        if let Some(path) = &path
            && let Some(component) = self.load_cached(path)
        {
            return Ok(component);
        }
        check_is_component(bytes)?;
        let component = Component::new(self.engine.engine(), bytes)?;
        if let Some(path) = &path
            && let Err(err) = store_artifact(path, &component)
        {
            tracing::warn!(
                "could not cache compiled component at {}: {err:#}",
                path.display()
            );
        }
        Ok(component)
    }

    fn load_cached(&self, path: &Path) -> Option<Component> {
        let bytes = std::fs::read(path).ok()?;
        // SAFETY: the file was written by `store_artifact` from a component
        // this engine compiled; its name carries the engine's compatibility
        // key, and wasmtime itself re-checks version and settings in the
        // artifact header before using it. A file someone else writes into
        // the data dir is outside our threat model (they could replace the
        // binary too).
        match unsafe { Component::deserialize(self.engine.engine(), &bytes) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(
                    "discarding unusable cached artifact {}: {err:#}",
                    path.display()
                );
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }
}

/// Write the artifact atomically (temp file + rename): a crash mid-write
/// never leaves a truncated artifact under the final name.
fn store_artifact(path: &Path, component: &Component) -> Result<()> {
    let bytes = component.serialize()?;
    crate::files::write_atomic(path, &bytes, crate::files::Mode::Shared)?;
    Ok(())
}

/// Reject inputs that are not components with an error a user understands,
/// instead of the parser's first complaint.
fn check_is_component(bytes: &[u8]) -> Result<()> {
    const MAGIC: &[u8; 4] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        anyhow::bail!("not a WebAssembly file (bad magic number)");
    }
    // Version field: 1 = core module, 0x0d/layer 1 = component.
    if bytes[4..8] == [1, 0, 0, 0] {
        anyhow::bail!(
            "this is a core wasm module, not a component; build with \
             `cargo build --target wasm32-wasip2` or `cargo component build`"
        );
    }
    Ok(())
}
