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
use crate::scriptdir::ScriptPath;

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

/// The manifest as this node accepts it: every valid path with its
/// winning entry and the losing ones, and what was refused.
#[derive(Default)]
pub struct Manifest {
    pub entries: BTreeMap<ScriptPath, (Entry, Vec<Entry>)>,
    pub refused: Vec<Refused>,
}

/// A manifest key this node will not act on: a path against the rule,
/// a value that is not an entry, a size over the sync limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Refused {
    /// The key, shortened and escaped for logs.
    pub key: String,
    /// The origin the entry claims (if it decoded).
    pub origin: Option<String>,
    pub reason: &'static str,
    pub why: String,
}

/// Read the manifest, checking every key and entry: anything a peer could
/// have written is checked here, before it reaches the file system.
pub fn all(doc: &AutoCommit) -> Manifest {
    let mut out = Manifest::default();
    for item in doc.map_range(ROOT, ..) {
        let key = item.key.to_string();
        match accept(doc, &key) {
            Ok((path, versions)) => {
                out.entries.insert(path, versions);
            }
            Err((reason, why, origin)) => out.refused.push(Refused {
                key: crate::logtext::for_log(&key),
                origin,
                reason,
                why,
            }),
        }
    }
    out
}

type Refusal = (&'static str, String, Option<String>);

fn accept(doc: &AutoCommit, key: &str) -> Result<(ScriptPath, (Entry, Vec<Entry>)), Refusal> {
    let path = ScriptPath::parse(key).map_err(|e| (e.reason(), e.to_string(), None))?;
    let undecodable = || {
        (
            "undecodable",
            "value is not a manifest entry".to_string(),
            None,
        )
    };
    let winner = get(doc, key).ok_or_else(undecodable)?;
    let values = doc.get_all(ROOT, key).map_err(|_| undecodable())?;
    let losers: Vec<Entry> = values
        .iter()
        .filter_map(|(v, _)| decode(v))
        .filter(|e| *e != winner)
        .collect();
    if let Some(e) = std::iter::once(&winner)
        .chain(&losers)
        .find(|e| e.size > super::MAX_FILE)
    {
        return Err((
            "too-large",
            format!("{} bytes (limit {})", e.size, super::MAX_FILE),
            Some(e.origin.clone()),
        ));
    }
    Ok((path, (winner, losers)))
}

pub fn put(
    doc: &mut AutoCommit,
    path: &str,
    entry: &Entry,
) -> Result<(), automerge::AutomergeError> {
    let bytes = postcard::to_stdvec(entry).expect("entries always encode");
    doc.put(ROOT, path, ScalarValue::Bytes(bytes))
}
