// js-hello: a Covey script in JavaScript, built with componentize-js.
//
// The same script as `python-hello`, so one test and one benchmark cover
// both:
// - every `hello` event (from any node) is counted and its payload kept;
// - `js.echo` replies with the payload, prefixed `js: `;
// - `js.count` replies with the number of `hello` events seen;
// - `js.save` stores the last payload in the key-value store (`js/last`),
//   counts the saves there (`js/saves`), and replies `<saves> <stored>`,
//   read back from the store.
//
// Imports are the WIT interfaces by name; exports are the world's
// functions in camelCase. A WIT `result` error is a thrown exception, an
// `option` is a value or `undefined`, `list<u8>` a Uint8Array.
// `bash ../build-other-languages.sh` builds the component.

import { subscribe, handle } from "covey:script/events@0.5.0";
import { get, set, incr } from "covey:script/kv@0.5.0";
import { log } from "covey:script/log@0.5.0";
import { name as nodeName } from "covey:script/node@0.5.0";

const utf8 = new TextEncoder();
let heard = 0;
let last = new Uint8Array();

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function init() {
  subscribe("*", "hello");
  for (const name of ["js.echo", "js.count", "js.save"]) handle("*", name);
  log("info", `js-hello on ${nodeName()}`);
}

export function onEvent(msg) {
  heard += 1;
  last = msg.payload;
}

// WIT 0.5.0's batch: each event's strings and payload follow one another
// in `bytes`, at the lengths its head gives.
const text = new TextDecoder();
export function onEvents(heads, bytes) {
  let at = 0;
  const take = (n) => bytes.subarray(at, (at += n));
  for (const h of heads) {
    onEvent({
      id: h.id,
      from: text.decode(take(h.fromLen)),
      to: text.decode(take(h.toLen)),
      name: text.decode(take(h.nameLen)),
      payload: take(h.payloadLen),
      timestampMs: h.timestampMs,
    });
  }
}

export function onCommand(msg) {
  switch (msg.name) {
    case "js.echo":
      return concat(utf8.encode("js: "), msg.payload);
    case "js.count":
      return utf8.encode(String(heard));
    case "js.save":
      try {
        set("js/last", last);
        const saves = incr("js/saves", 1n);
        return concat(utf8.encode(`${saves} `), get("js/last") ?? new Uint8Array());
      } catch (e) {
        log("warn", `js.save: ${JSON.stringify(e.payload ?? e)}`);
        return undefined;
      }
    default:
      return undefined;
  }
}

export function onTimer(id) {
  return false;
}

export function onKvChange(key, value) {}
