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
cat > "$demo/covey.yaml" <<YAML
node: demo
scripts: scripts
data: data
extras:
  hello_interval_ms: 2000
YAML
echo "scripts in $demo/scripts (edit or drop files there to hot-reload); Ctrl-C to stop"
cd "$root"
RUST_LIB_BACKTRACE=0 exec cargo run --release -p covey -- run --config "$demo/covey.yaml"
