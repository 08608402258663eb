//! How keys and counters sit in the document's root map.
//!
//! A plain key `k` is the root key `k` holding a `Bytes` scalar. A counter
//! `k` is one root key per node that ever incremented it,
//! `\0c\0k\0<node>`, holding that node's running total as an `Int`; the
//! counter reads as the sum. Only a node writes its own slot, so slots
//! never conflict and concurrent increments all count. User keys may not
//! contain NUL, so the two kinds cannot collide; keys starting with NUL are
//! never shown to scripts. A root key holding an Automerge `Counter` (the
//! layout before slots) still reads as a counter and is folded into a slot
//! at its next increment.

use std::collections::BTreeSet;

use automerge::transaction::Transactable;
use automerge::{
    ActorId, AutoCommit, AutomergeError, ObjId, Patch, PatchAction, Prop, ROOT, ReadDoc,
    ScalarValue, ScalarValueRef, Value, ValueRef,
};

pub const COUNTER_PREFIX: &str = "\0c\0";

pub fn slot_prefix(key: &str) -> String {
    format!("{COUNTER_PREFIX}{key}\0")
}

pub fn slot_key(key: &str, node: &str) -> String {
    format!("{COUNTER_PREFIX}{key}\0{node}")
}

/// The counter a slot key belongs to.
pub fn counter_name(slot: &str) -> Option<&str> {
    slot.strip_prefix(COUNTER_PREFIX)?
        .rsplit_once('\0')
        .map(|(name, _node)| name)
}

pub fn scalar_i64(s: &ScalarValue) -> Option<i64> {
    match s {
        ScalarValue::Int(i) => Some(*i),
        ScalarValue::Uint(u) => Some(*u as i64),
        ScalarValue::Counter(c) => Some(i64::from(c)),
        _ => None,
    }
}

/// Root keys in `[start, …)` that start with `start`.
fn range<'a>(
    doc: &'a AutoCommit,
    start: String,
) -> impl Iterator<Item = (String, ValueRef<'a>)> + 'a {
    let prefix = start.clone();
    doc.map_range(ROOT, start..)
        .take_while(move |item| item.key.starts_with(prefix.as_str()))
        .map(|item| (item.key.to_string(), item.value))
}

/// The sum of a counter's slots, or none if it has none.
pub fn counter_sum(doc: &AutoCommit, key: &str) -> Option<i64> {
    let mut sum = None;
    for (_, value) in range(doc, slot_prefix(key)) {
        if let ValueRef::Scalar(s) = value {
            let v = match s {
                ScalarValueRef::Int(i) | ScalarValueRef::Counter(i) => i,
                ScalarValueRef::Uint(u) => u as i64,
                _ => 0,
            };
            sum = Some(sum.unwrap_or(0i64).wrapping_add(v));
        }
    }
    sum
}

/// A counter's slots: each node's running total, with the values that
/// conflict with it (only its node writes a slot, so a conflict means two
/// lives of that node wrote it concurrently, e.g. across a `kill -9`).
pub fn counter_slots(doc: &AutoCommit, key: &str) -> Vec<(String, Vec<i64>)> {
    let prefix = slot_prefix(key);
    range(doc, prefix.clone())
        .map(|(k, _)| {
            let values = (doc
                .get_all(ROOT, k.as_str())
                .unwrap_or_default()
                .into_iter())
            .filter_map(|(v, _)| match v {
                Value::Scalar(s) => scalar_i64(&s),
                Value::Object(_) => None,
            })
            .collect();
            (k[prefix.len()..].to_string(), values)
        })
        .collect()
}

/// What `get` returns: a plain value's bytes, or a counter as decimal text.
pub fn read(doc: &AutoCommit, key: &str) -> Option<Vec<u8>> {
    match doc.get(ROOT, key).ok()? {
        Some((Value::Scalar(s), _)) => Some(match s.as_ref() {
            ScalarValue::Bytes(b) => b.clone(),
            ScalarValue::Str(s) => s.as_bytes().to_vec(),
            ScalarValue::Counter(c) => i64::from(c).to_string().into_bytes(),
            ScalarValue::Int(i) => i.to_string().into_bytes(),
            ScalarValue::Uint(i) => i.to_string().into_bytes(),
            ScalarValue::F64(f) => f.to_string().into_bytes(),
            ScalarValue::Boolean(b) => b.to_string().into_bytes(),
            ScalarValue::Timestamp(t) => t.to_string().into_bytes(),
            ScalarValue::Null | ScalarValue::Unknown { .. } => Vec::new(),
        }),
        Some((Value::Object(_), _)) => None,
        None => counter_sum(doc, key).map(|n| n.to_string().into_bytes()),
    }
}

/// Visible keys (plain and counters) starting with `prefix`, sorted.
pub fn keys(doc: &AutoCommit, prefix: &str) -> Vec<String> {
    let mut out: BTreeSet<String> = range(doc, prefix.to_string())
        .map(|(k, _)| k)
        .filter(|k| !k.starts_with('\0'))
        .collect();
    for (slot, _) in range(doc, format!("{COUNTER_PREFIX}{prefix}")) {
        if let Some(name) = counter_name(&slot) {
            out.insert(name.to_string());
        }
    }
    out.into_iter().collect()
}

/// Delete every slot of counter `key`; true if there were any.
pub fn delete_slots(doc: &mut AutoCommit, key: &str) -> Result<bool, AutomergeError> {
    let slots: Vec<String> = range(doc, slot_prefix(key)).map(|(k, _)| k).collect();
    for slot in &slots {
        doc.delete(ROOT, slot.as_str())?;
    }
    Ok(!slots.is_empty())
}

/// The visible keys a merge's patches touched.
pub fn changed_keys(patches: &[Patch]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for patch in patches {
        if patch.obj != ROOT {
            continue;
        }
        let key = match &patch.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => key,
            PatchAction::Increment {
                prop: Prop::Map(key),
                ..
            }
            | PatchAction::Conflict {
                prop: Prop::Map(key),
            } => key,
            _ => continue,
        };
        if let Some(name) = visible_name(key) {
            keys.insert(name.to_string());
        }
    }
    keys
}

/// The key scripts see for root key `key`: itself, the counter a slot
/// belongs to, or none (the store's own records).
fn visible_name(key: &str) -> Option<&str> {
    match key.strip_prefix('\0') {
        None => Some(key),
        Some(_) => counter_name(key),
    }
}

/// [`differences`] among the root keys `keys` only.
pub fn differences_in(a: &AutoCommit, b: &AutoCommit, keys: &BTreeSet<String>) -> BTreeSet<String> {
    fn value<'d>(doc: &'d AutoCommit, key: &str) -> Option<Value<'d>> {
        doc.get(ROOT, key).ok().flatten().map(|(v, _)| v)
    }
    (keys.iter())
        .filter(|k| value(a, k) != value(b, k))
        .filter_map(|k| visible_name(k))
        .map(String::from)
        .collect()
}

/// The visible keys whose values differ between two documents (after a
/// history was replaced): one pass over both root maps in key order.
pub fn differences(a: &AutoCommit, b: &AutoCommit) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut note = |key: &str| {
        if let Some(name) = visible_name(key) {
            out.insert(name.to_string());
        }
    };
    let (mut xs, mut ys) = (
        a.map_range(ROOT, ..).peekable(),
        b.map_range(ROOT, ..).peekable(),
    );
    loop {
        match (xs.peek(), ys.peek()) {
            (None, None) => break,
            (Some(x), Some(y)) if x.key == y.key => {
                if x.value != y.value {
                    note(&x.key);
                }
                xs.next();
                ys.next();
            }
            (Some(x), Some(y)) if x.key < y.key => {
                note(&x.key);
                xs.next();
            }
            (Some(_), Some(y)) | (None, Some(y)) => {
                note(&y.key);
                ys.next();
            }
            (Some(x), None) => {
                note(&x.key);
                xs.next();
            }
        }
    }
    out
}

/// If plain key `key` holds concurrent values (written on two sides of a
/// partition), the actor whose value reads (the winner) and the others'.
pub fn conflict(doc: &AutoCommit, key: &str) -> Option<(ActorId, Vec<ActorId>)> {
    let all = doc.get_all(ROOT, key).ok()?;
    if all.len() < 2 {
        return None;
    }
    let (_, winner) = doc.get(ROOT, key).ok()??;
    let actor = |id: &ObjId| match id {
        ObjId::Id(_, actor, _) => Some(actor.clone()),
        ObjId::Root => None,
    };
    let losers = (all.iter())
        .filter(|(_, id)| *id != winner)
        .filter_map(|(_, id)| actor(id))
        .collect();
    Some((actor(&winner)?, losers))
}
