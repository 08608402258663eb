//! The scripts directory as a place peers may write to: the one rule for
//! the names in it ([`ScriptPath`]) and file operations that cannot leave
//! it ([`ScriptDir`]).
//!
//! Paths in the scripts manifest come from peers, and a peer is only as
//! trustworthy as the least careful script author on it. So every path is
//! checked twice, at different depths: a manifest entry whose path breaks
//! the rule is refused before anything is done with it, and the file
//! operations themselves take only a [`ScriptPath`] (which only
//! [`ScriptPath::parse`] makes) and run through a `cap-std` directory
//! handle, which resolves every path component itself and refuses any
//! that leads outside — a symlinked directory pointing elsewhere, a `..`
//! that slipped through — instead of trusting the kernel's path walk.

use std::io;
use std::path::{Path, PathBuf};

use cap_std::fs::Dir;

use crate::files;

/// Longest path accepted, in bytes (Linux allows 4096; nothing legitimate
/// in a scripts directory comes close to this).
pub const MAX_PATH: usize = 1024;
/// Longest single name, in bytes (the common file-system limit).
pub const MAX_NAME: usize = 255;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 32;

/// Names every part of Covey ignores in the scripts directory: hidden
/// files and directories and editor temporaries. Never synced, never run,
/// and never written on a peer's behalf (Covey's own temp files are
/// hidden, so a peer cannot aim at them either).
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
        || [".swp", ".swx", ".tmp"].iter().any(|s| name.ends_with(s))
}

/// Why a path is not acceptable inside the scripts directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path of {0} bytes (limit {MAX_PATH})")]
    TooLong(usize),
    #[error("absolute path")]
    Absolute,
    #[error("backslash or drive letter (Windows path syntax)")]
    WindowsSyntax,
    #[error("NUL or control character")]
    Control,
    #[error("`..` component")]
    Parent,
    #[error("empty or `.` component")]
    EmptyComponent,
    #[error("hidden or temporary name {0:?}")]
    Ignored(String),
    #[error("name of {0} bytes (limit {MAX_NAME})")]
    NameTooLong(usize),
    #[error("more than {MAX_DEPTH} levels deep")]
    TooDeep,
}

impl PathError {
    /// A short stable label, for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::Empty => "empty",
            PathError::TooLong(_) | PathError::NameTooLong(_) | PathError::TooDeep => "too-long",
            PathError::Absolute => "absolute",
            PathError::WindowsSyntax => "windows-syntax",
            PathError::Control => "control-char",
            PathError::Parent => "parent",
            PathError::EmptyComponent => "empty-component",
            PathError::Ignored(_) => "ignored-name",
        }
    }
}

/// A path relative to the scripts directory, `/`-separated, that passed
/// the rule: normal components only, nothing hidden or temporary, within
/// the length limits. The only way to name a file for [`ScriptDir`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScriptPath(String);

impl ScriptPath {
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.len() > MAX_PATH {
            return Err(PathError::TooLong(s.len()));
        }
        if s.chars().any(|c| c.is_control()) {
            return Err(PathError::Control);
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute);
        }
        // `\` is a separator on Windows and `C:` a drive (`C:x` is relative
        // to that drive's current directory): refused everywhere, so a
        // path means the same on every node.
        if s.contains('\\') || s.contains(':') {
            return Err(PathError::WindowsSyntax);
        }
        let mut depth = 0;
        for name in s.split('/') {
            match name {
                "" | "." => return Err(PathError::EmptyComponent),
                ".." => return Err(PathError::Parent),
                n if n.len() > MAX_NAME => return Err(PathError::NameTooLong(n.len())),
                n if is_ignored_name(n) => return Err(PathError::Ignored(n.to_string())),
                _ => depth += 1,
            }
        }
        if depth > MAX_DEPTH {
            return Err(PathError::TooDeep);
        }
        Ok(ScriptPath(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl std::fmt::Display for ScriptPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `text` (a node name from a peer, say) made safe as part of one file
/// name: letters, digits, `-`, `_` and `.` kept, anything else `_`, at
/// most 63 bytes, never hidden. Honest node names pass through unchanged.
pub fn name_part(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .take(63)
        .collect();
    match s.trim_start_matches('.') {
        "" => "unnamed".to_string(),
        t => t.to_string(),
    }
}

/// The scripts directory, for writes made on peers' behalf: every
/// operation stays inside it (see the module comment).
pub struct ScriptDir {
    root: PathBuf,
}

impl ScriptDir {
    pub fn new(root: &Path) -> Self {
        ScriptDir {
            root: root.to_path_buf(),
        }
    }

    /// Opened for each operation, so a scripts directory that is replaced
    /// while the node runs is still the one written to.
    fn open(&self) -> io::Result<Dir> {
        std::fs::create_dir_all(&self.root)?;
        Dir::open_ambient_dir(&self.root, cap_std::ambient_authority())
    }

    /// Replace the file at `path` atomically and durably.
    pub fn write(&self, path: &ScriptPath, bytes: &[u8]) -> io::Result<FileStat> {
        let dir = self.open()?;
        files::write_atomic_in(&dir, path.as_path(), bytes, files::Mode::Shared)?;
        dir.metadata(path.as_path()).map(|m| FileStat::of(&m))
    }

    /// Size and modification time of the file at `path`.
    pub fn stat(&self, path: &ScriptPath) -> io::Result<FileStat> {
        self.open()?
            .metadata(path.as_path())
            .map(|m| FileStat::of(&m))
    }

    /// The file's contents (none if it is missing or not readable).
    pub fn read(&self, path: &ScriptPath) -> Option<Vec<u8>> {
        self.open().ok()?.read(path.as_path()).ok()
    }

    /// Remove the file at `path` (a symlink there is removed itself, never
    /// followed).
    pub fn remove(&self, path: &ScriptPath) -> io::Result<()> {
        self.open()?.remove_file(path.as_path())
    }
}

/// Size and modification time of a file, as recorded to recognise it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: u128,
}

impl FileStat {
    fn of(meta: &cap_std::fs::Metadata) -> Self {
        Self::new(meta.len(), meta.modified().ok().map(|t| t.into_std()))
    }

    pub fn of_std(meta: &std::fs::Metadata) -> Self {
        Self::new(meta.len(), meta.modified().ok())
    }

    fn new(size: u64, modified: Option<std::time::SystemTime>) -> Self {
        FileStat {
            size,
            mtime_ns: modified
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        }
    }
}

/// Files under `dir`, as (relative `/` path, full path); hidden and
/// temporary files (and directories) are skipped.
pub fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_ignored_name(&name) {
            continue;
        }
        let path = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(root, &path, out),
            Ok(t) if t.is_file() => {
                if let Ok(rel) = path.strip_prefix(root) {
                    let rel = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy())
                        .collect::<Vec<_>>()
                        .join("/");
                    out.push((rel, path));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_rule() {
        for ok in [
            "a.lua",
            "deep/er/greet.lua",
            "notes.txt",
            "lib/util.lua",
            "a..b.lua",
            "x.conflict-n1-0123abcd",
        ] {
            assert_eq!(ScriptPath::parse(ok).unwrap().as_str(), ok);
        }
        let bad = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("../x.lua", PathError::Parent),
            ("a/../../x.lua", PathError::Parent),
            ("a/..", PathError::Parent),
            ("a//b.lua", PathError::EmptyComponent),
            ("a/./b.lua", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("a\\..\\b.lua", PathError::WindowsSyntax),
            ("C:x.lua", PathError::WindowsSyntax),
            ("a\0b.lua", PathError::Control),
            ("a\nb.lua", PathError::Control),
            (".ssh/authorized_keys", PathError::Ignored(".ssh".into())),
            (
                "a/.b.lua.covey-tmp",
                PathError::Ignored(".b.lua.covey-tmp".into()),
            ),
            ("a.lua~", PathError::Ignored("a.lua~".into())),
            ("#a#", PathError::Ignored("#a#".into())),
        ];
        for (path, why) in bad {
            assert_eq!(ScriptPath::parse(path), Err(why), "{path:?}");
        }
        let long_name = "n".repeat(MAX_NAME + 1);
        assert_eq!(
            ScriptPath::parse(&long_name),
            Err(PathError::NameTooLong(MAX_NAME + 1))
        );
        let long_path = vec!["abcdefgh"; 200].join("/");
        assert!(matches!(
            ScriptPath::parse(&long_path),
            Err(PathError::TooLong(_))
        ));
        let deep = vec!["a"; MAX_DEPTH + 1].join("/");
        assert_eq!(ScriptPath::parse(&deep), Err(PathError::TooDeep));
    }

    #[test]
    fn name_parts_from_peer_data() {
        assert_eq!(name_part("pi-kitchen.1"), "pi-kitchen.1");
        assert_eq!(name_part("../../etc"), "_.._etc");
        assert_eq!(name_part("a/b\0c"), "a_b_c");
        assert_eq!(name_part(".."), "unnamed");
        assert_eq!(name_part(""), "unnamed");
        assert_eq!(name_part(&"x".repeat(500)).len(), 63);
    }

    #[test]
    fn writes_and_deletes_never_leave_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("scripts");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim.lua"), "keep me").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim.lua"), root.join("file-link.lua")).unwrap();
        let dir = ScriptDir::new(&root);
        let p = |s| ScriptPath::parse(s).unwrap();

        // Through a symlinked directory: refused, nothing written outside.
        assert!(dir.write(&p("link/pwn.lua"), b"x").is_err());
        assert!(!outside.join("pwn.lua").exists());
        assert!(dir.remove(&p("link/victim.lua")).is_err());
        assert!(dir.read(&p("link/victim.lua")).is_none());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim.lua")).unwrap(),
            "keep me"
        );

        // A symlink as the file itself: replaced or removed, not followed.
        dir.write(&p("file-link.lua"), b"new").unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("victim.lua")).unwrap(),
            "keep me"
        );
        assert_eq!(std::fs::read(root.join("file-link.lua")).unwrap(), b"new");

        // Ordinary nested writes and deletes work.
        let st = dir.write(&p("a/b/c.lua"), b"hello").unwrap();
        assert_eq!(st.size, 5);
        assert_eq!(dir.read(&p("a/b/c.lua")).unwrap(), b"hello");
        dir.remove(&p("a/b/c.lua")).unwrap();
        assert!(!root.join("a/b/c.lua").exists());
    }
}
