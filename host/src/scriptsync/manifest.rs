//! The scripts manifest: an Automerge document mapping each file's path
//! (relative to the scripts directory, `/`-separated) to its entry.
//!
//! One root key per path holding the encoded [`Entry`] as one scalar, so a
//! path written on two sides of a partition is a plain conflict: Automerge
//! picks the same winner on every node (by operation id), and the losing
//! values stay readable (`get_all`) for conflict copies.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use super::blobs::Hash;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub hash: Hash,
    pub size: u64,
    /// The node where this version was written.
    pub origin: String,
    /// A tombstone: the file was deleted.
    pub deleted: bool,
}

fn decode(v: &Value<'_>) -> Option<Entry> {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Bytes(b) => postcard::from_bytes(b).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// The winning entry of `path`.
pub fn get(doc: &AutoCommit, path: &str) -> Option<Entry> {
    let (v, _) = doc.get(ROOT, path).ok()??;
    decode(&v)
}

/// Every path with its winning entry and the losing ones (if any).
pub fn all(doc: &AutoCommit) -> BTreeMap<String, (Entry, Vec<Entry>)> {
    let mut out = BTreeMap::new();
    for item in doc.map_range(ROOT, ..) {
        let key = item.key.to_string();
        let Ok(values) = doc.get_all(ROOT, key.as_str()) else {
            continue;
        };
        let Some(winner) = get(doc, &key) else {
            continue;
        };
        let losers = values
            .iter()
            .filter_map(|(v, _)| decode(v))
            .filter(|e| *e != winner)
            .collect();
        out.insert(key, (winner, losers));
    }
    out
}

pub fn put(
    doc: &mut AutoCommit,
    path: &str,
    entry: &Entry,
) -> Result<(), automerge::AutomergeError> {
    let bytes = postcard::to_stdvec(entry).expect("entries always encode");
    doc.put(ROOT, path, ScalarValue::Bytes(bytes))
}
