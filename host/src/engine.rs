//! The wasmtime engine shared by every script of a node, and the on-disk
//! cache of compiled components.
//!
//! Sizing matters more than speed here: Covey runs on Raspberry Pis with 1 GiB
//! of RAM and a 39-bit (512 GiB) address space. Wasmtime's defaults reserve
//! 4 GiB of address space per linear memory (plus guards), which a pooling
//! allocator multiplies by its slot count — the classic "cannot reserve
//! terabytes" failure of wasm hosts on a Pi. We instead reserve exactly the
//! per-script memory cap, so bounds checks are explicit, and the whole pool
//! stays in the low gigabytes of *virtual* space (nothing is committed until
//! used). If even that cannot be reserved (32-bit hosts, tight `ulimit -v`),
//! we fall back to on-demand allocation.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
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

/// How instances are allocated; reported in `covey status` and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorKind {
    Pooling,
    OnDemand,
}

/// A wasmtime [`Engine`] configured for Covey, plus its epoch ticker.
#[derive(Clone)]
pub struct ScriptEngine {
    engine: Engine,
    allocator: AllocatorKind,
    limits: EngineLimits,
}

impl ScriptEngine {
    /// Build the engine: pooling allocator sized from `limits`, falling back
    /// to on-demand allocation if the pool cannot be reserved.
    pub fn new(limits: EngineLimits) -> Result<Self> {
        let (engine, allocator) = match Engine::new(&base_config(&limits, true)) {
            Ok(engine) => (engine, AllocatorKind::Pooling),
            Err(err) => {
                tracing::warn!(
                    "pooling allocator unavailable ({err:#}); using on-demand allocation"
                );
                let engine = Engine::new(&base_config(&limits, false))
                    .map_err(anyhow::Error::from)
                    .context("creating the wasm engine")?;
                (engine, AllocatorKind::OnDemand)
            }
        };
        start_epoch_ticker(&engine);
        Ok(ScriptEngine {
            engine,
            allocator,
            limits,
        })
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

fn base_config(limits: &EngineLimits, pooling: bool) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    // setjmp/longjmp in C guests (Lua's error handling) compile to wasm
    // exceptions.
    config.wasm_exceptions(true);
    // Reserve exactly the cap: no 4 GiB reservations (see module docs).
    config.memory_reservation(limits.memory_bytes);
    config.memory_guard_size(64 << 10);
    config.memory_reservation_for_growth(0);
    config.max_wasm_stack(512 << 10);
    config.async_stack_size(1 << 20);
    if pooling {
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
    let dir = path.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact")
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
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
