#!/usr/bin/env bash
# A C compiler for targets Debian has no fitting toolchain for: zig's
# bundled clang (and its bundled musl), installed from PyPI into a private
# venv under target/. Used by the Lua guest (wasm32 with exceptions) and by
# the ARMv6 build (static musl for the ARM1176).
#
#   bash dist/zig.sh ZIG_TARGET [CPU [EXTRA_CFLAGS...]]
#
# Writes `cc` and `ar` wrappers into target/zig/<ZIG_TARGET>/ and prints
# that directory. The wrappers drop the `--target=` rustc and the cc crate
# pass (zig names targets its own way), and any argument zig's linker
# does not take.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
zig_target="$1"
cpu="${2:-}"
shift $(($# < 2 ? $# : 2))
extra=("$@")
zig_version="0.17.0"
venv="$root/target/zig/venv"

if ! "$venv/bin/python" -m ziglang version 2>/dev/null | grep -qx "$zig_version"; then
  echo "installing ziglang $zig_version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "ziglang==$zig_version"
fi

out="$root/target/zig/$zig_target"
mkdir -p "$out"
flags="-target $zig_target"
[ -n "$cpu" ] && flags="$flags -mcpu=$cpu"
[ ${#extra[@]} -gt 0 ] && flags="$flags ${extra[*]}"
cat > "$out/cc" <<SH
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in
    --target=*) ;;                      # the cc crate's triple; zig has its own
    -Wl,--no-undefined-version) ;;      # rustc passes it; zig's lld rejects it
    *) args+=("\$a") ;;
  esac
done
exec "$venv/bin/python" -m ziglang cc $flags "\${args[@]}"
SH
cat > "$out/ar" <<SH
#!/usr/bin/env bash
exec "$venv/bin/python" -m ziglang ar "\$@"
SH
chmod +x "$out/cc" "$out/ar"
echo "$out"
