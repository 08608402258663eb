//! `ScriptsSync`: the scripts directory, the same on every node.
//!
//! - [`manifest`] — the replicated document: path → hash, size, origin,
//!   deleted.
//! - [`blobs`] — file contents by hash, fetched from peers on demand.
//!
//! Data paths: watcher → `rescan` → manifest (a local create, edit, delete
//! or rename becomes manifest entries) → peers; peers → manifest merge →
//! `reconcile` → files written atomically into the directory → watcher →
//! supervisor (the same hot-reload path as a local edit).
//!
//! What is on disk is tracked in `<data>/scripts-applied.json`: path →
//! hash, size and modification time of the version this node last wrote
//! or recorded. A rescan hashes only files whose size or time changed, so
//! the file this node just wrote for a peer is not echoed back as a new
//! change; and at start it tells an offline edit or delete (the file
//! differs from what was applied) from a file not yet received.

pub mod blobs;
pub mod manifest;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use automerge::sync;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use self::blobs::{BlobStore, Hash, Transfers};
use self::manifest::Entry;
use crate::cluster::{BlobSource, Cluster};
use crate::docstore::DocStore;
use crate::docsync::{Received, SyncTarget};
use crate::files::hex;
use crate::lifecycle;
use crate::logtext::for_log;
use crate::router::Router;
use crate::scriptdir::{self, FileStat, ScriptDir, ScriptPath};

/// Largest file synced (bigger ones stay local, with a warning): the
/// largest blob a link accepts.
pub const MAX_FILE: u64 = crate::cluster::link::MAX_BLOB as u64;
/// How soon to retry contents that no linked peer had.
const RETRY_MISSING: std::time::Duration = std::time::Duration::from_secs(1);

/// What applying one manifest entry did.
enum Outcome {
    Changed,
    /// Its contents are not here yet.
    Missing,
    Nothing,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    hash: Hash,
    size: u64,
    mtime_ns: u128,
}

pub struct ScriptsSync {
    node: String,
    root: PathBuf,
    /// Every write and delete made on peers' behalf goes through this.
    dir: ScriptDir,
    store: Arc<DocStore>,
    blobs: BlobStore,
    applied_path: PathBuf,
    applied: Mutex<BTreeMap<String, Applied>>,
    /// One rescan or reconcile at a time.
    turn: tokio::sync::Mutex<()>,
    cluster: OnceLock<Cluster>,
    /// Where `covey.scripts.conflict` goes.
    router: Arc<Router>,
    reconcile_needed: Notify,
    /// Conflict copies already written this run (so each is logged once).
    copies: Mutex<HashSet<String>>,
    /// Manifest entries refused this run (so each is logged once).
    refused: Mutex<HashSet<manifest::Refused>>,
    /// Local files whose names break the path rule (warned about once).
    unsyncable: Mutex<HashSet<String>>,
}

impl ScriptsSync {
    pub fn open(router: Arc<Router>, dir: &Path, data: &Path) -> Result<Arc<Self>> {
        let applied_path = data.join("scripts-applied.json");
        let applied = match std::fs::read(&applied_path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(
                    "{} is unreadable ({e}); treating every file as changed",
                    applied_path.display()
                );
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Ok(Arc::new(ScriptsSync {
            node: router.node_name().to_string(),
            root: dir.to_path_buf(),
            dir: ScriptDir::new(dir),
            store: Arc::new(DocStore::open(
                Some(data.join("scripts.automerge")),
                "scripts manifest",
            )?),
            blobs: BlobStore::open(data.join("blobs"))?,
            applied_path,
            applied: Mutex::new(applied),
            turn: tokio::sync::Mutex::new(()),
            cluster: OnceLock::new(),
            router,
            reconcile_needed: Notify::new(),
            copies: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
            unsyncable: Mutex::new(HashSet::new()),
        }))
    }

    /// Write what is not on disk yet (blocking; at shutdown).
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// The manifest's heads (equal on two nodes = same manifest).
    /// Contents fetched from and served to peers.
    pub fn transfers(&self) -> &Transfers {
        &self.blobs.transfers
    }

    pub fn heads(&self) -> Vec<automerge::ChangeHash> {
        self.store.heads()
    }

    /// The cluster to fetch blobs through (set once it is started).
    pub fn set_cluster(&self, cluster: Cluster) {
        let _ = self.cluster.set(cluster);
        self.reconcile_needed.notify_one();
    }

    /// Start the background work: flushing the manifest, and reconciling
    /// the directory whenever the manifest or the peers change.
    pub fn spawn(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let flusher = self.store.spawn_flusher();
        let me = self.clone();
        let reconciler = tokio::spawn(async move {
            loop {
                me.reconcile_needed.notified().await;
                match me.reconcile().await {
                    // Contents no linked peer could give yet (its origin is
                    // down): try again in a while.
                    Ok(missing) if missing > 0 => {
                        let me = me.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(RETRY_MISSING).await;
                            me.reconcile_needed.notify_one();
                        });
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("scripts sync: {e:#}"),
                }
            }
        });
        vec![flusher, reconciler]
    }

    /// Record local changes: every file whose size or time differs from
    /// what was applied is hashed; changed hashes and vanished files
    /// become manifest entries. Called on watcher events and at start.
    pub async fn rescan(self: &Arc<Self>) -> Result<()> {
        let _turn = self.turn.lock().await;
        let me = self.clone();
        let recorded = tokio::task::spawn_blocking(move || me.rescan_blocking()).await??;
        if recorded > 0 {
            self.store.durable().await?;
        }
        Ok(())
    }

    fn rescan_blocking(&self) -> Result<usize> {
        let mut files = Vec::new();
        scriptdir::walk(&self.root, &self.root, &mut files);
        // Names a peer would refuse are not offered to them.
        files.retain(|(rel, _)| match ScriptPath::parse(rel) {
            Ok(_) => true,
            Err(e) => {
                if self.unsyncable.lock().unwrap().insert(rel.clone()) {
                    let rel = for_log(rel);
                    tracing::warn!(path = rel, "scripts sync: not synced: {e}");
                }
                false
            }
        });
        let mut applied = self.applied.lock().unwrap();
        let mut recorded = 0;
        // Whether `applied` changed and must be saved.
        let mut changed = false;
        let mut seen = HashSet::new();
        for (rel, path) in &files {
            seen.insert(rel.clone());
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let stat = FileStat::of_std(&meta);
            if let Some(a) = applied.get(rel)
                && (a.size, a.mtime_ns) == (stat.size, stat.mtime_ns)
            {
                continue;
            }
            if meta.len() > MAX_FILE {
                tracing::warn!(
                    "{rel} is {} bytes, over the {MAX_FILE}-byte sync limit: not synced",
                    meta.len()
                );
                continue;
            }
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let hash = blobs::hash(&bytes);
            let now = Applied {
                hash,
                size: bytes.len() as u64,
                mtime_ns: stat.mtime_ns,
            };
            let known = applied.insert(rel.clone(), now);
            changed = true;
            let current = self.store.read(|doc| manifest::get(doc, rel));
            if known.map(|a| a.hash) == Some(hash)
                || current
                    .as_ref()
                    .is_some_and(|e| !e.deleted && e.hash == hash)
            {
                continue; // touched, not changed; or what a peer sent
            }
            self.blobs.put(&hash, &bytes)?;
            let entry = Entry {
                hash,
                size: bytes.len() as u64,
                origin: self.node.clone(),
                deleted: false,
            };
            self.store
                .write(|doc| manifest::put(doc, rel, &entry))
                .map_err(anyhow::Error::from)?;
            tracing::info!(
                path = rel,
                hash = &hex(&hash)[..12],
                "scripts sync: recorded local change"
            );
            recorded += 1;
        }
        let gone: Vec<String> = applied
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for rel in gone {
            let last = applied.remove(&rel).expect("listed above");
            changed = true;
            let entry = Entry {
                hash: last.hash,
                size: 0,
                origin: self.node.clone(),
                deleted: true,
            };
            let current = self.store.read(|doc| manifest::get(doc, &rel));
            if current.is_some_and(|e| e.deleted) {
                continue;
            }
            self.store
                .write(|doc| manifest::put(doc, &rel, &entry))
                .map_err(anyhow::Error::from)?;
            tracing::info!(path = rel, "scripts sync: recorded local delete");
            recorded += 1;
        }
        if changed {
            save_applied(&self.applied_path, &applied)?;
        }
        Ok(recorded)
    }

    /// Bring the directory in line with the manifest: write what peers
    /// changed, delete what they deleted, keep conflicting versions as
    /// conflict copies. Contents are fetched first, without holding the
    /// directory, so a slow peer never delays recording local changes.
    /// An entry that is refused or cannot be applied is logged and
    /// skipped; the others are applied. Returns how many versions could
    /// not be fetched yet.
    pub async fn reconcile(self: &Arc<Self>) -> Result<usize> {
        let manifest = self.store.read(manifest::all);
        self.note_refused(&manifest.refused);
        for (path, (winner, losers)) in &manifest.entries {
            let on_disk = self.applied_hash(path);
            if !winner.deleted && on_disk != Some(winner.hash) {
                self.fetch(&winner.hash, &winner.origin).await;
            }
            for loser in live_losers(winner, losers) {
                self.fetch(&loser.hash, &loser.origin).await;
            }
        }
        let _turn = self.turn.lock().await;
        let manifest = self.store.read(manifest::all);
        let mut missing = 0;
        // Whether `applied` changed and must be saved.
        let mut changed = false;
        for (path, (winner, losers)) in &manifest.entries {
            match self.apply(path, winner) {
                Ok(Outcome::Changed) => changed = true,
                Ok(Outcome::Missing) => missing += 1,
                Ok(Outcome::Nothing) => {}
                Err(e) => self.failed(path.as_str(), &winner.origin, &e),
            }
            for loser in live_losers(winner, losers) {
                match self.conflict_copy(path, winner, loser) {
                    Ok(true) => {}
                    Ok(false) => missing += 1,
                    Err(e) => self.failed(path.as_str(), &loser.origin, &e),
                }
            }
        }
        if changed {
            let applied = self.applied.lock().unwrap().clone();
            save_applied(&self.applied_path, &applied)?;
        }
        if missing > 0 {
            tracing::debug!(
                missing,
                "scripts sync: contents not available yet; will retry"
            );
        }
        Ok(missing)
    }

    fn applied_hash(&self, path: &ScriptPath) -> Option<Hash> {
        self.applied
            .lock()
            .unwrap()
            .get(path.as_str())
            .map(|a| a.hash)
    }

    /// Make the file at `path` what the winning entry says.
    fn apply(&self, path: &ScriptPath, winner: &Entry) -> Result<Outcome> {
        let rel = path.as_str();
        let on_disk = self.applied_hash(path);
        if winner.deleted {
            let Some(hash) = on_disk else {
                return Ok(Outcome::Nothing);
            };
            // Only what was applied: an edit the watcher has not reported
            // yet is not thrown away.
            if self.dir.read(path).map(|b| blobs::hash(&b)) == Some(hash) {
                self.dir
                    .remove(path)
                    .with_context(|| format!("deleting {rel}"))?;
                tracing::info!(path = rel, origin = winner.origin, "scripts sync: deleted");
            }
            self.applied.lock().unwrap().remove(rel);
            return Ok(Outcome::Changed);
        }
        if on_disk == Some(winner.hash) {
            return Ok(Outcome::Nothing);
        }
        let current = self.dir.read(path).map(|b| blobs::hash(&b));
        let stat = if current == Some(winner.hash) {
            // Already there (the same file dropped on several nodes).
            self.dir
                .stat(path)
                .with_context(|| format!("reading {rel}"))?
        } else if current.is_some() && current != on_disk {
            // Edited here and not recorded yet: the next rescan records
            // the edit, which then supersedes this version. Writing now
            // would lose it.
            return Ok(Outcome::Nothing);
        } else {
            let Some(bytes) = self.blobs.get(&winner.hash) else {
                return Ok(Outcome::Missing);
            };
            self.dir
                .write(path, &bytes)
                .with_context(|| format!("writing {rel}"))?
        };
        // Noted as applied, so the watcher's event for it is recognised
        // and not sent back out.
        self.applied.lock().unwrap().insert(
            rel.to_string(),
            Applied {
                hash: winner.hash,
                size: stat.size,
                mtime_ns: stat.mtime_ns,
            },
        );
        tracing::info!(path = rel, origin = winner.origin, "scripts sync: updated");
        Ok(Outcome::Changed)
    }

    /// Keep a losing concurrent version beside the winner, once. False if
    /// its contents are not here yet.
    fn conflict_copy(&self, path: &ScriptPath, winner: &Entry, loser: &Entry) -> Result<bool> {
        // The origin is peer data: only a sanitised form goes into the name.
        let name = format!(
            "{path}.conflict-{}-{}",
            scriptdir::name_part(&loser.origin),
            &hex(&loser.hash)[..8]
        );
        let copy = ScriptPath::parse(&name)
            .with_context(|| format!("conflict copy name {:?}", for_log(&name)))?;
        if self.copies.lock().unwrap().contains(copy.as_str())
            || self.dir.read(&copy).map(|b| blobs::hash(&b)) == Some(loser.hash)
        {
            return Ok(true);
        }
        let Some(bytes) = self.blobs.get(&loser.hash) else {
            return Ok(false);
        };
        // A plain local file: the next rescan records it.
        self.dir
            .write(&copy, &bytes)
            .with_context(|| format!("writing {copy}"))?;
        self.copies.lock().unwrap().insert(copy.to_string());
        tracing::warn!(
            path = path.as_str(),
            winner = winner.origin,
            kept_as = copy.as_str(),
            "scripts sync: concurrent edits; the other version is kept as a conflict copy"
        );
        let event = lifecycle::ConflictEvent {
            key: path.to_string(),
            winner: winner.origin.clone(),
            losers: vec![loser.origin.clone()],
            copy: Some(copy.to_string()),
        };
        (self.router).emit_system(lifecycle::SCRIPTS_CONFLICT, lifecycle::payload(&event));
        Ok(true)
    }

    /// An entry that could not be applied (a directory where a file
    /// should be, a symlink leading out, a full disk): logged and counted
    /// once, the rest of the manifest still applied; retried at the next
    /// change.
    fn failed(&self, rel: &str, origin: &str, e: &anyhow::Error) {
        self.note_refused(&[manifest::Refused {
            key: for_log(rel),
            origin: Some(origin.to_string()),
            reason: "not-applied",
            why: format!("{e:#}"),
        }]);
    }

    /// Log and count each refused (or unappliable) manifest entry once
    /// per run.
    fn note_refused(&self, refused: &[manifest::Refused]) {
        let mut seen = self.refused.lock().unwrap();
        for r in refused {
            if seen.insert(r.clone()) {
                tracing::warn!(
                    path = r.key,
                    origin = r.origin.as_deref().map(for_log),
                    reason = r.reason,
                    "scripts sync: refused a manifest entry: {}",
                    r.why
                );
            }
        }
    }

    /// Manifest entries refused or not applied so far (distinct, this
    /// run), by reason.
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for r in self.refused.lock().unwrap().iter() {
            *out.entry(r.reason).or_default() += 1;
        }
        out
    }

    /// Put entries into the manifest as a modified (hostile) peer could:
    /// any key, any origin, the path rule skipped; several versions are
    /// written as concurrent edits (a conflict). `None` is a delete. Only
    /// for tests of what the other nodes do with such entries.
    #[doc(hidden)]
    pub async fn inject_unchecked(&self, key: &str, versions: &[(&str, Option<&[u8]>)]) {
        let entries: Vec<Entry> = versions
            .iter()
            .map(|(origin, contents)| {
                let bytes = contents.unwrap_or_default();
                let hash = blobs::hash(bytes);
                self.blobs.put(&hash, bytes).expect("blob stored");
                Entry {
                    hash,
                    size: bytes.len() as u64,
                    origin: origin.to_string(),
                    deleted: contents.is_none(),
                }
            })
            .collect();
        self.store
            .write(|doc| {
                let mut forks: Vec<_> = entries.iter().map(|_| doc.fork()).collect();
                for (fork, entry) in forks.iter_mut().zip(&entries) {
                    manifest::put(fork, key, entry)?;
                }
                for fork in &mut forks {
                    doc.merge(fork)?;
                }
                Ok::<_, automerge::AutomergeError>(())
            })
            .expect("manifest written");
        self.store.durable().await.expect("manifest durable");
    }

    /// Make sure the blob store has `hash`: fetched from the origin node,
    /// else from any peer that is up.
    async fn fetch(&self, hash: &Hash, origin: &str) {
        if self.blobs.has(hash) {
            return;
        }
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        let mut peers = cluster.up_peers();
        peers.sort_by_key(|p| p != origin);
        for peer in peers {
            match cluster.fetch_blob(&peer, hash).await {
                Ok(Some(bytes)) if bytes.len() as u64 > MAX_FILE => {
                    tracing::warn!(
                        peer,
                        size = bytes.len(),
                        "scripts sync: peer sent an oversized blob"
                    )
                }
                Ok(Some(bytes)) if blobs::hash(&bytes) == *hash => {
                    let t = &self.blobs.transfers;
                    Transfers::count(&t.fetched, &t.fetched_bytes, bytes.len());
                    if let Err(e) = self.blobs.put(hash, &bytes) {
                        tracing::warn!("scripts sync: cannot store a blob: {e:#}");
                    }
                    return;
                }
                Ok(Some(_)) => tracing::warn!(peer, "scripts sync: peer sent a damaged blob"),
                Ok(None) => {}
                Err(e) => tracing::debug!(peer, "scripts sync: fetching a blob: {e:#}"),
            }
        }
    }
}

impl BlobSource for ScriptsSync {
    fn blob(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        let bytes = self.blobs.get(hash)?;
        let t = &self.blobs.transfers;
        Transfers::count(&t.served, &t.served_bytes, bytes.len());
        Some(bytes)
    }
}

impl SyncTarget for ScriptsSync {
    fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        self.store.sync_generate(state)
    }

    fn receive(&self, state: &mut sync::State, msg: &[u8]) -> Result<Received> {
        if self.store.sync_receive(state, msg, |_, _| ())?.is_some() {
            self.reconcile_needed.notify_one();
        }
        Ok(Received::Applied)
    }

    fn version(&self) -> watch::Receiver<u64> {
        self.store.watch_version()
    }
}

/// Concurrent versions of a path other than the winner that hold contents.
fn live_losers<'a>(winner: &'a Entry, losers: &'a [Entry]) -> impl Iterator<Item = &'a Entry> {
    losers
        .iter()
        .filter(move |l| !l.deleted && l.hash != winner.hash)
}

fn save_applied(path: &Path, applied: &BTreeMap<String, Applied>) -> Result<()> {
    let bytes = serde_json::to_vec(applied)?;
    crate::files::write_atomic(path, &bytes, crate::files::Mode::Private)
        .with_context(|| format!("saving {}", path.display()))
}
