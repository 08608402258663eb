#!/usr/bin/env bash
# Build the Lua guest component: lua-guest/dist/lua-guest.wasm
#
#   bash lua-guest/build.sh           # build and update dist/
#   bash lua-guest/build.sh --check   # build, clippy, and fail if dist/ differs
#
# Needs a C compiler that targets wasm32 with exception handling (Lua's
# error handling is setjmp/longjmp, lowered to wasm exceptions): zig's
# bundled clang, see dist/zig.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
rustup target add wasm32-wasip2 >/dev/null

# -mexception-handling: Lua's setjmp/longjmp become wasm exceptions.
# -fno-sanitize=undefined: zig enables UBSan in debug builds, whose runtime
# the component would then import.
zig="$(bash "$root/dist/zig.sh" wasm32-wasi "" -mexception-handling -fno-sanitize=undefined)"
# Paths embedded in the component (panic locations) must not depend on the
# machine: the checkout and home directories are remapped, and so is the
# standard library's source. Its paths are /rustc/<commit>/... as shipped,
# but once the `rust-src` component is installed (which -Zbuild-std for the
# ARMv6 build needs) rustc resolves them to the local sysroot instead.
sysroot="$(rustc --print sysroot)"
commit="$(rustc -vV | sed -n 's/^commit-hash: //p')"
remap="--remap-path-prefix=$root=/covey --remap-path-prefix=$HOME=/home"
remap="$remap --remap-path-prefix=$sysroot/lib/rustlib/src/rust=/rustc/$commit"

cd "$here"
# Lua's sources: lua-src's (Lua 5.4.9 with the patches WASI needs), which
# build.rs compiles as one translation unit (support/onelua.c). Metadata
# for the wasm target only: offline, it may read just what the fetch got.
cargo fetch --locked --target wasm32-wasip2 >/dev/null
COVEY_LUA_SRC="$(cargo metadata --locked --offline --format-version 1 \
  --filter-platform wasm32-wasip2 | python3 -c '
import json, os, sys
pkg = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "lua-src"]
print(os.path.join(os.path.dirname(pkg[0]["manifest_path"]), "lua-5.4.9"))')"
export COVEY_LUA_SRC
export CC_wasm32_wasip2="$zig/cc" AR_wasm32_wasip2="$zig/ar"
export CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS="$remap"
cargo build --locked --release --target wasm32-wasip2 --target-dir "$root/target"
if [ "${1:-}" = "--check" ]; then
  # The guest is outside the workspace: the workspace's clippy skips it.
  cargo clippy --locked --release --target wasm32-wasip2 --target-dir "$root/target" -- -D warnings
fi

built="$root/target/wasm32-wasip2/release/covey_lua_guest.wasm"
mkdir -p "$here/dist"
if [ "${1:-}" = "--check" ]; then
  if ! cmp -s "$built" "$here/dist/lua-guest.wasm"; then
    echo "lua-guest/dist/lua-guest.wasm differs from a fresh build of lua-guest/ (run bash lua-guest/build.sh and commit)" >&2
    exit 1
  fi
  echo "lua-guest/dist/lua-guest.wasm matches a fresh build"
else
  cp "$built" "$here/dist/lua-guest.wasm"
  echo "wrote lua-guest/dist/lua-guest.wasm ($(wc -c < "$here/dist/lua-guest.wasm") bytes)"
fi
