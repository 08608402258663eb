//! `KvDoc`: the node's key-value store, an Automerge document persisted in
//! the data directory.
//!
//! Layout: keys live directly in the document's root map. (A nested "kv" map
//! created independently on two nodes would be two different objects, and
//! one replica's keys would vanish behind the other's on merge.) Values are
//! `Bytes` scalars; counters are per-node slots summed on read (see
//! [`layout`]), so increments from any number of nodes merge additively.
//!
//! Persistence and durability are [`DocStore`]'s: a script's write is
//! acknowledged only once it is on disk ([`KvDoc::durable`]).
//!
//! Replication (`crate::docsync`) plugs in below this API: it merges remote
//! changes into the same document with Automerge's sync protocol and
//! [`KvDoc`]'s `SyncTarget` reports changed keys through the same
//! `Router::kv_changed` path as local writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ReadDoc, ScalarValue, Value};

use crate::docstore::DocStore;
use crate::router::Router;

pub mod epoch;
mod layout;
pub mod quota;
mod replication;

pub use replication::{Compaction, epoch_zero_message};

use layout::slot_key;
use quota::Ledger;

/// Size limits enforced on writes, and each script's quota (see
/// [`quota`]).
#[derive(Clone, Copy, Debug)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Keys one script may hold.
    pub quota_keys: u64,
    /// Bytes (keys + values) one script may hold.
    pub quota_bytes: u64,
    /// Changes in the history past which it is compacted (once every
    /// member holds them; see [`epoch`]).
    pub compact_after: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_bytes: 1024,
            max_value_bytes: 1 << 20,
            quota_keys: 10_000,
            quota_bytes: 16 << 20,
            compact_after: 5_000,
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
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
}

pub struct KvDoc {
    store: Arc<DocStore>,
    /// This node's name: its counter slots carry it.
    node: String,
    limits: KvLimits,
    router: Arc<Router>,
    /// What each script holds; locked across a write's check and charge.
    ledger: Mutex<Ledger>,
    /// The epoch of the history (see [`epoch`]), kept beside the document.
    epoch: Mutex<epoch::EpochInfo>,
}

impl KvDoc {
    /// Open (or create) the store at `path`; `None` keeps it in memory.
    pub fn open(path: Option<PathBuf>, limits: KvLimits, router: Arc<Router>) -> Result<Self> {
        let store = Arc::new(DocStore::open(path, "key-value store")?);
        store.name_actor(router.node_name());
        let (info, _) = store.inspect(epoch::EpochInfo::read);
        // Reading the history's metadata allocated it all once.
        crate::memory::give_back();
        let kv = KvDoc {
            store,
            node: router.node_name().to_string(),
            limits,
            router,
            ledger: Mutex::new(Ledger::default()),
            epoch: Mutex::new(info),
        };
        kv.join_members();
        Ok(kv)
    }

    pub fn limits(&self) -> KvLimits {
        self.limits
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.store.read(|doc| layout::read(doc, key))
    }

    /// Keys starting with `prefix`, sorted, counters included.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.store.read(|doc| layout::keys(doc, prefix))
    }

    /// A counter's slots per node, every value each holds (more than
    /// one: conflicting writes); for diagnosing a counter that reads wrong.
    pub fn counter_slots(&self, key: &str) -> Vec<(String, Vec<i64>)> {
        self.store.read(|doc| layout::counter_slots(doc, key))
    }

    pub fn len(&self) -> usize {
        self.keys("").len()
    }

    /// Bytes of all keys and their values (as `get` returns them).
    pub fn bytes(&self) -> u64 {
        self.store.read(|doc| {
            (layout::keys(doc, "").iter())
                .map(|k| k.len() as u64 + layout::read(doc, k).map_or(0, |v| v.len() as u64))
                .sum()
        })
    }

    /// Writes and file size of the store (metrics).
    pub fn store_stats(&self) -> crate::docstore::StoreStats {
        self.store.stats()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Set `key` (not on any script's behalf: no quota).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.set_by(None, key, value)
    }

    /// Set `key` on `writer`'s behalf, within its quota.
    pub fn set_by(&self, writer: Option<&str>, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.check_key(key)?;
        if value.len() > self.limits.max_value_bytes {
            return Err(KvError::ValueTooLarge(self.limits.max_value_bytes as u64));
        }
        let bytes = (key.len() + value.len()) as u64;
        self.charged(writer, key, bytes, || {
            self.write(|doc| {
                // A value replaces a counter: its slots go.
                layout::delete_slots(doc, key).map_err(storage)?;
                doc.put(ROOT, key, ScalarValue::Bytes(value.to_vec()))
                    .map_err(storage)
            })
        })?;
        self.router.kv_changed(key, Some(value));
        Ok(())
    }

    /// Run `write` if `writer` may hold `bytes` at `key`, and charge it.
    fn charged<R>(
        &self,
        writer: Option<&str>,
        key: &str,
        bytes: u64,
        write: impl FnOnce() -> Result<R, KvError>,
    ) -> Result<R, KvError> {
        let mut ledger = self.ledger.lock().unwrap();
        if let Some(w) = writer {
            let l = &self.limits;
            ledger.check(w, key, bytes, l.quota_keys, l.quota_bytes)?;
        }
        let r = write()?;
        match writer {
            Some(w) => ledger.charge(w, key, bytes),
            None => ledger.release(key),
        }
        Ok(r)
    }

    /// Keys and bytes `writer` holds (see [`quota`]).
    pub fn usage(&self, writer: &str) -> (u64, u64) {
        self.ledger.lock().unwrap().usage(writer)
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
            self.ledger.lock().unwrap().release(key);
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
        self.incr_by(None, key, delta)
    }

    /// [`KvDoc::incr`] on `writer`'s behalf, within its quota.
    pub fn incr_by(&self, writer: Option<&str>, key: &str, delta: i64) -> Result<i64, KvError> {
        self.check_key(key)?;
        let bytes = key.len() as u64 + quota::COUNTER_BYTES;
        self.charged(writer, key, bytes, || self.incr_doc(key, delta))
    }

    fn incr_doc(&self, key: &str, delta: i64) -> Result<i64, KvError> {
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
        self.store.write(f)
    }

    /// Wait until every write made before this call is on disk (fsynced).
    pub async fn durable(&self) -> Result<(), KvError> {
        self.store
            .durable()
            .await
            .map_err(|e| KvError::Storage(e.to_string()))
    }

    /// The document's current heads (equal on two nodes = same contents).
    pub fn heads(&self) -> Vec<automerge::ChangeHash> {
        self.store.heads()
    }

    /// Append unsaved changes to the file and fsync (blocking).
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    pub fn spawn_flusher(&self) -> tokio::task::JoinHandle<()> {
        self.store.spawn_flusher()
    }
}

fn storage(e: automerge::AutomergeError) -> KvError {
    KvError::Storage(e.to_string())
}

#[cfg(test)]
mod tests;
