//! Compiles Lua 5.4 (lua-src's sources, as one translation unit:
//! support/onelua.c) and the setjmp/longjmp runtime into `liblua5.4.a`,
//! which mlua-sys (feature `external`) leaves to us. build.sh passes the
//! sources' directory in `COVEY_LUA_SRC` and the wasm C compiler in
//! `CC_wasm32_wasip2`.

fn main() {
    println!("cargo:rerun-if-env-changed=COVEY_LUA_SRC");
    println!("cargo:rerun-if-changed=support/onelua.c");
    println!("cargo:rerun-if-changed=support/wasm_sjlj.c");
    let Some(src) = std::env::var_os("COVEY_LUA_SRC") else {
        panic!("COVEY_LUA_SRC is not set: build the Lua guest with lua-guest/build.sh");
    };
    cc::Build::new()
        .file("support/onelua.c")
        .file("support/wasm_sjlj.c")
        .include(src)
        // What lua-src defines for WASI and Lua 5.4: POSIX functions where
        // WASI has them, <signal.h> without signals, 5.3's compat macros.
        .define("LUA_USE_POSIX", None)
        .define("_WASI_EMULATED_SIGNAL", None)
        .define("LUA_COMPAT_5_3", None)
        // Lua's setjmp/longjmp become wasm exceptions (support/wasm_sjlj.c).
        .flag("-mllvm")
        .flag("-wasm-enable-eh")
        .flag("-mllvm")
        .flag("-wasm-use-legacy-eh=false")
        .flag("-mllvm")
        .flag("-wasm-enable-sjlj")
        .flag("-fno-common")
        .warnings(false)
        .compile("lua5.4");
}
