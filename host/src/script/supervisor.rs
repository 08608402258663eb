//! `ScriptSupervisor`: the set of scripts a node runs, keyed by path.
//!
//! Data path: watcher → supervisor (read, hash, compile off the async
//! runtime) → instance (swap in). The supervisor is the only place that
//! starts, replaces and stops instances; loads are serialised by its lock,
//! so two quick saves of one file cannot race each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use wasmtime::component::{Component, Linker};

use super::instance::{Control, LoadedScript, ScriptCounters, ScriptInstance, ScriptStatus};
use crate::bindings::{ScriptPre, WIT_VERSION, wit_version_of};
use crate::capabilities::log::LogRate;
use crate::capabilities::lua::{self, LuaScript};
use crate::capabilities::{self, ScriptState};
use crate::engine::ComponentCache;
use crate::router::{self, ScriptId};
use crate::scriptdir::is_ignored_name;
use crate::services::Services;

struct Handle {
    control: mpsc::UnboundedSender<Control>,
    task: JoinHandle<()>,
    hash: blake3::Hash,
    status: Arc<Mutex<ScriptStatus>>,
    counters: Arc<ScriptCounters>,
    log_rate: Arc<LogRate>,
}

/// One script as listed by `covey scripts`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ScriptInfo {
    pub script: String,
    /// `running`, or `failed` (waiting to restart, or its first start failed).
    pub state: String,
    /// The running version: the first 16 hex digits of its BLAKE3 hash.
    pub version: String,
    pub generation: u64,
    /// When the running generation started (ms since the Unix epoch).
    pub started_ms: u64,
    pub restarts: u64,
    pub last_error: Option<String>,
    pub memory_bytes: u64,
    /// Time in callbacks since the script was first started.
    pub busy_ms: u64,
    /// Messages taken from its mailbox.
    pub handled: u64,
    /// Messages dropped because its mailbox was full.
    pub dropped: u64,
    /// Log lines dropped by the rate limit since the script started.
    pub log_dropped: u64,
    /// Deliveries per duration bucket (`instance::DURATION_BUCKETS`, then
    /// one for longer), not cumulative.
    pub callback_durations: Vec<u64>,
    /// Failures by kind (`cpu_budget`, `unreachable`, ...).
    pub failures: BTreeMap<String, u64>,
    /// What the operator granted it beyond the base API, e.g.
    /// `http ["api.example.com"]` (one entry per matching rule).
    #[serde(default)]
    pub grants: Vec<String>,
}

/// What a load did.
#[derive(Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    Started,
    Reloaded,
    /// Same bytes as the running version: nothing to do.
    Unchanged,
}

pub struct ScriptSupervisor {
    services: Arc<Services>,
    cache: ComponentCache,
    linker: Arc<Linker<ScriptState>>,
    dir: PathBuf,
    scripts: tokio::sync::Mutex<BTreeMap<ScriptId, Handle>>,
    lua_guest: tokio::sync::OnceCell<Arc<LoadedScript>>,
}

/// The Lua guest component, built by `lua-guest/build.sh` and committed, so
/// building the host needs no wasm C toolchain.
pub const LUA_GUEST: &[u8] = include_bytes!("../../../lua-guest/dist/lua-guest.wasm");

/// The Lua guest precompiled for this binary's target at build time
/// (`COVEY_LUA_GUEST_CWASM`, set by `dist/cross.sh` for 32-bit ARM, where
/// compiling it on a Pi Zero takes minutes), deflated (build.rs); empty
/// when the build had none.
pub const LUA_GUEST_PRECOMPILED: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lua-guest.cwasm.deflate"));

impl ScriptSupervisor {
    pub fn new(services: Arc<Services>, cache: ComponentCache, dir: PathBuf) -> Result<Self> {
        let mut linker = Linker::new(cache.engine().engine());
        capabilities::link(&mut linker)?;
        Ok(ScriptSupervisor {
            services,
            cache,
            linker: Arc::new(linker),
            dir,
            scripts: tokio::sync::Mutex::new(BTreeMap::new()),
            lua_guest: tokio::sync::OnceCell::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The script id of `path`, if it is a script this node should run.
    pub fn script_id(&self, path: &Path) -> Option<ScriptId> {
        let rel = path.strip_prefix(&self.dir).ok()?;
        is_script_path(rel).then(|| {
            rel.components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/")
                .into()
        })
    }

    /// Bring the script at `path` in line with the file: start, reload or
    /// stop it. Errors are logged (and returned for callers that care); a
    /// running version is never disturbed by a bad new one.
    pub async fn sync_path(&self, path: &Path) -> Result<LoadOutcome> {
        let Some(id) = self.script_id(path) else {
            return Ok(LoadOutcome::Unchanged);
        };
        if path.is_file() {
            let r = self.load(id.clone(), path).await;
            match &r {
                Ok(LoadOutcome::Started) => tracing::info!(script = &*id, "script started"),
                Ok(LoadOutcome::Reloaded) => tracing::info!(script = &*id, "script reloaded"),
                Ok(LoadOutcome::Unchanged) => {}
                Err(e) => tracing::error!(script = &*id, "{e:#}"),
            }
            r
        } else {
            self.stop(&id).await;
            Ok(LoadOutcome::Unchanged)
        }
    }

    async fn load(&self, id: ScriptId, path: &Path) -> Result<LoadOutcome> {
        let mut scripts = self.scripts.lock().await;
        let bytes = tokio::fs::read(path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        let hash = blake3::hash(&bytes);
        if scripts.get(&id).is_some_and(|h| h.hash == hash) {
            return Ok(LoadOutcome::Unchanged);
        }
        let code = Arc::new(self.prepare(&id, bytes, hash).await?);
        if let Some(handle) = scripts.get_mut(&id) {
            let (done, result) = oneshot::channel();
            handle
                .control
                .send(Control::Replace { code, done })
                .map_err(|_| anyhow!("`{id}` is not running"))?;
            match result.await {
                Ok(Ok(())) => {
                    handle.hash = hash;
                    Ok(LoadOutcome::Reloaded)
                }
                Ok(Err(e)) => Err(anyhow!(
                    "new version of `{id}` failed to start; the previous version keeps running: {e}"
                )),
                Err(_) => Err(anyhow!("`{id}` stopped during reload")),
            }
        } else {
            let (handle, started) = self.spawn(id.clone(), code, hash);
            scripts.insert(id.clone(), handle);
            match started.await {
                Ok(Ok(())) => Ok(LoadOutcome::Started),
                Ok(Err(e)) => Err(anyhow!(
                    "`{id}` failed to start (will retry with backoff): {e}"
                )),
                Err(_) => Err(anyhow!("`{id}` stopped while starting")),
            }
        }
    }

    /// Compile (or fetch from the cache) and link, on a blocking thread.
    pub async fn compile(
        &self,
        id: &str,
        bytes: Vec<u8>,
        hash: blake3::Hash,
    ) -> Result<LoadedScript> {
        let source = self.dir.join(id);
        self.link(id, hash, move |cache| cache.load(&bytes, Some(&source)))
            .await
    }

    /// Get the component from `load` and link it, on a blocking thread.
    async fn link(
        &self,
        id: &str,
        hash: blake3::Hash,
        load: impl FnOnce(&ComponentCache) -> Result<Component> + Send + 'static,
    ) -> Result<LoadedScript> {
        let cache = self.cache.clone();
        let linker = self.linker.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let component = load(&cache)
                .with_context(|| format!("`{id}` is not a loadable WebAssembly component"))?;
            let pre = linker
                .instantiate_pre(&component)
                .and_then(ScriptPre::new)
                .map_err(anyhow::Error::from)
                .with_context(
                    || match wit_version_of(&component, cache.engine().engine()) {
                        Some(v) if v != WIT_VERSION => format!(
                            "`{id}` was built against covey:script@{v}; this host implements \
                             covey:script@{WIT_VERSION}: rebuild it against wit/covey.wit"
                        ),
                        _ => format!(
                            "`{id}` does not fit the covey:script@{WIT_VERSION} `script` world \
                             (build it against wit/covey.wit)"
                        ),
                    },
                )?;
            Ok(LoadedScript {
                pre,
                hash,
                lua: None,
            })
        })
        .await?
    }

    /// Compile a component, or pair a `.lua` script with the Lua guest.
    pub async fn prepare(
        &self,
        id: &str,
        bytes: Vec<u8>,
        hash: blake3::Hash,
    ) -> Result<LoadedScript> {
        if id.ends_with(".lua") {
            self.lua_script(bytes, hash).await
        } else {
            self.compile(id, bytes, hash).await
        }
    }

    /// A `.lua` script: the built-in Lua guest (compiled once per node)
    /// plus the script's text. Syntax errors surface from its `init`.
    async fn lua_script(&self, bytes: Vec<u8>, hash: blake3::Hash) -> Result<LoadedScript> {
        let guest = self
            .lua_guest
            .get_or_try_init(|| async {
                let what = "the built-in Lua guest";
                self.link(what, blake3::hash(LUA_GUEST), move |cache| {
                    cache.load_builtin(LUA_GUEST, LUA_GUEST_PRECOMPILED, what)
                })
                .await
                .map(Arc::new)
            })
            .await?;
        Ok(LoadedScript {
            pre: guest.pre.clone(),
            hash,
            lua: Some(LuaScript {
                source: bytes.into(),
                root: self.dir.clone(),
                // `covey exec` (a console) reads beside the file first.
                search_path: match self.services.console {
                    Some(_) => lua::EXEC_PATH,
                    None => lua::SCRIPTS_PATH,
                },
            }),
        })
    }

    fn spawn(
        &self,
        id: ScriptId,
        code: Arc<LoadedScript>,
        hash: blake3::Hash,
    ) -> (Handle, oneshot::Receiver<Result<(), String>>) {
        let (mailbox_tx, mailbox_rx) = router::mailbox(self.services.limits.mailbox);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(ScriptStatus::default()));
        let counters = Arc::new(ScriptCounters::default());
        let log_rate = Arc::new(LogRate::new(self.services.limits.log_rate));
        self.services
            .router
            .register(id.clone(), mailbox_tx.clone());
        let instance = ScriptInstance::new(
            id,
            self.services.clone(),
            code,
            (mailbox_tx, mailbox_rx),
            control_rx,
            (status.clone(), counters.clone()),
            log_rate.clone(),
        );
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(instance.run(started_tx));
        (
            Handle {
                control: control_tx,
                task,
                hash,
                status,
                counters,
                log_rate,
            },
            started_rx,
        )
    }

    /// Stop the script `id` (its subscriptions and timers go with it).
    pub async fn stop(&self, id: &str) -> bool {
        let handle = self.scripts.lock().await.remove(id);
        match handle {
            Some(h) => {
                let _ = h.control.send(Control::Stop);
                let _ = h.task.await;
                true
            }
            None => false,
        }
    }

    /// Stop every script under `prefix` (a removed directory).
    pub async fn stop_under(&self, prefix: &str) {
        let ids: Vec<ScriptId> = self
            .scripts
            .lock()
            .await
            .keys()
            .filter(|id| id.starts_with(prefix) && id[prefix.len()..].starts_with('/'))
            .cloned()
            .collect();
        for id in ids {
            self.stop(&id).await;
        }
    }

    /// Load every script under the directory and stop those whose file is
    /// gone. Used at start and after the watcher reports a directory change.
    pub async fn scan(&self) {
        let mut found = Vec::new();
        collect_files(&self.dir, &mut found);
        found.sort();
        for path in &found {
            let _ = self.sync_path(path).await;
        }
        let present: Vec<ScriptId> = found.iter().filter_map(|p| self.script_id(p)).collect();
        let running: Vec<ScriptId> = self.scripts.lock().await.keys().cloned().collect();
        for id in running {
            if !present.contains(&id) {
                self.stop(&id).await;
            }
        }
    }

    pub async fn list(&self) -> Vec<ScriptInfo> {
        let router = &self.services.router;
        let scripts = self.scripts.lock().await;
        (scripts.iter())
            .map(|(id, h)| {
                let st = h.status.lock().unwrap().clone();
                let c = &h.counters;
                ScriptInfo {
                    script: id.to_string(),
                    state: if st.running { "running" } else { "failed" }.into(),
                    version: h.hash.to_hex()[..16].to_string(),
                    generation: st.generation,
                    started_ms: st.started_ms,
                    restarts: st.restarts,
                    last_error: st.last_error,
                    memory_bytes: c.memory_bytes.load(Ordering::Relaxed),
                    busy_ms: c.busy_ns.load(Ordering::Relaxed) / 1_000_000,
                    handled: c.handled.load(Ordering::Relaxed),
                    dropped: router.dropped(id),
                    log_dropped: h.log_rate.dropped(),
                    callback_durations: (c.durations.iter())
                        .map(|d| d.load(Ordering::Relaxed))
                        .collect(),
                    failures: (c.failures.lock().unwrap().iter())
                        .map(|(k, n)| (k.to_string(), *n))
                        .collect(),
                    grants: self.services.grants.describe(id),
                }
            })
            .collect()
    }

    /// Stop every script.
    pub async fn shutdown(&self) {
        let handles: Vec<Handle> = std::mem::take(&mut *self.scripts.lock().await)
            .into_values()
            .collect();
        for h in &handles {
            let _ = h.control.send(Control::Stop);
        }
        for h in handles {
            let _ = h.task.await;
        }
    }
}

/// Is `rel` (relative to the scripts directory) a script to run? Components
/// (`*.wasm`) and Lua scripts (`*.lua`), except Lua modules under the
/// top-level `lib/`, which are only loaded by `require`.
pub fn is_script_path(rel: &Path) -> bool {
    let mut names = rel.components().map(|c| c.as_os_str().to_string_lossy());
    let all_visible = names.all(|n| !is_ignored_name(&n));
    let in_lib = rel.starts_with("lib");
    all_visible
        && match rel.extension().and_then(|e| e.to_str()) {
            Some("wasm") => true,
            Some("lua") => !in_lib,
            _ => false,
        }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if is_ignored_name(&name.to_string_lossy()) {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => collect_files(&path, out),
            Ok(_) => out.push(path),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_script_path;
    use std::path::Path;

    #[test]
    fn which_files_are_scripts() {
        assert!(is_script_path(Path::new("hello.wasm")));
        assert!(is_script_path(Path::new("a/b/hello.wasm")));
        assert!(!is_script_path(Path::new(".hello.wasm")));
        assert!(!is_script_path(Path::new(".git/hello.wasm")));
        assert!(!is_script_path(Path::new("hello.wasm~")));
        assert!(!is_script_path(Path::new("hello.wasm.swp")));
        assert!(!is_script_path(Path::new(".#hello.wasm")));
        assert!(!is_script_path(Path::new("#hello.wasm#")));
        assert!(!is_script_path(Path::new("notes.txt")));
        assert!(is_script_path(Path::new("blink.lua")));
        assert!(is_script_path(Path::new("rooms/blink.lua")));
        assert!(!is_script_path(Path::new("lib/util.lua")));
    }
}
