//! `KvDoc`: the node's key-value store, an Automerge document persisted in
//! the data directory.
//!
//! Layout: keys live directly in the document's root map. (A nested "kv" map
//! created independently on two nodes would be two different objects, and
//! one replica's keys would vanish behind the other's on merge.) Values are
//! `Bytes` scalars; counters are Automerge `Counter`s, whose increments merge
//! additively.
//!
//! Persistence: the file is an Automerge snapshot followed by incremental
//! change chunks, which `load` reads back as one document. Writes are
//! appended in small batches by a flusher (`fsync` per batch) and the file is
//! compacted into a fresh snapshot (temp file + rename) when the appended
//! tail outgrows the snapshot. Clean shutdown flushes. A corrupted file is
//! moved aside and its valid prefix kept.
//!
//! Replication (a separate capability) plugs in below this API: it merges
//! remote changes into the same document and reports changed keys through
//! the same `Router::kv_changed` path, so the WIT side does not change.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, LoadOptions, OnPartialLoad, ROOT, ReadDoc, ScalarValue, Value};
use tokio::sync::Notify;

use crate::router::{Router, now_ms};

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
    /// Serialises file I/O (flushes and compactions).
    io: Mutex<()>,
    dirty: Notify,
    limits: KvLimits,
    router: Arc<Router>,
}

impl KvDoc {
    /// Open (or create) the store at `path`; `None` keeps it in memory.
    pub fn open(path: Option<PathBuf>, limits: KvLimits, router: Arc<Router>) -> Result<Self> {
        let (doc, snapshot_bytes) = match &path {
            Some(p) => load_or_recover(p)?,
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
            io: Mutex::new(()),
            dirty: Notify::new(),
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
        read_value(&inner.doc, key)
    }

    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        // Map keys iterate in sorted order, so the prefix is a contiguous range.
        inner
            .doc
            .map_range(ROOT, prefix.to_string()..)
            .map(|item| item.key.to_string())
            .take_while(|k| k.starts_with(prefix))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().doc.length(ROOT)
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
            doc.put(ROOT, key, ScalarValue::Bytes(value.to_vec()))
                .map_err(storage)
        })?;
        self.router.kv_changed(key, Some(value));
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<bool, KvError> {
        self.check_key(key)?;
        let existed = self.write(|doc| {
            if doc.get(ROOT, key).map_err(storage)?.is_none() {
                return Ok(false);
            }
            doc.delete(ROOT, key).map_err(storage)?;
            Ok(true)
        })?;
        if existed {
            self.router.kv_changed(key, None);
        }
        Ok(existed)
    }

    pub fn incr(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        self.check_key(key)?;
        let value = self.write(|doc| {
            match doc.get(ROOT, key).map_err(storage)? {
                None => doc
                    .put(ROOT, key, ScalarValue::counter(delta))
                    .map_err(storage)?,
                Some((Value::Scalar(s), _)) if matches!(*s, ScalarValue::Counter(_)) => {
                    doc.increment(ROOT, key, delta).map_err(storage)?
                }
                Some(_) => return Err(KvError::NotACounter(key.to_string())),
            }
            Ok(counter_value(doc, key).unwrap_or(delta))
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
        drop(inner);
        self.dirty.notify_one();
        Ok(r)
    }

    /// Append unsaved changes to the file and fsync; compact when due.
    /// Blocking: call from `spawn_blocking` or at shutdown.
    pub fn flush(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let _io = self.io.lock().unwrap();
        let (chunk, compact) = {
            let mut inner = self.inner.lock().unwrap();
            if !inner.unsaved {
                return Ok(());
            }
            inner.unsaved = false;
            let compact = inner.tail_bytes > (1 << 20).max(inner.snapshot_bytes);
            if compact {
                (inner.doc.save(), true)
            } else {
                (inner.doc.save_incremental(), false)
            }
        };
        let result = if compact {
            write_snapshot(path, &chunk)
        } else {
            append_chunk(path, &chunk)
        };
        let mut inner = self.inner.lock().unwrap();
        match result {
            Ok(()) if compact => {
                inner.snapshot_bytes = chunk.len() as u64;
                inner.tail_bytes = 0;
                Ok(())
            }
            Ok(()) => {
                inner.tail_bytes += chunk.len() as u64;
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

    /// Flush in the background whenever something changed, batching writes
    /// that arrive within a few milliseconds into one fsync.
    pub fn spawn_flusher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let kv = self.clone();
        tokio::spawn(async move {
            loop {
                kv.dirty.notified().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let k = kv.clone();
                match tokio::task::spawn_blocking(move || k.flush()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::error!("key-value store not saved: {err:#}"),
                    Err(err) => tracing::error!("key-value flush task failed: {err}"),
                }
            }
        })
    }
}

fn storage(e: automerge::AutomergeError) -> KvError {
    KvError::Storage(e.to_string())
}

fn read_value(doc: &AutoCommit, key: &str) -> Option<Vec<u8>> {
    match doc.get(ROOT, key).ok()?? {
        (Value::Scalar(s), _) => Some(match s.as_ref() {
            ScalarValue::Bytes(b) => b.clone(),
            ScalarValue::Str(s) => s.as_bytes().to_vec(),
            ScalarValue::Counter(c) => i64::from(c).to_string().into_bytes(),
            ScalarValue::Int(i) => i.to_string().into_bytes(),
            ScalarValue::Uint(i) => i.to_string().into_bytes(),
            ScalarValue::F64(f) => f.to_string().into_bytes(),
            ScalarValue::Boolean(b) => b.to_string().into_bytes(),
            ScalarValue::Timestamp(t) => t.to_string().into_bytes(),
            ScalarValue::Null | ScalarValue::Unknown { .. } => Vec::new(),
        }),
        (Value::Object(_), _) => None,
    }
}

fn counter_value(doc: &AutoCommit, key: &str) -> Option<i64> {
    match doc.get(ROOT, key).ok()?? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Counter(c) => Some(i64::from(c)),
            _ => None,
        },
        _ => None,
    }
}

/// Load the document; on corruption keep the valid prefix, move the bad file
/// aside (never delete it) and write the salvaged state as a new snapshot.
fn load_or_recover(path: &Path) -> Result<(AutoCommit, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((AutoCommit::new(), 0)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let strict = LoadOptions::new().on_partial_load(OnPartialLoad::Error);
    match AutoCommit::load_with_options(&bytes, strict) {
        Ok(doc) => Ok((doc, bytes.len() as u64)),
        Err(err) => {
            let mut doc = salvage(&bytes);
            let aside = path.with_extension(format!("corrupt-{}", now_ms()));
            std::fs::rename(path, &aside)
                .with_context(|| format!("moving corrupted {} aside", path.display()))?;
            tracing::error!(
                "key-value file {} is corrupted ({err}); kept {} readable keys, moved the file to {}",
                path.display(),
                doc.length(ROOT),
                aside.display()
            );
            let snapshot = doc.save();
            write_snapshot(path, &snapshot)?;
            Ok((doc, snapshot.len() as u64))
        }
    }
}

/// Load chunk by chunk and stop at the first one that is truncated or does
/// not load: everything before it is the valid prefix.
fn salvage(bytes: &[u8]) -> AutoCommit {
    let mut doc = AutoCommit::new();
    let mut rest = bytes;
    while let Some(len) = chunk_len(rest) {
        if doc.load_incremental(&rest[..len]).is_err() {
            break;
        }
        rest = &rest[len..];
    }
    doc
}

/// Length of the Automerge chunk at the start of `bytes`: magic (4 bytes),
/// checksum (4), type (1), LEB128 body length, body. `None` if there is no
/// complete chunk there.
fn chunk_len(bytes: &[u8]) -> Option<usize> {
    const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
    if bytes.len() < 10 || bytes[..4] != MAGIC {
        return None;
    }
    let (mut body, mut shift, mut pos) = (0usize, 0u32, 9usize);
    loop {
        let b = *bytes.get(pos)?;
        pos += 1;
        body |= usize::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
    let end = pos.checked_add(body)?;
    (end <= bytes.len()).then_some(end)
}

fn append_chunk(path: &Path, chunk: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(chunk)?;
    f.sync_data()?;
    Ok(())
}

fn write_snapshot(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
