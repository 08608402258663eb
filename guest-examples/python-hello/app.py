"""python-hello: a Covey script in Python, built with componentize-py.

The same script as `js-hello`, so one test and one benchmark cover both:

- every `hello` event (from any node) is counted and its payload kept;
- `py.echo` replies with the payload, prefixed `py: `;
- `py.count` replies with the number of `hello` events seen;
- `py.save` stores the last payload in the key-value store (`py/last`),
  counts the saves there (`py/saves`), and replies `<saves> <stored>`,
  read back from the store.

The classes and functions under `wit_world` are generated from `wit/` by
componentize-py; `bash ../build-other-languages.sh` builds the component.
"""

import wit_world
from componentize_py_types import Err
from wit_world.imports import events, kv, log, node, types
from wit_world.imports.log import Level


class State:
    heard = 0
    last = b""


# componentize-py makes a new WitWorld for each call into the script, so
# what lives between calls is kept at module level.
state = State()


class WitWorld(wit_world.WitWorld):
    def init(self) -> None:
        try:
            events.subscribe("*", "hello")
            for name in ("py.echo", "py.count", "py.save"):
                events.handle("*", name)
        except Err as e:
            raise Err(f"subscribing: {e.value}")
        log.log(Level.INFO, f"python-hello on {node.name()}")

    def on_event(self, msg) -> None:
        state.heard += 1
        state.last = msg.payload

    def on_events(self, heads, data: bytes) -> None:
        # WIT 0.5.0's batch: each event's strings and payload follow one
        # another in `data`, at the lengths its head gives.
        at = 0
        for h in heads:
            parts = []
            for n in (h.from_len, h.to_len, h.name_len, h.payload_len):
                parts.append(data[at : at + n])
                at += n
            frm, to, name, payload = parts
            self.on_event(
                types.Message(
                    h.id, frm.decode(), to.decode(), name.decode(), payload, h.timestamp_ms
                )
            )

    def on_command(self, msg):
        if msg.name == "py.echo":
            return b"py: " + msg.payload
        if msg.name == "py.count":
            return str(state.heard).encode()
        if msg.name == "py.save":
            try:
                kv.set("py/last", state.last)
                saves = kv.incr("py/saves", 1)
            except Err as e:
                log.log(Level.WARN, f"py.save: {e.value}")
                return None
            return str(saves).encode() + b" " + (kv.get("py/last") or b"")
        return None

    def on_timer(self, id: int) -> bool:
        return False

    def on_kv_change(self, key: str, value) -> None:
        pass
