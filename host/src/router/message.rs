//! The message as the router carries it: cheap to clone and to hand across
//! threads.
//!
//! The WIT `message` owns four buffers; carried through the router as it
//! was, each event cost five allocations (its strings, its payload, the
//! `Arc` around it) on the thread that received it, and as many frees on
//! the thread of the script that handled it: a fifth of a node's CPU
//! when events arrived at full rate, with the allocator's lock contended
//! between the two threads. Here the sender, target and name are small
//! strings kept inline (up to 23 bytes; longer ones are shared), and the
//! payload is a refcounted buffer: an event from a peer costs one
//! allocation, its payload. Inline rather than shared strings, because
//! a count shared by every event (a node's name, `*`) would bounce
//! between the receiving thread and the script's on each one.

use bytes::Bytes;
use smol_str::SmolStr;

use crate::bindings;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    /// `NODE` or `NODE/DEVICE`.
    pub from: SmolStr,
    /// `*`, `NODE` or `NODE/DEVICE`.
    pub to: SmolStr,
    pub name: SmolStr,
    pub payload: Bytes,
    pub timestamp_ms: u64,
}

impl Message {
    /// The WIT record, for a guest export that takes one message.
    pub fn to_wit(&self) -> bindings::Message {
        bindings::Message {
            id: self.id,
            from: self.from.to_string(),
            to: self.to.to_string(),
            name: self.name.to_string(),
            payload: self.payload.to_vec(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wit_record_has_the_same_fields() {
        let m = Message {
            id: 7,
            from: "a/dev".into(),
            to: "*".into(),
            name: "temp".into(),
            payload: Bytes::from_static(b"21.5"),
            timestamp_ms: 9,
        };
        let w = m.to_wit();
        assert_eq!(
            (
                w.id,
                &*w.from,
                &*w.to,
                &*w.name,
                &w.payload[..],
                w.timestamp_ms
            ),
            (7, "a/dev", "*", "temp", &b"21.5"[..], 9)
        );
    }
}
