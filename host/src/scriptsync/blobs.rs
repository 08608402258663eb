//! `BlobStore`: script file contents by content hash, in `<data>/blobs`.
//!
//! The manifest holds only hashes; contents travel between nodes on
//! request, once per node (a node that has a blob never fetches it again).

use std::path::PathBuf;

use anyhow::{Context, Result};

pub type Hash = [u8; 32];

pub fn hash(bytes: &[u8]) -> Hash {
    *blake3::hash(bytes).as_bytes()
}

pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(BlobStore { dir })
    }

    fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hex(hash))
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
        write_atomic(&path, bytes)
    }
}

/// Write a file so readers see the old contents or the new, never a part:
/// temp file in the same directory, fsync, rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path without a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.covey-tmp"));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
