//! `KvDoc`: the node's key-value store, an Automerge document persisted in
//! the data directory.
//!
//! Layout: keys live directly in the document's root map. (A nested "kv" map
//! created independently on two nodes would be two different objects, and
//! one replica's keys would vanish behind the other's on merge.) Values are
//! `Bytes` scalars; counters are per-node slots summed on read (see
//! [`layout`]), so increments from any number of nodes merge additively.
//!
//! Persistence ([`file`]): the file is an Automerge snapshot followed by
//! incremental change chunks, which `load` reads back as one document. A
//! flusher appends what changed (`fsync` per batch) and compacts the file
//! into a fresh snapshot (temp file + rename) when the appended tail
//! outgrows the snapshot. A script's write is acknowledged only once it is
//! on disk ([`KvDoc::durable`]). A corrupted file is moved aside and its
//! valid prefix kept.
//!
//! Replication (`crate::kvsync`) plugs in below this API: it merges remote
//! changes into the same document with Automerge's sync protocol
//! ([`KvDoc::sync_generate`], [`KvDoc::sync_receive`]) and reports changed
//! keys through the same `Router::kv_changed` path as local writes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ROOT, ReadDoc, ScalarValue, Value};
use tokio::sync::{Notify, watch};

use crate::router::Router;

mod file;
mod layout;

use layout::slot_key;

/// Size limits enforced on writes.
#[derive(Clone, Copy, Debug)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
        }
    }
}

/// Why a write was refused (mirrors the WIT `kv-error`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("value of {0} bytes is over the limit")]
    ValueTooLarge(u64),
    #[error("`{0}` holds a value that is not a counter")]
    NotACounter(String),
    #[error("storage error: {0}")]
    Storage(String),
}

struct Inner {
    doc: AutoCommit,
    /// Changes not yet appended to the file.
    unsaved: bool,
    /// Bytes of the snapshot at the start of the file, and of the appended
    /// tail after it: compaction is due when the tail outgrows the snapshot.
    snapshot_bytes: u64,
    tail_bytes: u64,
}

pub struct KvDoc {
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
    /// This node's name: its counter slots carry it.
    node: String,
    /// Serialises file I/O (flushes and compactions).
    io: Mutex<()>,
    dirty: Notify,
    /// Sequence number of the last local write, and of the last one known
    /// to be on disk: a write is acknowledged once `durable >= its seq`.
    written: AtomicU64,
    durable: watch::Sender<u64>,
    /// Bumped on every change, local or merged: replication listens.
    version: watch::Sender<u64>,
    limits: KvLimits,
    router: Arc<Router>,
}

impl KvDoc {
    /// Open (or create) the store at `path`; `None` keeps it in memory.
    pub fn open(path: Option<PathBuf>, limits: KvLimits, router: Arc<Router>) -> Result<Self> {
        let (doc, snapshot_bytes) = match &path {
            Some(p) => file::load_or_recover(p)?,
            None => (AutoCommit::new(), 0),
        };
        let kv = KvDoc {
            inner: Mutex::new(Inner {
                doc,
                unsaved: false,
                snapshot_bytes,
                tail_bytes: 0,
            }),
            path,
            node: router.node_name().to_string(),
            io: Mutex::new(()),
            dirty: Notify::new(),
            written: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            version: watch::Sender::new(0),
            limits,
            router,
        };
        Ok(kv)
    }

    pub fn limits(&self) -> KvLimits {
        self.limits
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let inner = self.inner.lock().unwrap();
        layout::read(&inner.doc, key)
    }

    /// Keys starting with `prefix`, sorted, counters included.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        layout::keys(&inner.doc, prefix)
    }

    pub fn len(&self) -> usize {
        self.keys("").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge(self.limits.max_value_bytes as u64));
        }
        self.write(|doc| {
            // A value replaces a counter: its slots go.
            layout::delete_slots(doc, key).map_err(storage)?;
            doc.put(ROOT, key, ScalarValue::Bytes(value.to_vec()))
                .map_err(storage)
        })?;
        self.router.kv_changed(key, Some(value));
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        self.check_key(key)?;
        let existed = self.write(|doc| {
            let mut existed = layout::delete_slots(doc, key).map_err(storage)?;
            if doc.get(ROOT, key).map_err(storage)?.is_some() {
                doc.delete(ROOT, key).map_err(storage)?;
                existed = true;
            }
            Ok(existed)
        })?;
        if existed {
            self.router.kv_changed(key, None);
        }
        Ok(existed)
    }

    /// Add `delta` to the counter `key` (created at 0) and return its value.
    ///
    /// A counter is one slot per node (`\0c\0key\0node`), each written only
    /// by its node, and reads as the sum: increments on several nodes, even
    /// creating the counter at once on both sides of a partition, merge
    /// without loss (an Automerge counter created concurrently on two nodes
    /// would be two conflicting values, and one side's increments would be
    /// hidden).
    pub fn incr(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        self.check_key(key)?;
        let node = self.node.clone();
        let value = self.write(|doc| {
            let mut carried = 0;
            match doc.get(ROOT, key).map_err(storage)? {
                None => {}
                // A counter from before slots: fold it into this node's slot.
                Some((Value::Scalar(s), _)) if matches!(*s, ScalarValue::Counter(_)) => {
                    carried = layout::scalar_i64(&s).unwrap_or(0);
                    doc.delete(ROOT, key).map_err(storage)?;
                }
                Some(_) => return Err(KvError::NotACounter(key.to_string())),
            }
            let slot = slot_key(key, &node);
            let mine = match doc.get(ROOT, slot.as_str()).map_err(storage)? {
                Some((Value::Scalar(s), _)) => layout::scalar_i64(&s).unwrap_or(0),
                _ => 0,
            };
            let next = mine.wrapping_add(carried).wrapping_add(delta);
            doc.put(ROOT, slot.as_str(), ScalarValue::Int(next))
                .map_err(storage)?;
            Ok(layout::counter_sum(doc, key).unwrap_or(next))
        })?;
        self.router
            .kv_changed(key, Some(value.to_string().as_bytes()));
        Ok(value)
    }

    fn check_key(&self, key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidKey("the key is empty".into()));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(KvError::InvalidKey(format!(
                "the key is {} bytes; the limit is {}",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        if key.contains('\0') {
            return Err(KvError::InvalidKey(
                "keys cannot contain the NUL character".into(),
            ));
        }
        Ok(())
    }

    fn write<R>(
        &self,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, KvError>,
    ) -> Result<R, KvError> {
        let mut inner = self.inner.lock().unwrap();
        let r = f(&mut inner.doc)?;
        inner.doc.commit();
        inner.unsaved = true;
        self.written.fetch_add(1, Ordering::AcqRel);
        drop(inner);
        self.dirty.notify_one();
        self.version.send_modify(|v| *v += 1);
        Ok(r)
    }

    /// Wait until every write made before this call is on disk (fsynced).
    /// Returns at once for an in-memory store.
    pub async fn durable(&self) -> Result<(), KvError> {
        if self.path.is_none() {
            return Ok(());
        }
        let want = self.written.load(Ordering::Acquire);
        let mut rx = self.durable.subscribe();
        rx.wait_for(|done| *done >= want)
            .await
            .map(drop)
            .map_err(|_| KvError::Storage("the store is shutting down".into()))
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

    /// Apply a peer's sync message; scripts watching a changed key are told,
    /// exactly once per key per merge, as for a local write.
    pub fn sync_receive(&self, state: &mut sync::State, msg: &[u8]) -> Result<usize> {
        let msg = sync::Message::decode(msg)?;
        let changed: Vec<String> = {
            let mut inner = self.inner.lock().unwrap();
            let before: Vec<ChangeHash> = inner.doc.get_heads();
            inner.doc.sync().receive_sync_message(state, msg)?;
            let after = inner.doc.get_heads();
            if before == after {
                return Ok(0);
            }
            inner.unsaved = true;
            let keys = layout::changed_keys(&mut inner.doc, &before, &after);
            keys.into_iter().collect()
        };
        self.dirty.notify_one();
        self.version.send_modify(|v| *v += 1);
        for key in &changed {
            let value = self.get(key);
            self.router.kv_changed(key, value.as_deref());
        }
        Ok(changed.len())
    }

    /// The whole document, for tests and convergence checks.
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
                self.durable.send_if_modified(|d| {
                    let newer = seq > *d;
                    *d = (*d).max(seq);
                    newer
                });
                return Ok(());
            }
            inner.unsaved = false;
            let compact = inner.tail_bytes > (1 << 20).max(inner.snapshot_bytes);
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
                } else {
                    inner.tail_bytes += chunk.len() as u64;
                }
                drop(inner);
                self.durable.send_modify(|d| *d = (*d).max(seq));
                Ok(())
            }
            Err(err) => {
                // Not written: make the next flush retry with a full
                // snapshot, which covers the lost chunk.
                inner.unsaved = true;
                inner.tail_bytes = u64::MAX / 2;
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
                        tracing::error!("key-value store not saved: {err:#}");
                        // Retry shortly rather than spin on a full disk.
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        kv.dirty.notify_one();
                    }
                    Err(err) => tracing::error!("key-value flush task failed: {err}"),
                }
            }
        })
    }
}

fn storage(e: automerge::AutomergeError) -> KvError {
    KvError::Storage(e.to_string())
}
