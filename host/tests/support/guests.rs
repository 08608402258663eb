//! Locating the guest scripts built from `guest-examples` (shared by the
//! integration tests and the benchmark through `#[path]`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The example guests written in other languages than Rust.
pub const OTHER_LANGUAGES: [&str; 2] = ["python-hello", "js-hello"];

/// Path of a built guest (`name` as in `guest-examples`, e.g. `echo`).
/// Builds the guest workspace once per test run if needed.
pub fn guest(name: &str) -> PathBuf {
    if OTHER_LANGUAGES.contains(&name) {
        return other_language_guest(name);
    }
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--target", "wasm32-wasip2", "--release"])
            .current_dir(root.join("guest-examples"))
            .status()
            .expect("running cargo to build the guest scripts");
        assert!(
            status.success(),
            "building guest-examples failed; is the wasm32-wasip2 target installed? \
             (rustup target add wasm32-wasip2)"
        );
        root.join("target/wasm32-wasip2/release")
    });
    // Libraries are named with `_`, binaries keep their `-`.
    let base = name.rsplit('/').next().unwrap();
    let path = dir.join(format!("{}.wasm", base.replace('-', "_")));
    let path = if path.exists() {
        path
    } else {
        dir.join(format!("{base}.wasm"))
    };
    assert!(
        path.exists(),
        "guest {} not found at {}",
        name,
        path.display()
    );
    path
}

/// Path of an example guest written in Python or JavaScript, built by
/// `guest-examples/build-other-languages.sh` once per run (which installs
/// componentize-py and componentize-js on first use, and rebuilds only
/// what changed).
fn other_language_guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = std::process::Command::new("bash")
            .arg(root.join("guest-examples/build-other-languages.sh"))
            .status()
            .expect("running bash to build the Python and JavaScript guests");
        assert!(
            status.success(),
            "building the Python and JavaScript guests failed: they need python3 \
             (with venv), node and npm (bash .ci/test installs what is missing)"
        );
        root.join("target/guests")
    });
    dir.join(format!("{name}.wasm"))
}
