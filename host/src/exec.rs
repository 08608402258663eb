//! `covey exec FILE [ARGS...]`: run a script once, in the same sandbox as a
//! node runs it, with its output on this terminal. For a `.lua` file the
//! whole file runs (ordinary standalone Lua programs work, with `arg` and
//! `...`); for a `.wasm` component, its `init`. Exits non-zero with the
//! error if the script fails.
//!
//! The run gets a node of its own: an in-memory key-value store, no other
//! scripts, no watcher. Timers and subscriptions it sets up end with it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};

use crate::capabilities::ScriptEnv;
use crate::capabilities::log::LogRate;
use crate::clock::now_ms;
use crate::engine::{ComponentCache, EngineLimits, ScriptEngine};
use crate::kvdoc::{KvDoc, KvLimits};
use crate::router::{Router, ScriptId};
use crate::script::ScriptSupervisor;
use crate::script::instance::{describe_failure, instantiate};
use crate::services::{Console, ScriptLimits, Services};

/// Settings of a one-shot run.
pub struct ExecOptions {
    pub node: String,
    pub limits: ScriptLimits,
    /// Where compiled code is cached (the node's data dir), if anywhere.
    pub cache_dir: Option<std::path::PathBuf>,
    pub args: Vec<String>,
    /// What the script is granted (`--http HOST`).
    pub grants: crate::grants::Grants,
}

pub async fn exec(file: &Path, opts: ExecOptions) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let file = file.canonicalize()?;
    let dir = file
        .parent()
        .context("the file has no directory")?
        .to_path_buf();
    let name: ScriptId = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("the file has no name")?
        .into();
    let engine = ScriptEngine::new(EngineLimits {
        memory_bytes: opts.limits.memory_bytes,
        max_scripts: 1,
        ..EngineLimits::default()
    })?;
    let cache = ComponentCache::new(engine, opts.cache_dir);
    let router = Arc::new(Router::new(&opts.node, 1 << 20));
    let kv = Arc::new(KvDoc::open(None, KvLimits::default(), router.clone())?);
    let services = Arc::new(Services {
        router: router.clone(),
        kv,
        extras: Default::default(),
        grants: opts.grants,
        limits: opts.limits,
        started_ms: now_ms(),
        console: Some(Console { args: opts.args }),
    });
    let supervisor = ScriptSupervisor::new(services.clone(), cache, dir)?;
    let hash = blake3::hash(&bytes);
    let code = supervisor.prepare(&name, bytes, hash).await?;
    let (mailbox_tx, _mailbox) = crate::router::mailbox(16);
    router.register(name.clone(), mailbox_tx.clone());
    let env = ScriptEnv {
        script: name.clone(),
        generation: 1,
        services,
        mailbox: mailbox_tx,
        lua: code.lua.clone(),
        // The terminal of the person who ran it: no limit.
        log_rate: Arc::new(LogRate::new(0)),
    };
    match instantiate(env, &code).await {
        Ok(_) => Ok(()),
        Err(err) => Err(anyhow!("{name}: {}", describe_failure(&err))),
    }
}
