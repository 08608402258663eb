#!/usr/bin/env bash
# Package a `covey` binary as a Debian package, for `apt install ./covey_*.deb`
# on a Raspberry Pi (or any Debian-family system):
#
#   bash dist/deb.sh ARCH BINARY [OUT_DIR]
#
# ARCH is the Debian architecture: arm64 (the aarch64 build), armhf and
# armel (both take the static ARMv6 build, which runs on every Raspberry Pi
# whatever its OS calls itself), amd64. Prints the package's path.
#
# Built with dpkg-deb directly: the binaries come from dist/cross.sh, and
# the package is a binary, a systemd unit, a config file and a system user.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
arch="${1:?usage: dist/deb.sh ARCH BINARY [OUT_DIR]}"
bin="${2:?usage: dist/deb.sh ARCH BINARY [OUT_DIR]}"
out="${3:-$root/target/deb}"
case "$arch" in arm64|armhf|armel|amd64) ;; *) echo "unknown arch '$arch'" >&2; exit 2 ;; esac
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"

pkg="$(mktemp -d)"
trap 'rm -rf "$pkg"' EXIT
install -D -m 0755 "$bin" "$pkg/usr/bin/covey"
install -D -m 0644 "$root/dist/covey.service" "$pkg/lib/systemd/system/covey.service"
install -D -m 0644 "$root/dist/deb/covey.yaml" "$pkg/etc/covey/covey.yaml"
install -D -m 0644 "$root/README.md" "$pkg/usr/share/doc/covey/README.md"
install -D -m 0644 "$root/LICENSE" "$pkg/usr/share/doc/covey/copyright" 2>/dev/null ||
  printf 'Covey\nLicense: Apache-2.0\n' | install -D -m 0644 /dev/stdin "$pkg/usr/share/doc/covey/copyright"
mkdir -p "$pkg/DEBIAN"
install -m 0755 "$root/dist/deb/postinst" "$root/dist/deb/prerm" "$root/dist/deb/postrm" "$pkg/DEBIAN/"
echo "/etc/covey/covey.yaml" >"$pkg/DEBIAN/conffiles"
depends="adduser"
# The aarch64 and amd64 builds link glibc dynamically; the ARMv6 one is static.
case "$arch" in arm64|amd64) depends="$depends, libc6 (>= 2.34)" ;; esac
cat >"$pkg/DEBIAN/control" <<EOF
Package: covey
Version: $version
Architecture: $arch
Maintainer: Covey developers <covey@localhost>
Installed-Size: $(du -sk "$pkg" | cut -f1)
Depends: $depends
Section: net
Priority: optional
Description: sandboxed WebAssembly and Lua script cluster
 Covey runs .wasm components and .lua scripts dropped into a watched
 directory, each in its own sandbox with memory and CPU limits, syncs them
 to every node of a small fleet (Raspberry Pis and friends) over QUIC with
 mutual TLS, and lets them talk through events, commands, calls, timers and
 a replicated key-value store.
EOF
mkdir -p "$out"
deb="$out/covey_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$pkg" "$deb" >/dev/null
echo "$deb"
