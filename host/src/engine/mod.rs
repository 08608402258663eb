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
//! 3. Compact with on-demand allocation, when no pool fits (tight
//!    `ulimit -v`), and always on 32-bit hosts, whose 3 GiB of address
//!    space hold neither the guarded layout nor a pool.
//!
//! Where Cranelift has no backend (32-bit ARM: every Pi on a 32-bit OS,
//! down to the Pi Zero) wasmtime compiles to Pulley bytecode and runs it in
//! its interpreter; nothing else changes (epoch interruption, memory
//! limits, wasm exceptions all work there). The engine can also compile for
//! another machine ([`Target::Cross`], `covey compile`).

pub use cache::{ComponentCache, Precompiled};

mod cache;

use std::hash::{Hash, Hasher};
use std::time::Duration;

use anyhow::Result;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Length of one epoch tick. CPU budgets are counted in ticks, so this is
/// also their granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Resource limits and the target that shape the engine (they change
/// generated code or the allocator, so they are fixed for the engine's
/// lifetime).
#[derive(Clone, Debug)]
pub struct EngineLimits {
    /// Maximum linear memory of one script, in bytes.
    pub memory_bytes: u64,
    /// How many scripts the pooling allocator is sized for.
    pub max_scripts: u32,
    /// What the engine compiles for.
    pub target: Target,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            memory_bytes: 64 << 20,
            max_scripts: 64,
            target: Target::Host,
        }
    }
}

/// What code an engine produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// This machine: native code through Cranelift, or Pulley bytecode where
    /// Cranelift has no backend (32-bit ARM).
    Host,
    /// Another machine (or Pulley on this one): a wasmtime target triple
    /// such as `aarch64-unknown-linux-gnu` or `pulley32`, and the memory
    /// layout that machine's engine picks (it is part of the generated code).
    Cross {
        triple: String,
        layout: MemoryLayout,
    },
}

impl Target {
    /// The target a machine of this triple (Rust's or wasmtime's names, or
    /// the short names `arm64`, `armv7`, `armv6`, `pulley32`, `pulley64`)
    /// runs scripts with, and the layout its engine picks. 64-bit machines
    /// are assumed to be Raspberry Pis (39-bit address space: compact); pass
    /// a layout to override.
    pub fn for_machine(name: &str, layout: Option<MemoryLayout>) -> Result<Target> {
        let arch = name.split('-').next().unwrap_or_default();
        let triple = match arch {
            "arm64" | "aarch64" => "aarch64-unknown-linux-gnu",
            "x86_64" | "amd64" => "x86_64-unknown-linux-gnu",
            // No Cranelift backend for 32-bit ARM: Pulley, as the Pi does.
            "armv6" | "armv7" | "armhf" | "armel" | "arm" | "pulley32" => "pulley32",
            "pulley64" => "pulley64",
            _ if arch.starts_with("armv") || arch.starts_with("thumbv") => "pulley32",
            _ => anyhow::bail!(
                "unknown target '{name}': use arm64, armv7, armv6 (or armhf), x86_64, \
                 pulley32 or pulley64, or a Rust target triple"
            ),
        };
        let layout = layout.unwrap_or(match triple {
            "x86_64-unknown-linux-gnu" => MemoryLayout::Guarded,
            _ => MemoryLayout::Compact,
        });
        if triple == "pulley32" && layout == MemoryLayout::Guarded {
            anyhow::bail!("32-bit machines cannot use the guarded memory layout");
        }
        Ok(Target::Cross {
            triple: triple.to_string(),
            layout,
        })
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
        let candidates: &[(MemoryLayout, AllocatorKind)] = match &limits.target {
            Target::Cross { layout, .. } => &[(*layout, OnDemand)],
            Target::Host if cfg!(target_pointer_width = "32") => &[(Compact, OnDemand)],
            Target::Host => &[(Guarded, Pooling), (Compact, Pooling), (Compact, OnDemand)],
        };
        let mut last_err = None;
        for &(layout, allocator) in candidates {
            let config = match base_config(&limits, layout, allocator) {
                Ok(config) => config,
                Err(err) => {
                    last_err = Some(err);
                    break;
                }
            };
            match Engine::new(&config) {
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
                Err(err) => last_err = Some(err.into()),
            }
        }
        let err = last_err.expect("tried at least once");
        Err(err.context("creating the wasm engine"))
    }

    /// The short name of what this engine's code runs on (`x86_64`,
    /// `aarch64`, `pulley32`, `pulley64`): the middle part of a precompiled
    /// artifact's name (`pump.pulley32.cwasm`).
    pub fn target_name(&self) -> &'static str {
        match (&self.limits.target, self.engine.is_pulley()) {
            (_, true) if cfg!(target_pointer_width = "32") => "pulley32",
            (Target::Cross { triple, .. }, true) if triple == "pulley32" => "pulley32",
            (_, true) => "pulley64",
            (Target::Cross { triple, .. }, false) if triple.starts_with("aarch64") => "aarch64",
            (Target::Cross { .. }, false) => "x86_64",
            (Target::Host, false) => std::env::consts::ARCH,
        }
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

fn base_config(
    limits: &EngineLimits,
    layout: MemoryLayout,
    allocator: AllocatorKind,
) -> Result<Config> {
    let mut config = Config::new();
    if let Target::Cross { triple, .. } = &limits.target {
        config.target(triple)?;
    }
    // Cranelift compiles a component's functions on every core at once,
    // each with its own working memory: fine on a laptop, an OOM kill on a
    // Pi Zero (512 MiB). Small machines compile one function at a time.
    config.parallel_compilation(roomy_machine());
    config.epoch_interruption(true);
    if std::env::var_os("COVEY_PERFMAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
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
    Ok(config)
}

/// More than two cores and at least 2 GiB of memory: parallel compilation
/// is worth its memory.
fn roomy_machine() -> bool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    cores > 2 && mem_kib >= 2 << 20
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
