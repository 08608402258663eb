#!/usr/bin/env bash
# Build `covey` for a Raspberry Pi (or any ARM Linux) from an x86_64 Debian
# machine. Installs the cross linker and Rust target it needs.
#
#   bash dist/cross.sh TARGET [--profile release|smoke] [--check]
#
# --check type-checks the build for TARGET (cargo check) instead of building.
#
# TARGET (aliases in brackets):
#   aarch64-unknown-linux-gnu       [arm64]  Pi 3/4/5 on 64-bit Raspberry Pi OS; Cranelift
#   armv7-unknown-linux-gnueabihf   [armv7]  Pi 2/3/4 on a 32-bit OS; Pulley interpreter
#   armv6-unknown-linux-musleabihf  [armv6]  every 32-bit Pi down to the Pi Zero
#                                            (ARM1176); Pulley; static binary
#
# Prints the path of the binary on its last line.
#
# Why the ARMv6 build is static musl: Debian's armhf libraries (and crt
# objects, libgcc) are ARMv7 code that dies with SIGILL on an ARM1176, and
# there is no prebuilt Rust std for ARMv6 here. So std is built from
# `rust-src` (-Zbuild-std, allowed on stable through RUSTC_BOOTSTRAP) and
# linked with zig's bundled musl, compiled for the ARM1176 itself: the
# result depends on nothing on the Pi, so one binary serves Raspberry Pi
# OS (which calls it armhf) and Debian armhf/armel alike.
#
# Why a target spec of our own: Rust's arm-unknown-linux-musleabihf is
# ARMv6, but its LLVM triple says plain `arm` (ARMv4T), and LLVM assembles
# module-level assembly — wasmtime's fiber switch, a `blx reg` — for the
# triple, not for the CPU ("instruction requires: armv5t"). The spec is
# Rust's own for that target, printed by rustc, with the LLVM triple
# `armv6-unknown-linux-musleabihf`; nothing else differs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
profile=release
target=""
check=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    --check) check=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) target="$1"; shift ;;
  esac
done
. "$root/dist/targets.sh"
covey_target "$target" || exit 2
target="$triple"

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  bash "$root/dist/apt-update.sh" >&2
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

env_target="$(echo "$target" | tr 'a-z-' 'A-Z_')"
cc_target="$(echo "$target" | tr '-' '_')"
cargo_args=(build --locked -p covey --bin covey --profile "$profile" --target "$target")

case "$target" in
  aarch64-unknown-linux-gnu)
    apt_install "gcc-$gnu" libc6-dev-arm64-cross
    rustup target add "$target" >&2
    export "CARGO_TARGET_${env_target}_LINKER=$gnu-gcc"
    export "CC_${cc_target}=$gnu-gcc"
    ;;
  armv7-unknown-linux-gnueabihf)
    apt_install "gcc-$gnu" libc6-dev-armhf-cross
    rustup target add "$target" >&2
    export "CARGO_TARGET_${env_target}_LINKER=$gnu-gcc"
    export "CC_${cc_target}=$gnu-gcc"
    ;;
  armv6-unknown-linux-musleabihf)
    rustup component add rust-src >&2
    spec="$root/target/$target.json"
    RUSTC_BOOTSTRAP=1 rustc -Z unstable-options --print target-spec-json \
        --target arm-unknown-linux-musleabihf |
      sed 's/"llvm-target": "arm-unknown-linux-musleabihf"/"llvm-target": "armv6-unknown-linux-musleabihf"/' \
      >"$spec.new"
    grep -q '"llvm-target": "armv6-' "$spec.new" || { echo "could not derive $spec" >&2; exit 1; }
    cmp -s "$spec.new" "$spec" && rm "$spec.new" || mv "$spec.new" "$spec"
    cargo_args=(build --locked -p covey --bin covey --profile "$profile" --target "$spec")
    zig="$(bash "$root/dist/zig.sh" arm-linux-musleabihf arm1176jzf_s)"
    export "CARGO_TARGET_${env_target}_LINKER=$zig/cc"
    export "CC_${cc_target}=$zig/cc"
    export "AR_${cc_target}=$zig/ar"
    # zig's cc provides musl's crt objects and libc; Rust's own copies come
    # only with a prebuilt std, which this target does not have here.
    export "CARGO_TARGET_${env_target}_RUSTFLAGS=-C target-cpu=arm1176jzf-s -C link-self-contained=no"
    export RUSTC_BOOTSTRAP=1
    cargo_args+=(-Zbuild-std=std,panic_unwind -Zjson-target-spec)
    ;;
esac

cd "$root"
if [ -n "$check" ]; then
  cargo_args[0]=check
  cargo "${cargo_args[@]}" >&2
  echo "checked $target"
  exit 0
fi
case "$target" in
  arm*)
    # 32-bit ARM runs Pulley, and compiling the Lua guest for it on a Pi
    # Zero takes minutes: ship it precompiled (for the default memory_mb;
    # a node with another cap compiles it once and caches it).
    # The host's own covey compiles it: the one the test suite builds
    # (same features, so no second build of wasmtime in CI).
    # Same selection as .ci/test's test run and without RUSTC_BOOTSTRAP,
    # or cargo would see other features/flags and rebuild wasmtime.
    env -u RUSTC_BOOTSTRAP cargo test --locked -q --workspace --lib --bins --tests --no-run >&2
    cwasm="$root/target/$target/lua-guest.pulley32.cwasm"
    mkdir -p "$(dirname "$cwasm")"
    "$root/target/debug/covey" compile --lua-guest --target "$target" -o "$cwasm" >&2
    export COVEY_LUA_GUEST_CWASM="$cwasm"
    ;;
esac
cargo "${cargo_args[@]}" >&2
bin="$root/target/$target/$profile/covey"
echo "built $(du -h "$bin" | cut -f1) $bin" >&2
echo "$bin"
