//! Embeds the Lua guest precompiled for the build's target when the build
//! provides one (`COVEY_LUA_GUEST_CWASM=path`, from `covey compile
//! --lua-guest`; `dist/cross.sh` does this for 32-bit ARM). Without it the
//! embedded artifact is empty and a node compiles the guest at first start.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=COVEY_LUA_GUEST_CWASM");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("lua-guest.cwasm");
    match std::env::var_os("COVEY_LUA_GUEST_CWASM").filter(|p| !p.is_empty()) {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo:rerun-if-changed={}", src.display());
            std::fs::copy(&src, &dest)
                .unwrap_or_else(|e| panic!("COVEY_LUA_GUEST_CWASM={}: {e}", src.display()));
        }
        None => std::fs::write(&dest, b"").expect("writing OUT_DIR/lua-guest.cwasm"),
    }
}
