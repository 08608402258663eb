//! The wording of a refused system event name. A file of its own so the
//! Lua guest can include it (`#[path]`) without depending on this crate:
//! a path dependency from outside its workspace would put this checkout's
//! location into the guest's symbol hashes, and the committed
//! `lua-guest.wasm` would no longer match a build elsewhere.

/// Why sending an event named `name` (reserved) was refused: the one
/// wording the host, the bridge and the Lua guest give.
pub fn reserved_refusal(name: &str) -> String {
    format!("`{name}` is a system event name (`covey.*`): only the node emits those")
}
