#!/usr/bin/env bash
# Run a Covey node on the bundled example scripts:  bash guest-examples/demo.sh
# Needs only a Rust toolchain (rustup); adds the wasm32-wasip2 target.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
rustup target add wasm32-wasip2 >/dev/null
(cd "$here" && cargo build --target wasm32-wasip2 --release -p hello -p counter -p echo -p ping -p pong)
demo="$root/target/demo"
mkdir -p "$demo/scripts"
for s in hello counter echo ping pong; do
  cp "$root/target/wasm32-wasip2/release/$s.wasm" "$demo/scripts/"
done
# A Lua script too: it counts `door.*` events and answers `doors`.
cat > "$demo/scripts/doors.lua" <<'LUA'
local opened = 0
covey.on("*", "door.*", function(msg)
  opened = opened + 1
  covey.log.info("door event " .. msg.name .. " from " .. msg.from .. ": " .. msg.payload)
end)
covey.handle("*", "doors", function() return tostring(opened) .. " door events so far" end)
LUA
cat > "$demo/covey.yaml" <<YAML
node: demo
scripts: scripts
data: data
http: 127.0.0.1:7467
extras:
  hello_interval_ms: 2000
YAML
cat <<EOF
scripts in $demo/scripts (edit or drop files there to hot-reload); Ctrl-C to stop
dashboard: http://127.0.0.1:7467/   API: http://127.0.0.1:7467/v1/status   metrics: http://127.0.0.1:7467/metrics
try, in another terminal:
  target/release/covey emit door.opened front --data $demo/data
  target/release/covey call demo doors --data $demo/data
  curl -X POST --data back http://127.0.0.1:7467/v1/events/door.opened
  target/release/covey logs -f --script doors.lua --data $demo/data
EOF
cd "$root"
RUST_LIB_BACKTRACE=0 exec cargo run --release -p covey -- run --config "$demo/covey.yaml"
