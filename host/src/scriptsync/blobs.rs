//! `BlobStore`: script file contents by content hash, in `<data>/blobs`.
//!
//! The manifest holds only hashes; contents travel between nodes on
//! request, once per node (a node that has a blob never fetches it again).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

pub type Hash = [u8; 32];

pub fn hash(bytes: &[u8]) -> Hash {
    *blake3::hash(bytes).as_bytes()
}

pub struct BlobStore {
    dir: PathBuf,
    pub transfers: Transfers,
}

/// Script contents that moved between this node and its peers (metrics).
#[derive(Default, Debug)]
pub struct Transfers {
    /// Blobs fetched from peers, and their bytes.
    pub fetched: AtomicU64,
    pub fetched_bytes: AtomicU64,
    /// Blobs sent to peers that asked, and their bytes.
    pub served: AtomicU64,
    pub served_bytes: AtomicU64,
}

impl Transfers {
    pub fn count(n: &AtomicU64, bytes: &AtomicU64, len: usize) {
        n.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

impl BlobStore {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BlobStore {
            dir,
            transfers: Transfers::default(),
        })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(crate::files::hex(hash))
    }

    pub fn has(&self, hash: &Hash) -> bool {
        self.path(hash).exists()
    }

    /// The blob, if present and intact (a damaged one is removed).
    pub fn get(&self, hash: &Hash) -> Option<Vec<u8>> {
        let path = self.path(hash);
        let bytes = std::fs::read(&path).ok()?;
        if self::hash(&bytes) != *hash {
            tracing::warn!("blob {} is damaged; removing it", path.display());
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(bytes)
    }

    /// Store `bytes` (whose hash the caller checked or computed).
    pub fn put(&self, hash: &Hash, bytes: &[u8]) -> Result<()> {
        let path = self.path(hash);
        if path.exists() {
            return Ok(());
        }
        crate::files::write_atomic(&path, bytes, crate::files::Mode::Private)
            .with_context(|| format!("writing {}", path.display()))
    }
}
