#!/usr/bin/env bash
# Benchmarks of an ARM build of `covey` under qemu-user, side by side with
# Debian's native Lua for that architecture on the same emulator:
#
#   bash dist/qemu-bench.sh TARGET [BINARY]
#
# TARGET: arm64 (Debian's arm64 lua5.4, emulated Cortex-A72-class CPU) or
# armv6 (Debian's armel lua5.4 — ARMv5TE code, which an ARM1176 runs — on an
# emulated ARM1176, the Pi Zero's CPU). BINARY defaults to the release build
# from dist/cross.sh (built if missing).
#
# Prints: Lua CPU-bound workloads (host/benches/lua/cpu.lua) native vs
# covey and their ratio; events/s from one Lua script into another; node
# start with 10 Lua scripts (cold: empty data directory; cached: second
# start); compiling the Lua guest on the device (time, peak RSS); RSS idle
# and with 10 Lua scripts. Emulated figures are ratios and relative costs,
# not Raspberry Pi speeds. Fails (never skips) when native Lua cannot run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:?usage: dist/qemu-bench.sh arm64|armv6 [BINARY]}"
bin="${2:-}"
. "$root/dist/targets.sh"
covey_target "$target" || exit 2
case "$short" in
  arm64) debarch=arm64 libc_pkg=libc6-arm64-cross ;;
  armv6) debarch=armel libc_pkg=libc6-armel-cross ;;
  *) echo "qemu-bench: arm64 or armv6 (armv7 runs the same Pulley as armv6)" >&2; exit 2 ;;
esac
[ -n "$bin" ] || bin="$(bash "$root/dist/cross.sh" "$triple" | tail -1)"

# Debian's lua5.4 for the target architecture, unpacked (not installed).
sysroot="$root/target/qemu-sysroot/$debarch"
if [ ! -x "$sysroot/usr/bin/lua5.4" ]; then
  echo "fetching Debian's lua5.4:$debarch" >&2
  dpkg --print-foreign-architectures | grep -qx "$debarch" || dpkg --add-architecture "$debarch"
  bash "$root/dist/apt-update.sh"
  apt-get install -y -qq qemu-user-static "$libc_pkg" >/dev/null
  dl="$(mktemp -d)"
  (cd "$dl" && apt-get download -qq lua5.4:"$debarch" liblua5.4-0:"$debarch" \
    libreadline8:"$debarch" libtinfo6:"$debarch" libstdc++6:"$debarch" libgcc-s1:"$debarch")
  mkdir -p "$sysroot"
  for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$sysroot"; done
  rm -rf "$dl"
fi
libs="$sysroot/usr/lib/$gnu:$sysroot/lib/$gnu"
native_lua=("${qemu_cpu[@]}" -L "/usr/$gnu" -E "LD_LIBRARY_PATH=$libs" "$sysroot/usr/bin/lua5.4")
"${native_lua[@]}" -v >/dev/null || { echo "FAILED: native lua5.4 does not run under qemu" >&2; exit 1; }

work="$(mktemp -d)"
pid=""
trap '[ -z "$pid" ] || kill -9 "$pid" 2>/dev/null; rm -rf "$work"' EXIT
export NO_COLOR=1 RUST_LIB_BACKTRACE=0
ms() { date +%s%3N; }
hwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
# The guest's own resident memory: a 32-bit guest lives in the low 4 GiB of
# the qemu process (guest_base 0); qemu's code cache and heap live above.
guest_rss_kib() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, a, "-"); low = length(a[1]) <= 8 }
       /^Rss:/ && low { g += $2 } END { print g + 0 }' "/proc/$1/smaps"
}
wait_count() { # LOG PATTERN COUNT SECONDS
  local deadline=$((SECONDS + $4))
  local n
  while n="$(grep -cE "$2" "$1" 2>/dev/null)" || true; [ "${n:-0}" -lt "$3" ]; do
    [ $SECONDS -lt "$deadline" ] || { echo "FAILED: $3 x '$2' not in $1" >&2; tail -20 "$1" >&2; exit 1; }
    sleep 0.05
  done
}
node() { # NAME SCRIPTS DATA [ARGS...]: start a node, set $pid
  local log="$work/$1.log" scripts="$2" data="$3"; shift 3
  "${qemu[@]}" "$bin" run --node bench --scripts "$scripts" --data "$data" \
    --discovery off --log info "$@" >"$log" 2>&1 &
  pid=$!
}
stop() { kill -TERM "$pid"; wait "$pid" || true; pid=""; }

echo "== $triple under ${qemu[*]} ($(du -h "$bin" | cut -f1) binary), $(date -u +%F)"
echo "-- Lua CPU-bound workloads: Debian lua5.4:$debarch vs covey exec (best of 3, ms)"
cpu="$root/host/benches/lua/cpu.lua"
"${native_lua[@]}" "$cpu" >"$work/native.txt"
echo 'print("warm")' >"$work/warm.lua"
"${qemu[@]}" "$bin" exec --data "$work/exec" "$work/warm.lua" >/dev/null # compile/cache the guest
"${qemu[@]}" "$bin" exec --data "$work/exec" --cpu-ms 36000000 "$cpu" >"$work/covey.txt"
join "$work/native.txt" "$work/covey.txt" | awk '
  { r = $2 / $3; g += log(r); n++
    printf "%-14s native %9.1f ms   covey %9.1f ms   %.2fx native speed\n", $1, $2 * 1000, $3 * 1000, r }
  END { printf "geometric mean %.2fx native speed\n", exp(g / n) }'

echo "-- node start with 10 Lua scripts"
mkdir -p "$work/s10"
for i in $(seq 1 10); do
  printf 'local n = 0\ncovey.on("*", "tick", function() n = n + 1 end)\ncovey.log.info("bench ready %d")\n' "$i" >"$work/s10/s$i.lua"
done
t0=$(ms); node start "$work/s10" "$work/d10"
wait_count "$work/start.log" "bench ready" 10 600
echo "cold (empty data dir): $(($(ms) - t0)) ms to 10 scripts running"
sleep 3
rss10=$(rss_kib "$pid"); guest10=$(guest_rss_kib "$pid"); stop
t0=$(ms); node start2 "$work/s10" "$work/d10"
wait_count "$work/start2.log" "bench ready" 10 600
echo "cached (second start): $(($(ms) - t0)) ms"
stop
mkdir -p "$work/s0"; node idle "$work/s0" "$work/d0"
wait_count "$work/idle.log" "node started" 1 120; sleep 3
rss0=$(rss_kib "$pid"); guest0=$(guest_rss_kib "$pid"); stop
echo "RSS of the qemu process: idle node $((rss0 / 1024)) MiB, with 10 Lua scripts $((rss10 / 1024)) MiB"
case "$triple" in
  armv6*) echo "guest memory (32-bit address space only): idle node $((guest0 / 1024)) MiB," \
    "with 10 Lua scripts $((guest10 / 1024)) MiB ($(( (guest10 - guest0) / 10 )) KiB per script)" ;;
esac

echo "-- compiling the Lua guest on the device (memory_mb 48: no prebuilt artifact fits)"
t0=$(ms); node compile "$work/s10" "$work/dc" --memory-mb 48
wait_count "$work/compile.log" "bench ready" 10 1800
echo "compile + start: $(($(ms) - t0)) ms, peak RSS of the qemu process $(($(hwm_kib "$pid") / 1024)) MiB"
stop

echo "-- events/s from one Lua script into another (200,000 events, 64-byte payload)"
mkdir -p "$work/ev"
printf 'mailbox: 1000000\n' >"$work/ev.yaml"
cat >"$work/ev/sink.lua" <<'LUA'
local n = 0
covey.on("*", "ev", function()
  n = n + 1
  if n == 1 then covey.log.info("bench first") end
  if n == 200000 then covey.log.info("bench last") end
end)
LUA
cat >"$work/ev/source.lua" <<'LUA'
local payload = string.rep("x", 64)
local sent = 0
covey.after(2000, function()
  covey.every(1, function()
    for _ = 1, 2000 do
      if sent < 200000 then covey.emit("ev", payload); sent = sent + 1 end
    end
  end)
end)
LUA
node events "$work/ev" "$work/dev" --config "$work/ev.yaml"
wait_count "$work/events.log" "bench last" 1 1800
stop
awk '/bench first|bench last/ { split($1, t, "T"); split(t[2], h, ":"); s = h[1] * 3600 + h[2] * 60 + h[3] + 0; if (/first/) a = s; else b = s }
     END { printf "%.0f events/s (%.1f us/event), emit and delivery both in Lua\n", 200000 / (b - a), (b - a) * 1e6 / 200000 }' "$work/events.log"
