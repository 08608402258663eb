//! Embeds the Lua guest precompiled for the build's target when the build
//! provides one (`COVEY_LUA_GUEST_CWASM=path`, from `covey compile
//! --lua-guest`; `dist/cross.sh` does this for 32-bit ARM). Without it the
//! embedded artifact is empty and a node compiles the guest at first start.
//!
//! The artifact is stored deflated: Pulley bytecode compresses to 40 %
//! (1.9 MB → 0.8 MB for the Lua guest), which is what keeps the 32-bit
//! binaries under 20 MB; a node inflates it once, at its first `.lua`.
use std::io::Write;
use std::path::PathBuf;

fn main() {
    fold_identical_code();
    println!("cargo:rerun-if-env-changed=COVEY_LUA_GUEST_CWASM");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("lua-guest.cwasm.deflate");
    let artifact = match std::env::var_os("COVEY_LUA_GUEST_CWASM").filter(|p| !p.is_empty()) {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo:rerun-if-changed={}", src.display());
            std::fs::read(&src)
                .unwrap_or_else(|e| panic!("COVEY_LUA_GUEST_CWASM={}: {e}", src.display()))
        }
        None => Vec::new(),
    };
    let deflated = if artifact.is_empty() {
        Vec::new()
    } else {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&artifact).expect("deflating in memory");
        enc.finish().expect("deflating in memory")
    };
    std::fs::write(&dest, deflated).expect("writing OUT_DIR/lua-guest.cwasm.deflate");
}

/// Release binaries for x86_64 Linux are linked with identical functions
/// folded into one (LLD's `--icf=all`; rustc links with its own LLD there
/// by default since 1.90): 210 KB less, which keeps the binary under 20 MB.
/// Rust code never relies on two functions having different addresses.
/// `COVEY_NO_ICF=1` turns it off, for a build with another linker.
fn fold_identical_code() {
    println!("cargo:rerun-if-env-changed=COVEY_NO_ICF");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("TARGET") == "x86_64-unknown-linux-gnu"
        && var("PROFILE") == "release"
        && std::env::var_os("COVEY_NO_ICF").is_none()
    {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
}
