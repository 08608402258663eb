//! `covey compile`: compile a component on a strong machine for a weak one.
//! A Pi Zero compiling the Lua guest with Cranelift-for-Pulley takes
//! minutes; a laptop takes seconds, and the artifact is the same.
//!
//! The artifact is only loadable by an engine with the same wasmtime
//! version, target and settings — the memory layout and the per-script
//! memory limit among them, which is why they are arguments here.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::engine::{EngineLimits, MemoryLayout, ScriptEngine, Target};
use crate::script::supervisor::LUA_GUEST;

#[derive(Args, Debug, Clone)]
pub struct CompileArgs {
    /// The component (`.wasm`) to compile
    #[arg(required_unless_present = "lua_guest")]
    pub file: Option<PathBuf>,
    /// Compile the Lua guest built into this binary instead (what `.lua`
    /// scripts run on)
    #[arg(long, conflicts_with = "file")]
    pub lua_guest: bool,
    /// The machine that will run it: arm64, armv7, armv6 (armhf), x86_64,
    /// a Rust target triple, or pulley32/pulley64 [default: this machine]
    #[arg(long)]
    pub target: Option<String>,
    /// Memory layout of that machine's engine: `compact` (Raspberry Pis,
    /// 32-bit machines) or `guarded` (x86_64, 48-bit arm64) [default: by target]
    #[arg(long, value_parser = parse_layout)]
    pub layout: Option<MemoryLayout>,
    /// That node's per-script memory cap in MiB (`memory_mb`), which the
    /// compact layout compiles in
    #[arg(long, default_value_t = 64)]
    pub memory_mb: u64,
    /// Where to write the artifact [default: NAME.<target>.cwasm beside
    /// the component; lua-guest.<target>.cwasm here for --lua-guest]
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

fn parse_layout(s: &str) -> Result<MemoryLayout, String> {
    match s {
        "compact" => Ok(MemoryLayout::Compact),
        "guarded" => Ok(MemoryLayout::Guarded),
        _ => Err(format!("`{s}`: expected compact or guarded")),
    }
}

pub fn compile(args: &CompileArgs) -> Result<()> {
    if args.memory_mb == 0 || args.memory_mb > 4096 {
        bail!("--memory-mb must be 1..=4096");
    }
    let target = match &args.target {
        Some(t) => Target::for_machine(t, args.layout)?,
        None => Target::Host,
    };
    let engine = ScriptEngine::new(EngineLimits {
        memory_bytes: args.memory_mb << 20,
        max_scripts: 1,
        target,
    })
    .context(
        "this covey has Cranelift backends for its own machine and Pulley (32-bit ARM) \
         only; compile on the target itself (64-bit machines compile in seconds), or \
         build covey with `--features cross-compile`",
    )?;
    let (source, default_out) = match &args.file {
        Some(file) => (
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
            engine.precompiled_path(file),
        ),
        None => (
            LUA_GUEST.to_vec(),
            PathBuf::from(format!("lua-guest.{}.cwasm", engine.target_name())),
        ),
    };
    let out = args.output.clone().unwrap_or(default_out);
    let artifact = engine.precompile(&source)?;
    crate::files::write_atomic(&out, &artifact, crate::files::Mode::Shared)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} KiB) for {} ({:?} memory layout, memory_mb {}); nodes of that \
         target load it beside the component when run with trust_precompiled",
        out.display(),
        artifact.len() / 1024,
        engine.target_name(),
        engine.layout(),
        args.memory_mb,
    );
    Ok(())
}
