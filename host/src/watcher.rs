//! `ScriptsWatcher`: turns file-system notifications under the scripts
//! directory into supervisor loads, debounced per path.
//!
//! Debouncing is a few lines here rather than a debouncer crate because the
//! quiet window is on the hot-reload latency path (goal: file written → new
//! version handling events in ≤ 20 ms) and must coalesce per path, not per
//! batch. Partial writes that slip through are harmless: a truncated
//! component fails to compile, the old version keeps running, and the next
//! write event retries.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::script::ScriptSupervisor;
use crate::scriptsync::ScriptsSync;

/// How long a path must stay quiet before it is (re)loaded.
pub const QUIET: Duration = Duration::from_millis(10);

pub struct ScriptsWatcher {
    _watcher: RecommendedWatcher,
    task: JoinHandle<()>,
}

impl ScriptsWatcher {
    /// Watch the supervisor's directory; with `sync`, every change is also
    /// recorded for the other nodes.
    pub fn start(
        supervisor: Arc<ScriptSupervisor>,
        sync: Option<Arc<ScriptsSync>>,
    ) -> Result<Self> {
        let dir = supervisor.dir().to_path_buf();
        let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(event) => {
                    if event.kind.is_access() {
                        return;
                    }
                    for p in event.paths {
                        let _ = tx.send(p);
                    }
                }
                Err(err) => tracing::warn!("file watcher error: {err}"),
            })
            .context("creating the file watcher")?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        let task = tokio::spawn(debounce(rx, supervisor, sync));
        Ok(ScriptsWatcher {
            _watcher: watcher,
            task,
        })
    }
}

impl Drop for ScriptsWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn debounce(
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    supervisor: Arc<ScriptSupervisor>,
    sync: Option<Arc<ScriptsSync>>,
) {
    let mut pending: HashMap<PathBuf, Instant> = HashMap::new();
    loop {
        let next_due = pending.values().min().map(|t| *t + QUIET);
        tokio::select! {
            p = rx.recv() => match p {
                Some(p) => { pending.insert(p, Instant::now()); }
                None => break,
            },
            // Disabled when nothing is pending (the sleep is then never polled).
            _ = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now)), if next_due.is_some() => {
                let now = Instant::now();
                let mut due: Vec<PathBuf> = pending
                    .iter()
                    .filter(|(_, t)| **t + QUIET <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                due.sort();
                let any = !due.is_empty();
                for p in due {
                    pending.remove(&p);
                    apply(&supervisor, p).await;
                }
                // Recorded in the background: a rescan waits while the
                // directory is being updated from peers (maybe fetching
                // contents), and reloads must not wait with it.
                if any && let Some(sync) = &sync {
                    let sync = sync.clone();
                    tokio::spawn(async move {
                        if let Err(e) = sync.rescan().await {
                            tracing::warn!("scripts sync: recording a local change: {e:#}");
                        }
                    });
                }
            }
        }
    }
}

async fn apply(supervisor: &ScriptSupervisor, path: PathBuf) {
    if path == supervisor.dir() {
        return;
    }
    if path.is_dir() {
        // A directory appeared (or was moved in): pick up what it holds.
        supervisor.scan().await;
        return;
    }
    if !path.exists() {
        // Gone: a script, or a directory of scripts.
        if let Ok(rel) = path.strip_prefix(supervisor.dir()) {
            let prefix = rel.to_string_lossy().replace('\\', "/");
            supervisor.stop_under(&prefix).await;
        }
    }
    let _ = supervisor.sync_path(&path).await;
}
