#!/usr/bin/env bash
# Run an ARM build of `covey` under qemu-user and check, as a user would,
# that it works there:
#
#   bash dist/qemu-smoke.sh TARGET [BINARY]
#
# TARGET as for dist/cross.sh (arm64, armv7, armv6 or a triple); BINARY
# defaults to what `dist/cross.sh TARGET --profile smoke` builds (brought
# up to date first). The armv6 build runs on an emulated ARM1176 (Pi Zero / Pi 1).
# Needs the example components (guest-examples, built for wasm32-wasip2).
#
# Checks: a node starts; a Lua script and Rust components exchange calls and
# events; a runaway loop is stopped by the CPU budget (epoch interruption
# under the target's engine); a memory bomb is capped; `covey status`
# answers; the key-value store persists across a restart; `covey exec` runs
# a Lua file; two ARM nodes link over loopback QUIC and sync scripts and a
# key. Components precompiled on this machine (`covey compile`) are used by
# a node with `--trust-precompiled`. Prints timings and memory on the way.
# Exits non-zero with the node's log on the first failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${1:?usage: dist/qemu-smoke.sh TARGET [BINARY]}"
bin="${2:-}"

. "$root/dist/targets.sh"
covey_target "$target" || exit 2
target="$triple" compile_for="$short"
command -v "${qemu[0]}" >/dev/null || {
  echo "installing qemu-user-static" >&2
  bash "$root/dist/apt-update.sh" && apt-get install -y -qq qemu-user-static >/dev/null
}
# Without a BINARY, (re)build it: cargo makes this a no-op when current.
[ -n "$bin" ] || bin="$(bash "$root/dist/cross.sh" "$target" --profile smoke | tail -1)"
guests="$root/target/wasm32-wasip2/release"
for g in echo counter; do
  [ -f "$guests/$g.wasm" ] || { echo "missing $guests/$g.wasm: build guest-examples first" >&2; exit 2; }
done
host_covey="$root/target/debug/covey"
# The host's covey (`covey compile`), as the test suite builds it (same
# cargo selection, so CI builds it once).
(cd "$root" && cargo test --locked -q --workspace --lib --bins --tests --no-run)

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export NO_COLOR=1 RUST_LIB_BACKTRACE=0

fail() {
  echo "FAILED: $*" >&2
  for log in "$work"/*.log; do
    [ -f "$log" ] || continue
    echo "---- $(basename "$log") (last 40 lines)" >&2
    tail -40 "$log" >&2
  done
  exit 1
}
# wait_for LOG PATTERN SECONDS: until grep finds PATTERN in LOG.
wait_for() {
  local deadline=$((SECONDS + $3))
  until grep -qE "$2" "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "no '$2' in $(basename "$1") after $3 s"
    sleep 0.2
  done
}
covey() { "${qemu[@]}" "$bin" "$@"; }
# start NAME ARGS...: a node in the background, log in $work/NAME.log.
start() {
  local name="$1"; shift
  "${qemu[@]}" "$bin" run --node "$name" --scripts "$work/$name/scripts" \
    --data "$work/$name/data" --log info "$@" >>"$work/$name.log" 2>&1 &
  pids+=($!)
  eval "pid_$name=$!"
}
stop() {
  local pid
  eval "pid=\$pid_$1"
  kill -TERM "$pid"
  wait "$pid" || fail "$1 exited with an error on SIGTERM"
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$1/status"; }

echo "== $target: $bin ($(du -h "$bin" | cut -f1))"
covey --version

echo "== covey exec"
cat >"$work/fib.lua" <<'LUA'
local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
print("fib(" .. arg[1] .. ") = " .. fib(tonumber(arg[1])))
LUA
t0=$SECONDS
out="$(covey exec --data "$work/exec-data" "$work/fib.lua" 20)" || fail "covey exec: $out"
[ "$out" = "fib(20) = 6765" ] || fail "covey exec printed '$out'"
echo "ok: $out ($((SECONDS - t0)) s, first run compiles or loads the Lua guest)"
if [ "$compile_for" != arm64 ]; then
  # 32-bit builds carry the Lua guest precompiled (deflated): had it not
  # loaded, exec would have compiled the guest into its cache.
  [ -z "$(ls -A "$work/exec-data/cache" 2>/dev/null)" ] ||
    fail "the built-in Lua guest artifact was not used: exec compiled the guest"
  echo "ok: the built-in precompiled Lua guest was used"
fi

echo "== node a: Lua + Rust components, runaway loop, memory bomb"
mkdir -p "$work/a/scripts"
cp "$guests/echo.wasm" "$guests/counter.wasm" "$work/a/scripts/"
# The node runs with a 24 MiB cap per script (the memory bomb hits it
# sooner). On 32-bit ARM (Pulley) echo is precompiled here for that cap
# and loaded there; counter compiles on the target, and so does the Lua
# guest (the one built into the binary is for the default 64 MiB, which
# `covey exec` above used).
if [ "$compile_for" != arm64 ]; then
  "$host_covey" compile --target "$compile_for" --memory-mb 24 "$work/a/scripts/echo.wasm" >/dev/null
fi
cat >"$work/a/scripts/talk.lua" <<'LUA'
local me = covey.node()
covey.log.info("smoke boots=" .. covey.kv.incr("smoke/boots"))
covey.kv.set("smoke/hello-from/" .. me, "hi")
covey.after(50, function()
  local r, err = covey.call(me, "echo.upper", "hello from lua", 60000)
  covey.log.info("smoke call reply=" .. tostring(r or err))
  for i = 1, 5 do covey.emit("smoke.ping", tostring(i)) end
end)
local seen = {}
covey.every(300, function()
  local n = tonumber(covey.kv.get("counter/by-name/smoke.ping") or "0")
  if n >= 5 and not seen.counter then
    seen.counter = true
    covey.log.info("smoke counter saw " .. n .. " events")
  end
  for _, k in ipairs(covey.kv.keys("smoke/hello-from/")) do
    local who = k:sub(#"smoke/hello-from/" + 1)
    if who ~= me and not seen[who] then
      seen[who] = true
      covey.log.info("smoke " .. me .. " sees key from " .. who)
    end
  end
end)
LUA
cat >"$work/a/scripts/spin.lua" <<'LUA'
covey.after(10, function() while true do end end)
LUA
cat >"$work/a/scripts/bomb.lua" <<'LUA'
covey.after(10, function()
  -- 1 MiB by doubling (cheap even interpreted), then a new copy per slot.
  local s = "x"
  for _ = 1, 20 do s = s .. s end
  local t = {}
  for i = 1, 1e9 do t[i] = s .. i end
end)
LUA
t0=$SECONDS
start a --discovery off --trust-precompiled --cpu-ms 10000 --memory-mb 24
wait_for "$work/a.log" "smoke boots=1" 300
echo "ok: started, first script ran after $((SECONDS - t0)) s (peak RSS so far $(hwm_kib "$pid_a") KiB under qemu)"
wait_for "$work/a.log" "smoke call reply=HELLO FROM LUA" 300
echo "ok: Lua called the Rust echo component"
wait_for "$work/a.log" "smoke counter saw 5 events" 300
echo "ok: the Rust counter component counted the Lua script's events"
if grep -q "ignoring.*echo" "$work/a.log"; then
  fail "the precompiled echo artifact was not used: $(grep "ignoring.*echo" "$work/a.log")"
fi
wait_for "$work/a.log" "CPU budget.*spin.lua" 300
echo "ok: runaway loop stopped by the CPU budget"
wait_for "$work/a.log" "(not enough memory|out of memory).*bomb.lua" 300
echo "ok: memory bomb capped"
status="$(covey status --data "$work/a/data")" || fail "covey status: $status"
echo "$status" | grep -q "talk.lua" || fail "covey status does not list talk.lua: $status"
echo "ok: covey status answers; node RSS $(rss_kib "$pid_a") KiB under qemu"
stop a

echo "== node a again: the key-value store persisted"
t0=$SECONDS
start a --discovery off --trust-precompiled --cpu-ms 10000 --memory-mb 24
wait_for "$work/a.log" "smoke boots=2" 300
echo "ok: restarted in $((SECONDS - t0)) s (compiled code cached)"
stop a

echo "== nodes a and b: QUIC over loopback, scripts and keys synced"
token="$(covey cluster init --data "$work/a/data" | grep -o 'covey1-[A-Za-z0-9_-]*' | head -1)"
[ -n "$token" ] || fail "cluster init printed no token"
mkdir -p "$work/b/scripts"
covey cluster join "$token" --data "$work/b/data" >/dev/null
start a --discovery off --trust-precompiled --listen 127.0.0.1 --port 17466
start b --discovery off --trust-precompiled --listen 127.0.0.1 --port 17467 --peer 127.0.0.1:17466
wait_for "$work/b.log" "smoke b sees key from a" 600
wait_for "$work/a.log" "smoke a sees key from b" 300
echo "ok: b received talk.lua from a, ran it, and both see each other's keys"
stop b
stop a
echo "PASSED: $target"
