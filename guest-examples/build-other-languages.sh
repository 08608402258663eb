#!/usr/bin/env bash
# Build the example guests written in Python and JavaScript from wit/:
#
#   target/guests/python-hello.wasm   componentize-py (PyPI)
#   target/guests/js-hello.wasm       componentize-js (npm)
#
# Their toolchains are installed into target/guest-tools on first use, at
# the versions pinned here and in js-hello/package-lock.json (needs
# python3 with venv, node and npm). A guest is rebuilt only when its source
# or wit/ changed since it was built, so running this again is cheap.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="$root/target/guests"
tools="$root/target/guest-tools"
COMPONENTIZE_PY=0.25.1
mkdir -p "$out" "$tools"

# True when $1 exists and nothing under the other arguments is newer.
fresh() {
  local built=$1
  shift
  [ -f "$built" ] && [ -z "$(find "$@" -newer "$built" -print -quit)" ]
}

# Python: the interpreter (CPython) and the script become one component.
py="$tools/python"
if ! "$py/bin/componentize-py" --version 2>/dev/null | grep -qx "componentize-py $COMPONENTIZE_PY"; then
  python3 -m venv "$py"
  "$py/bin/pip" install -q "componentize-py==$COMPONENTIZE_PY"
fi
if ! fresh "$out/python-hello.wasm" "$here/python-hello/app.py" "$root/wit"; then
  (cd "$here/python-hello" &&
    "$py/bin/componentize-py" -d "$root/wit" -w script componentize app \
      -o "$out/python-hello.wasm.tmp" >/dev/null)
  mv "$out/python-hello.wasm.tmp" "$out/python-hello.wasm"
  echo "built target/guests/python-hello.wasm"
fi

# JavaScript: StarlingMonkey (SpiderMonkey) with the script pre-initialised.
# `-d http fetch-event`: Covey scripts import no wasi:http (outgoing HTTP
# is Covey's own `http` interface, granted per script).
js="$tools/js"
mkdir -p "$js"
if ! cmp -s "$here/js-hello/package-lock.json" "$js/package-lock.json" ||
  [ ! -x "$js/node_modules/.bin/componentize-js" ]; then
  cp "$here/js-hello/package.json" "$here/js-hello/package-lock.json" "$js/"
  (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
if ! fresh "$out/js-hello.wasm" "$here/js-hello/app.js" "$root/wit"; then
  "$js/node_modules/.bin/componentize-js" "$here/js-hello/app.js" --wit "$root/wit" \
    -n script -d http fetch-event -o "$out/js-hello.wasm.tmp" >/dev/null
  mv "$out/js-hello.wasm.tmp" "$out/js-hello.wasm"
  echo "built target/guests/js-hello.wasm"
fi
