//! Whole-file writes that survive a crash: the one way Covey replaces a
//! file (stores, blobs, the cache, tokens, synced scripts).
//!
//! Temp file beside the target (hidden, so watchers ignore it), written and
//! fsynced, renamed over the target, then the directory fsynced so the
//! rename itself is durable. Readers see the old contents or the new,
//! never a part; after a power cut, the same.

use std::io::{self, Write};
use std::path::Path;

use cap_std::fs::{Dir, OpenOptions};

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The process umask decides (usually everyone may read): the scripts
    /// directory, `covey compile` output.
    Shared,
    /// This user only (0600): everything in a node's data directory.
    Private,
}

/// Create `dir` (and missing parents) and make it this user's only
/// (0700): a node's data directory holds device keys, tokens and the
/// store.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    Ok(())
}

/// Take group and other permissions off everything under `dir` (made by an
/// older Covey, or by hand); symlinks are left alone. How many entries
/// changed.
pub fn make_private(dir: &Path) -> io::Result<usize> {
    let mut changed = 0;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let meta = entry.path().symlink_metadata()?;
                if meta.file_type().is_symlink() {
                    continue;
                }
                if meta.is_dir() {
                    pending.push(entry.path());
                }
                let mode = meta.permissions().mode();
                if mode & 0o077 != 0 {
                    let private = std::fs::Permissions::from_mode(mode & 0o700);
                    std::fs::set_permissions(entry.path(), private)?;
                    changed += 1;
                }
            }
        }
    }
    Ok(changed)
}

/// Replace `path` with `bytes` (see the module comment); its directory is
/// created if missing.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: Mode) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path without a file name"))?;
    std::fs::create_dir_all(parent)?;
    let dir = Dir::open_ambient_dir(parent, cap_std::ambient_authority())?;
    write_atomic_in(&dir, Path::new(name), bytes, mode)
}

/// Replace `rel` inside `dir` with `bytes`, never leaving `dir` (the
/// directory handle resolves `rel` and refuses paths that escape it).
pub fn write_atomic_in(dir: &Dir, rel: &Path, bytes: &[u8], mode: Mode) -> io::Result<()> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path without a file name"))?;
    let parent = match rel.parent() {
        Some(p) if !p.as_os_str().is_empty() => {
            dir.create_dir_all(p)?;
            dir.open_dir(p)?
        }
        _ => dir.try_clone()?,
    };
    let tmp = format!(".{}.covey-tmp", name.to_string_lossy());
    // A temp file left by a crash (or anything else by that name) goes;
    // `create_new` then never opens through a symlink.
    match parent.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if mode == Mode::Private {
        use cap_std::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = parent.open_with(&tmp, &opts)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    parent.rename(&tmp, &parent, name)?;
    // Make the rename durable (not supported everywhere: best effort).
    let _ = parent.into_std_file().sync_all();
    Ok(())
}

/// Lower-case hex of `bytes`: hashes, secrets and fingerprints as text.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Bytes of hex text (either case); none if it is not an even number of
/// hex digits.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_keeps_secrets_private() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a/b/file");
        write_atomic(&p, b"one", Mode::Shared).unwrap();
        write_atomic(&p, b"two", Mode::Private).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("a/b"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file"]);
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}
