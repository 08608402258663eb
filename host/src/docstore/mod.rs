//! `DocStore`: an Automerge document kept in a file in the data directory,
//! durably. Shared by the key-value store and the scripts manifest.
//!
//! The file is an Automerge snapshot followed by incremental change chunks,
//! which `load` reads back as one document ([`file`]). A flusher appends
//! what changed (`fsync` per batch) and compacts the file into a fresh
//! snapshot (temp file + rename) when the appended tail outgrows the
//! snapshot. [`DocStore::durable`] waits until every earlier write is on
//! disk: callers acknowledge writes only after it. A corrupted file is moved
//! aside and its valid prefix kept.
//!
//! Sync ([`DocStore::sync_generate`], [`DocStore::sync_receive`]) is
//! Automerge's sync protocol; the owner decides what a merge means (which
//! keys changed, which files to write).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use automerge::sync::{self, SyncDoc};
use automerge::{ActorId, AutoCommit, ChangeHash, PatchLog};
use tokio::sync::{Notify, watch};

use crate::memory;

pub mod file;

struct Inner {
    doc: AutoCommit,
    /// Changes not yet appended to the file.
    unsaved: bool,
    /// Bytes of the snapshot at the start of the file, and of the appended
    /// tail after it: compaction is due when the tail outgrows the snapshot.
    snapshot_bytes: u64,
    tail_bytes: u64,
    /// A flush failed: the next one writes a whole snapshot, which covers
    /// the chunk that was lost.
    snapshot_due: bool,
}

/// What a document's store has done, for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreStats {
    /// Local writes (commits) since the node started.
    pub writes: u64,
    /// Size of the file on disk (none for an in-memory document).
    pub file_bytes: Option<u64>,
}

pub struct DocStore {
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
    /// What the document is, for log lines ("key-value store").
    what: &'static str,
    /// Serialises file I/O (flushes and compactions).
    io: Mutex<()>,
    dirty: Notify,
    /// Sequence number of the last local write, and how far the disk got:
    /// a write is acknowledged once `durable >= its seq`, and refused if a
    /// flush fails while it waits.
    written: AtomicU64,
    /// Of those, the node's own bookkeeping ([`DocStore::record`]).
    recorded: AtomicU64,
    durable: watch::Sender<Progress>,
    /// Bumped on every change, local or merged: replication listens.
    version: watch::Sender<u64>,
    /// Bumped when the document is replaced ([`DocStore::replace`]): sync
    /// states from before describe another history.
    generation: AtomicU64,
}

#[derive(Clone, Debug, Default)]
struct Progress {
    /// Writes up to this sequence number are on disk.
    durable: u64,
    /// Failed flushes so far, and the last one's reason.
    failures: u64,
    error: String,
}

/// Why a write was not acknowledged. The change stays in memory and the
/// flusher keeps retrying: it may reach the disk later, but nobody was told
/// it had.
#[derive(Debug, thiserror::Error)]
pub enum NotDurable {
    #[error("the store is shutting down")]
    Closed,
    #[error("not saved: {0}")]
    Failed(String),
}

/// The node an actor id names ([`DocStore::name_actor`]), or the start of
/// the id in hex for one made before names (or by other software).
pub fn actor_node(actor: &ActorId) -> String {
    let b = actor.to_bytes();
    match b.len().checked_sub(9) {
        Some(n) if n > 0 && b[n] == 0 => String::from_utf8_lossy(&b[..n]).into_owned(),
        _ => format!("actor:{}", crate::files::hex(&b[..b.len().min(4)])),
    }
}

/// `doc` saved and loaded again. A document built among another's
/// allocations (a compaction, a rebase) then sits in memory as compactly
/// as after a restart (measured with 100,000 keys: 29 MiB kept otherwise,
/// against 8 MiB after a reload). If it does not load, `doc` as it was.
pub fn reloaded(mut doc: AutoCommit) -> AutoCommit {
    let actor = doc.get_actor().clone();
    let bytes = doc.save();
    match AutoCommit::load(&bytes) {
        Ok(again) => {
            drop(doc);
            memory::give_back();
            again.with_actor(actor)
        }
        Err(e) => {
            tracing::warn!("reloading a replaced document: {e}");
            doc
        }
    }
}

impl DocStore {
    /// Open (or create) the document at `path`; `None` keeps it in memory.
    pub fn open(path: Option<PathBuf>, what: &'static str) -> Result<Self> {
        let (doc, snapshot_bytes) = match &path {
            Some(p) => file::load_or_recover(p, what)?,
            None => (AutoCommit::new(), 0),
        };
        memory::give_back();
        Ok(DocStore {
            inner: Mutex::new(Inner {
                doc,
                unsaved: false,
                snapshot_bytes,
                tail_bytes: 0,
                snapshot_due: false,
            }),
            path,
            what,
            io: Mutex::new(()),
            dirty: Notify::new(),
            written: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            durable: watch::Sender::new(Progress::default()),
            version: watch::Sender::new(0),
            generation: AtomicU64::new(0),
        })
    }

    /// Make this node's changes from now on carry its name: the actor id
    /// becomes `NODE \0 <8 random bytes>` (random, so a restart never
    /// reuses a sequence number), which [`actor_node`] reads back to say
    /// which node wrote a value.
    pub fn name_actor(&self, node: &str) {
        let mut id = node.as_bytes().to_vec();
        id.push(0);
        id.extend_from_slice(&crate::random::u64().to_le_bytes());
        self.inner.lock().unwrap().doc.set_actor(ActorId::from(id));
    }

    pub fn stats(&self) -> StoreStats {
        let inner = self.inner.lock().unwrap();
        StoreStats {
            writes: self.written.load(Ordering::Relaxed) - self.recorded.load(Ordering::Relaxed),
            file_bytes: (self.path.as_ref()).map(|_| inner.snapshot_bytes + inner.tail_bytes),
        }
    }

    pub fn read<R>(&self, f: impl FnOnce(&AutoCommit) -> R) -> R {
        f(&self.inner.lock().unwrap().doc)
    }

    /// A read that needs the open transaction closed (history, changes).
    pub fn inspect<R>(&self, f: impl FnOnce(&mut AutoCommit) -> R) -> R {
        f(&mut self.inner.lock().unwrap().doc)
    }

    /// Change the document and schedule it for the disk.
    ///
    /// No commit here: the change stays in Automerge's open transaction,
    /// which the next flush, sync message or heads read closes. Writes that
    /// arrive together become one change — history (memory, sync work)
    /// grows with flushes and messages, not with writes: 100 writes per
    /// change hold a third of the memory of one change each.
    pub fn write<R, E>(&self, f: impl FnOnce(&mut AutoCommit) -> Result<R, E>) -> Result<R, E> {
        let mut inner = self.inner.lock().unwrap();
        let r = f(&mut inner.doc)?;
        inner.unsaved = true;
        self.written.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        self.dirty.notify_one();
        self.version.send_modify(|v| *v += 1);
        Ok(r)
    }

    /// A write of the node's own bookkeeping (not counted in the writes
    /// metric).
    pub fn record<R, E>(&self, f: impl FnOnce(&mut AutoCommit) -> Result<R, E>) -> Result<R, E> {
        let r = self.write(f)?;
        self.recorded.fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// Wait until every write made before this call is on disk (fsynced).
    /// Returns at once for an in-memory document; an error if a flush
    /// fails meanwhile (disk full, I/O error).
    pub async fn durable(&self) -> Result<(), NotDurable> {
        if self.path.is_none() {
            return Ok(());
        }
        let want = self.written.load(Ordering::Acquire);
        let mut rx = self.durable.subscribe();
        let failures = rx.borrow().failures;
        let p = rx
            .wait_for(|p| p.durable >= want || p.failures > failures)
            .await
            .map_err(|_| NotDurable::Closed)?;
        if p.durable >= want {
            Ok(())
        } else {
            Err(NotDurable::Failed(p.error.clone()))
        }
    }

    /// Changes whenever the document does (local writes and merges).
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The next sync message for a peer, if there is anything to say.
    pub fn sync_generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock().unwrap();
        inner
            .doc
            .sync()
            .generate_sync_message(state)
            .map(|m| m.encode())
    }

    /// Apply a peer's sync message. If the document changed, `changed`
    /// runs (under the lock) with the merge's patch log, and its result is
    /// returned; an owner that needs the patches makes them from the log
    /// (`AutoCommit::make_patches`), the others pay nothing for them.
    ///
    /// The log is recorded while the message's changes are applied: its
    /// cost, and the patches', is the size of the merge.
    /// (`diff` between the heads before and after walks every op of the
    /// document — the soak measured it growing with the history until it
    /// was most of a node's CPU.)
    pub fn sync_receive<T>(
        &self,
        state: &mut sync::State,
        msg: &[u8],
        changed: impl FnOnce(&AutoCommit, &mut PatchLog) -> T,
    ) -> Result<Option<T>> {
        let msg = sync::Message::decode(msg)?;
        let mut inner = self.inner.lock().unwrap();
        let doc = &mut inner.doc;
        let before = doc.get_heads();
        // A log of our own, not the document's diff cursor: `diff` would
        // also keep a copy of the patches in the document until the next
        // one (a whole first sync's worth).
        let mut log = PatchLog::active();
        let received = doc
            .sync()
            .receive_sync_message_log_patches(state, msg, &mut log);
        if doc.get_heads() == before {
            return received.map(|()| None).map_err(Into::into);
        }
        // Changes went in, even if the message then failed part-way (its
        // changes load before its heads are checked): they are saved and
        // reported like any others, and the error is still returned.
        inner.unsaved = true;
        let r = changed(&inner.doc, &mut log);
        drop(inner);
        self.dirty.notify_one();
        self.version.send_modify(|v| *v += 1);
        received?;
        Ok(Some(r))
    }

    /// A copy of the document (its open transaction committed first).
    pub fn copy(&self) -> AutoCommit {
        let mut inner = self.inner.lock().unwrap();
        inner.doc.get_heads();
        inner.doc.clone()
    }

    /// Replace the document with what `f` makes of it (a compaction, a
    /// move onto a peer's history), atomically with respect to writes and
    /// merges; the new document goes to disk as a whole snapshot. `f`
    /// returning an error leaves everything as it was. The lock is held
    /// while `f` runs: heavy work belongs before it, on a copy
    /// ([`DocStore::copy`]).
    pub fn replace<T>(
        &self,
        f: impl FnOnce(&mut AutoCommit) -> Result<(AutoCommit, T)>,
    ) -> Result<T> {
        let mut inner = self.inner.lock().unwrap();
        let (doc, r) = f(&mut inner.doc)?;
        drop(std::mem::replace(&mut inner.doc, doc));
        inner.unsaved = true;
        inner.snapshot_due = true;
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        memory::give_back();
        self.dirty.notify_one();
        self.version.send_modify(|v| *v += 1);
        Ok(r)
    }

    /// How many times the document was replaced since the node started.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The whole document, as a peer that has to start over takes it.
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.lock().unwrap().doc.save()
    }

    pub fn heads(&self) -> Vec<ChangeHash> {
        self.inner.lock().unwrap().doc.get_heads()
    }

    /// Append unsaved changes to the file and fsync; compact when due.
    /// Blocking: call from `spawn_blocking` or at shutdown.
    pub fn flush(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _io = self.io.lock().unwrap();
        let (chunk, compact, seq) = {
            let mut inner = self.inner.lock().unwrap();
            let seq = self.written.load(Ordering::Acquire);
            if !inner.unsaved {
                self.durable.send_if_modified(|p| {
                    let newer = seq > p.durable;
                    p.durable = p.durable.max(seq);
                    newer
                });
                return Ok(());
            }
            inner.unsaved = false;
            let compact =
                inner.snapshot_due || inner.tail_bytes > (1 << 20).max(inner.snapshot_bytes);
            if compact {
                (inner.doc.save(), true, seq)
            } else {
                (inner.doc.save_incremental(), false, seq)
            }
        };
        let result = if compact {
            file::write_snapshot(path, &chunk)
        } else {
            file::append_chunk(path, &chunk)
        };
        let mut inner = self.inner.lock().unwrap();
        match result {
            Ok(()) => {
                if compact {
                    inner.snapshot_bytes = chunk.len() as u64;
                    inner.tail_bytes = 0;
                    inner.snapshot_due = false;
                } else {
                    inner.tail_bytes += chunk.len() as u64;
                }
                drop(inner);
                if compact {
                    drop(chunk);
                    memory::give_back();
                }
                self.durable.send_modify(|p| p.durable = p.durable.max(seq));
                Ok(())
            }
            Err(err) => {
                // Not written: make the next flush retry with a full
                // snapshot, which covers the lost chunk.
                inner.unsaved = true;
                inner.snapshot_due = true;
                drop(inner);
                let reason = format!("{err:#}");
                self.durable.send_modify(|p| {
                    p.failures += 1;
                    p.error = reason;
                });
                Err(err)
            }
        }
    }

    /// Flush in the background whenever something changed. No timer: the
    /// writes that arrive while one fsync runs share the next one, which
    /// is all the batching a durable acknowledgement allows.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let kv = self.clone();
        tokio::spawn(async move {
            loop {
                kv.dirty.notified().await;
                let k = kv.clone();
                match tokio::task::spawn_blocking(move || k.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::error!("{} not saved: {err:#}", kv.what);
                        // Retry shortly rather than spin on a full disk.
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        kv.dirty.notify_one();
                    }
                    Err(err) => tracing::error!("{} flush task failed: {err}", kv.what),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ROOT, ReadDoc};

    fn put(store: &DocStore, key: &str) {
        store.write(|d| d.put(ROOT, key, "v").map(drop)).unwrap();
    }

    #[tokio::test]
    async fn a_burst_of_writes_is_one_change_read_at_once_and_saved_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.automerge");
        let store = Arc::new(DocStore::open(Some(path.clone()), "test document").unwrap());
        let flusher = store.spawn_flusher();
        for i in 0..100 {
            put(&store, &format!("k{i}"));
            // Each write reads back before anything is committed.
            assert!(store.read(|d| d.get(ROOT, format!("k{i}")).unwrap().is_some()));
        }
        store.durable().await.unwrap();
        flusher.abort();
        // The flusher (same single-threaded runtime) ran only at the await.
        let changes = store.inner.lock().unwrap().doc.get_changes(&[]).len();
        assert_eq!(changes, 1, "{changes} changes for 100 writes");
        let reopened = DocStore::open(Some(path), "test document").unwrap();
        let keys = reopened.read(|d| d.keys(ROOT).count());
        assert_eq!(keys, 100);
    }

    #[tokio::test]
    async fn a_write_that_cannot_be_saved_is_refused_then_saved_on_retry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.automerge");
        let store = Arc::new(DocStore::open(Some(path.clone()), "test document").unwrap());
        // Every write to the file now fails with "no space left on device".
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let flusher = store.spawn_flusher();
        put(&store, "first");
        let err = store.durable().await.unwrap_err().to_string();
        assert!(err.contains("space"), "{err}");
        // The flusher retries with a full snapshot (temp file + rename),
        // which replaces the broken file: later writes are acknowledged,
        // and the refused one is saved too.
        put(&store, "second");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.durable().await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never saved");
            put(&store, "again");
        }
        flusher.abort();
        let reopened = DocStore::open(Some(path), "test document").unwrap();
        for key in ["first", "second"] {
            assert!(
                reopened.read(|d| d.get(ROOT, key).unwrap().is_some()),
                "{key}"
            );
        }
    }
}
