//! Per-writer quotas: how much of the store each script may hold.
//!
//! Every value is replicated to every node, so one script writing new
//! keys in a loop would fill every node's disk. Each key is charged to the
//! script that last wrote it on this node (key bytes + value bytes; a
//! counter as 8 value bytes); a write that would take its writer over the
//! key or byte quota is refused. Deleting a key (by anyone, here or on a
//! peer) releases its charge; a key overwritten by another script moves to
//! that script. The ledger is in memory: it counts what scripts wrote
//! since this node started.

use std::collections::HashMap;

use super::KvError;

/// Charge of a counter's value: its slot holds one integer.
pub const COUNTER_BYTES: u64 = 8;

#[derive(Default)]
pub struct Ledger {
    /// Key → (writer, bytes charged).
    owners: HashMap<String, (String, u64)>,
    /// Writer → (keys, bytes).
    usage: HashMap<String, (u64, u64)>,
}

impl Ledger {
    /// Refuse a write of `bytes` (key + value) at `key` by `writer` that
    /// would take it over `max_keys` or `max_bytes`.
    pub fn check(
        &self,
        writer: &str,
        key: &str,
        bytes: u64,
        max_keys: u64,
        max_bytes: u64,
    ) -> Result<(), KvError> {
        let (keys, used) = self.usage.get(writer).copied().unwrap_or_default();
        let (keys, used) = match self.owners.get(key) {
            Some((w, b)) if w == writer => (keys, used - b),
            _ => (keys + 1, used),
        };
        if keys > max_keys {
            return Err(KvError::QuotaExceeded(format!(
                "{writer} already holds {} keys (its quota)",
                keys - 1
            )));
        }
        if used + bytes > max_bytes {
            return Err(KvError::QuotaExceeded(format!(
                "{writer} would hold {} bytes, over its quota of {max_bytes}",
                used + bytes
            )));
        }
        Ok(())
    }

    /// Charge `key` to `writer` (after a write that passed `check`).
    pub fn charge(&mut self, writer: &str, key: &str, bytes: u64) {
        self.release(key);
        let u = self.usage.entry(writer.to_string()).or_default();
        u.0 += 1;
        u.1 += bytes;
        self.owners
            .insert(key.to_string(), (writer.to_string(), bytes));
    }

    /// `key` is gone: its writer's charge is released.
    pub fn release(&mut self, key: &str) {
        if let Some((writer, bytes)) = self.owners.remove(key)
            && let Some(u) = self.usage.get_mut(&writer)
        {
            u.0 -= 1;
            u.1 -= bytes;
            if u.0 == 0 {
                self.usage.remove(&writer);
            }
        }
    }

    /// What `writer` holds: (keys, bytes).
    pub fn usage(&self, writer: &str) -> (u64, u64) {
        self.usage.get(writer).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_bytes_are_charged_to_the_last_writer() {
        let mut l = Ledger::default();
        l.check("a", "k1", 10, 2, 25).unwrap();
        l.charge("a", "k1", 10);
        l.charge("a", "k2", 10);
        // A third key: over the key quota; rewriting a held key is fine.
        assert!(matches!(
            l.check("a", "k3", 1, 2, 25),
            Err(KvError::QuotaExceeded(_))
        ));
        l.check("a", "k2", 15, 2, 25).unwrap();
        // Bytes: 10 + 16 > 25.
        assert!(matches!(
            l.check("a", "k2", 16, 2, 25),
            Err(KvError::QuotaExceeded(_))
        ));
        // Another script overwriting k1 takes its charge over.
        l.charge("b", "k1", 3);
        assert_eq!(l.usage("a"), (1, 10));
        assert_eq!(l.usage("b"), (1, 3));
        l.release("k1");
        l.release("k2");
        assert_eq!(l.usage("a"), (0, 0));
        assert_eq!(l.usage("b"), (0, 0));
        l.release("never-written");
    }
}
