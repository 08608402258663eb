//! Getting from component bytes to a loaded [`Component`] without compiling
//! when possible: the on-disk cache of what this node compiled before, and
//! precompiled artifacts (`covey compile`, or the Lua guest precompiled
//! into the binary at build time) for machines too slow to compile.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use wasmtime::component::Component;

use super::ScriptEngine;

/// One compilation at a time per process: compiling is the peak of a
/// node's memory (a large component takes hundreds of MiB in Cranelift),
/// and a node starting with many new scripts must not hold them all at
/// once on a Pi.
static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// First bytes of a file written by [`ScriptEngine::precompile`].
const PRECOMPILED_MAGIC: &[u8; 8] = b"COVEYPC1";

impl ScriptEngine {
    /// Compile `source` (a component) into an artifact that an engine of
    /// this target and settings loads without compiling:
    /// [`PRECOMPILED_MAGIC`], the source's BLAKE3 hash, wasmtime's
    /// serialized component (which records the engine settings itself).
    pub fn precompile(&self, source: &[u8]) -> Result<Vec<u8>> {
        check_is_component(source)?;
        let compiled = {
            let _one_at_a_time = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
            self.engine().precompile_component(source)?
        };
        let mut out = Vec::with_capacity(40 + compiled.len());
        out.extend_from_slice(PRECOMPILED_MAGIC);
        out.extend_from_slice(blake3::hash(source).as_bytes());
        out.extend_from_slice(&compiled);
        Ok(out)
    }

    /// Load an artifact from [`ScriptEngine::precompile`] for `source`.
    /// Refused unless it was made from exactly these source bytes and by an
    /// engine with the same version, target and settings.
    ///
    /// # Safety
    /// The artifact is machine code (or Pulley bytecode) that runs without
    /// wasm's validation: only artifacts from a trusted producer (this
    /// binary's build, an operator's own `covey compile`) may be loaded.
    pub unsafe fn load_precompiled(&self, source: &[u8], artifact: &[u8]) -> Result<Component> {
        let Some(rest) = artifact.strip_prefix(PRECOMPILED_MAGIC) else {
            anyhow::bail!("not a Covey precompiled artifact (made by `covey compile`)");
        };
        if rest.len() < 32 || rest[..32] != *blake3::hash(source).as_bytes() {
            anyhow::bail!("made from other source bytes than the component beside it");
        }
        // SAFETY: the caller vouches for the producer; wasmtime checks the
        // version, target and settings recorded in the artifact.
        Ok(unsafe { Component::deserialize(self.engine(), &rest[32..]) }?)
    }

    /// Where `covey compile` puts the artifact for `source` and this
    /// engine's target: `pump.wasm` → `pump.pulley32.cwasm`.
    pub fn precompiled_path(&self, source: &Path) -> PathBuf {
        let stem = source.file_stem().unwrap_or_default().to_string_lossy();
        source.with_file_name(format!("{stem}.{}.cwasm", self.target_name()))
    }
}

/// Whether precompiled artifacts found beside components are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precompiled {
    /// Ignored with a warning (the default): the scripts directory is
    /// synced from every peer, and an artifact is code that skips wasm's
    /// validation — loading one from a peer would let a script author out
    /// of the sandbox.
    #[default]
    Ignore,
    /// Used when they match (`trust_precompiled: true`).
    Trust,
}

/// Compiled components cached on disk, keyed by content hash and engine
/// compatibility key, so restarts and reloads of a known component skip
/// Cranelift.
#[derive(Clone)]
pub struct ComponentCache {
    engine: ScriptEngine,
    dir: Option<PathBuf>,
    precompiled: Precompiled,
}

impl ComponentCache {
    /// A cache in `dir` (created if needed). `None` disables caching.
    pub fn new(engine: ScriptEngine, dir: Option<PathBuf>) -> Self {
        ComponentCache {
            engine,
            dir,
            precompiled: Precompiled::Ignore,
        }
    }

    /// Use precompiled artifacts beside components (see [`Precompiled`]).
    pub fn with_precompiled(mut self, precompiled: Precompiled) -> Self {
        self.precompiled = precompiled;
        self
    }

    pub fn engine(&self) -> &ScriptEngine {
        &self.engine
    }

    /// Compile `bytes` (or load the cached artifact, or the precompiled one
    /// beside `source` when trusted). Blocking: call it from
    /// `spawn_blocking`.
    pub fn load(&self, bytes: &[u8], source: Option<&Path>) -> Result<Component> {
        if let Some(source) = source
            && let Some(component) = self.load_beside(bytes, source)
        {
            return Ok(component);
        }
        self.load_or_compile(bytes)
    }

    /// Like [`ComponentCache::load`] for a component built into this binary
    /// with its artifact precompiled at build time, deflated (empty if none
    /// was).
    pub fn load_builtin(&self, bytes: &[u8], deflated: &[u8], what: &str) -> Result<Component> {
        if !deflated.is_empty() {
            let mut precompiled = Vec::new();
            flate2::read::DeflateDecoder::new(deflated)
                .read_to_end(&mut precompiled)
                .context("inflating the built-in artifact")?;
            // SAFETY: made by this binary's own build.
            match unsafe { self.engine.load_precompiled(bytes, &precompiled) } {
                Ok(component) => return Ok(component),
                Err(err) => tracing::info!(
                    "compiling {what}: its build-time artifact does not fit this node's \
                     engine settings ({err:#})"
                ),
            }
        }
        self.load_or_compile(bytes)
    }

    fn load_beside(&self, bytes: &[u8], source: &Path) -> Option<Component> {
        let path = self.engine.precompiled_path(source);
        let artifact = std::fs::read(&path).ok()?;
        if self.precompiled == Precompiled::Ignore {
            tracing::warn!(
                "ignoring {}: precompiled code skips wasm's validation, and this node does \
                 not trust precompiled artifacts (set `trust_precompiled: true` to use them)",
                path.display()
            );
            return None;
        }
        // SAFETY: the operator trusts every artifact in the scripts
        // directory (`trust_precompiled`); the source hash and wasmtime's
        // settings check guard against stale or foreign ones.
        match unsafe { self.engine.load_precompiled(bytes, &artifact) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!("ignoring {}: {err:#}", path.display());
                None
            }
        }
    }

    fn load_or_compile(&self, bytes: &[u8]) -> Result<Component> {
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
        let component = {
            let _one_at_a_time = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
            Component::new(self.engine.engine(), bytes)?
        };
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
    crate::files::write_atomic(path, &bytes, crate::files::Mode::Private)?;
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
