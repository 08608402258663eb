#!/usr/bin/env bash
# Build the Lua guest component: lua-guest/dist/lua-guest.wasm
#
#   bash lua-guest/build.sh           # build and update dist/
#   bash lua-guest/build.sh --check   # build and fail if dist/ differs
#
# Needs a C compiler that targets wasm32 with exception handling (Lua's
# error handling is setjmp/longjmp, lowered to wasm exceptions): zig's
# bundled clang, installed here from PyPI into a private venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
tools="$root/target/lua-toolchain"
venv="$tools/venv"
zig_version="0.17.0"

if ! "$venv/bin/python" -m ziglang version 2>/dev/null | grep -qx "$zig_version"; then
  echo "installing ziglang $zig_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "ziglang==$zig_version"
fi
rustup target add wasm32-wasip2 >/dev/null

mkdir -p "$tools/bin" "$tools/lib"
# The cc crate passes --target=wasm32-wasip2, which zig does not know; the
# wrapper drops it and compiles for wasm32-wasi with exceptions enabled.
# -fno-sanitize=undefined: zig enables UBSan in debug builds, whose runtime
# the component would then import.
cat > "$tools/bin/cc" <<SH
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in --target=*) ;; *) args+=("\$a") ;; esac
done
exec "$venv/bin/python" -m ziglang cc -target wasm32-wasi -mexception-handling -fno-sanitize=undefined "\${args[@]}"
SH
cat > "$tools/bin/ar" <<SH
#!/usr/bin/env bash
exec "$venv/bin/python" -m ziglang ar "\$@"
SH
chmod +x "$tools/bin/cc" "$tools/bin/ar"

# Runtime pieces nothing in the Rust link provides: the setjmp/longjmp
# runtime and the (empty) emulated-signal library lua-src asks for.
"$tools/bin/cc" -O2 -c "$here/support/wasm_sjlj.c" -o "$tools/lib/wasm_sjlj.o"
"$tools/bin/cc" -O2 -c "$here/support/empty.c" -o "$tools/lib/empty.o"
rm -f "$tools/lib/libsetjmp.a" "$tools/lib/libwasi-emulated-signal.a"
"$tools/bin/ar" rcs "$tools/lib/libsetjmp.a" "$tools/lib/wasm_sjlj.o"
"$tools/bin/ar" rcs "$tools/lib/libwasi-emulated-signal.a" "$tools/lib/empty.o"

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
CC_wasm32_wasip2="$tools/bin/cc" AR_wasm32_wasip2="$tools/bin/ar" \
CARGO_TARGET_WASM32_WASIP2_RUSTFLAGS="-L $tools/lib $remap" \
  cargo build --locked --release --target wasm32-wasip2 --target-dir "$root/target"

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
