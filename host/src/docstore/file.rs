//! The store's file: an Automerge snapshot followed by appended change
//! chunks; loading with recovery of a corrupted file.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use automerge::{AutoCommit, LoadOptions, OnPartialLoad, ROOT, ReadDoc};

use crate::clock::now_ms;

/// Load the document; on corruption keep the valid prefix, move the bad file
/// aside (never delete it) and write the salvaged state as a new snapshot.
pub fn load_or_recover(path: &Path, what: &str) -> Result<(AutoCommit, u64)> {
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
                "{what} file {} is corrupted ({err}); kept {} readable entries, moved the file to {}",
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

pub fn append_chunk(path: &Path, chunk: &[u8]) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    // Owner-only, like everything in the data directory.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(chunk)?;
    f.sync_data()?;
    Ok(())
}

pub fn write_snapshot(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::files::write_atomic(path, bytes, crate::files::Mode::Private)
        .with_context(|| format!("writing {}", path.display()))
}
