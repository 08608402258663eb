//! Merges report every key they change: the keys come from the patches
//! Automerge logs while applying a peer's changes (not from a diff of the
//! whole document), so they are checked here against what a script would
//! read before and after each merge.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use automerge::sync;

use super::{KvDoc, KvLimits};
use crate::docsync::SyncTarget;
use crate::pattern::Pattern;
use crate::router::{Delivery, MailboxRx, Router, SubKind, mailbox};

struct Replica {
    kv: KvDoc,
    rx: MailboxRx,
}

fn replica(name: &str) -> Replica {
    let router = Arc::new(Router::new(name, 1 << 20));
    let (tx, rx) = mailbox(100_000);
    router.register("watcher".into(), tx);
    router.subscribe("watcher", 1, SubKind::Watch { prefix: "".into() });
    let conflicts = SubKind::Event {
        from: Pattern::new("*"),
        name: Pattern::new(crate::lifecycle::KV_CONFLICT),
    };
    router.subscribe("watcher", 1, conflicts);
    let kv = KvDoc::open(None, KvLimits::default(), router).unwrap();
    Replica { kv, rx }
}

/// Every visible key and what `get` returns for it.
fn contents(kv: &KvDoc) -> BTreeMap<String, Vec<u8>> {
    (kv.keys("").into_iter())
        .map(|k| {
            let v = kv.get(&k).unwrap();
            (k, v)
        })
        .collect()
}

/// Keys reported to watchers, and conflict events, since the last call.
fn reported(r: &mut Replica) -> (Vec<String>, usize) {
    let (mut keys, mut conflicts) = (Vec::new(), 0);
    while let Some(d) = r.rx.try_recv() {
        match d {
            Delivery::KvChange { key, .. } => keys.push(key.to_string()),
            Delivery::Event { .. } => conflicts += 1,
            _ => {}
        }
    }
    (keys, conflicts)
}

/// One sync exchange `from` → `to` until both are quiet, checking each
/// merge into `to`: every key whose value changed is reported, once.
fn sync_into(from: &mut Replica, to: &mut Replica, states: &mut (sync::State, sync::State)) {
    reported(to);
    loop {
        let to_peer = from.kv.generate(&mut states.0);
        let back = to.kv.generate(&mut states.1);
        if to_peer.is_none() && back.is_none() {
            return;
        }
        if let Some(m) = to_peer {
            let before = contents(&to.kv);
            to.kv.receive(&mut states.1, &m).unwrap();
            let after = contents(&to.kv);
            let (keys, _) = reported(to);
            let unique: BTreeSet<_> = keys.iter().cloned().collect();
            assert_eq!(unique.len(), keys.len(), "a key reported twice: {keys:?}");
            let changed: BTreeSet<String> = (before.keys().chain(after.keys()))
                .filter(|k| before.get(*k) != after.get(*k))
                .cloned()
                .collect();
            let missed: Vec<_> = changed.difference(&unique).collect();
            assert!(missed.is_empty(), "changed but not reported: {missed:?}");
        }
        if let Some(m) = back {
            from.kv.receive(&mut states.0, &m).unwrap();
            reported(from);
        }
    }
}

#[test]
fn merges_report_exactly_the_changed_keys() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut states = Default::default();
    a.kv.set("t/1", b"one").unwrap();
    a.kv.set("t/2", b"two").unwrap();
    a.kv.incr("hits", 3).unwrap();
    // The first merge into an empty document.
    sync_into(&mut a, &mut b, &mut states);
    a.kv.set("t/1", b"uno").unwrap();
    a.kv.delete("t/2").unwrap();
    a.kv.incr("hits", 1).unwrap();
    a.kv.set("t/1", b"eins").unwrap();
    reported(&mut b);
    let msg = a.kv.generate(&mut states.0).unwrap();
    b.kv.receive(&mut states.1, &msg).unwrap();
    let (mut keys, conflicts) = reported(&mut b);
    keys.sort();
    assert_eq!(keys, ["hits", "t/1", "t/2"]);
    assert_eq!(conflicts, 0);
    assert_eq!(b.kv.get("t/1").as_deref(), Some(&b"eins"[..]));
    assert_eq!(b.kv.get("hits").as_deref(), Some(&b"4"[..]));
    // Concurrent writes: the key is reported and the conflict announced.
    sync_into(&mut b, &mut a, &mut (states.1.clone(), states.0.clone()));
    a.kv.set("t/3", b"from a").unwrap();
    b.kv.set("t/3", b"from b").unwrap();
    let msg = a.kv.generate(&mut states.0).unwrap();
    reported(&mut b);
    b.kv.receive(&mut states.1, &msg).unwrap();
    let (keys, conflicts) = reported(&mut b);
    assert_eq!(keys, ["t/3"]);
    assert_eq!(conflicts, 1);
}

type States = BTreeMap<(usize, usize), (sync::State, sync::State)>;

/// [`sync_into`] from replica `i` to replica `j` (`i != j`), with the
/// pair's sync states kept in `states`.
fn sync_pair(rs: &mut [Replica], states: &mut States, i: usize, j: usize) {
    let st = states.entry((i, j)).or_default();
    let (lo, hi) = rs.split_at_mut(i.max(j));
    let (from, to) = if i < j {
        (&mut lo[i], &mut hi[0])
    } else {
        (&mut hi[0], &mut lo[j])
    };
    sync_into(from, to, st);
}

/// Three replicas, random writes (unique values, deletes, increments) and
/// random pairwise exchanges: no merge misses a changed key, and all end
/// with the same contents.
#[test]
fn random_writes_and_merges_never_miss_a_change() {
    let mut rs = [replica("a"), replica("b"), replica("c")];
    let mut states = States::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..600 {
        let r = next(3) as usize;
        let key = format!("k{}", next(12));
        match next(10) {
            0..=5 => rs[r].kv.set(&key, format!("{step}").as_bytes()).unwrap(),
            6 => drop(rs[r].kv.delete(&key).unwrap()),
            _ => {
                let counter = format!("n{}", next(3));
                rs[r].kv.incr(&counter, 1 + next(5) as i64).unwrap();
            }
        }
        if next(3) == 0 {
            let (i, j) = (next(3) as usize, next(3) as usize);
            if i != j {
                sync_pair(&mut rs, &mut states, i, j);
            }
        }
    }
    for (i, j) in [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2)] {
        sync_pair(&mut rs, &mut states, i, j);
    }
    let first = contents(&rs[0].kv);
    assert!(first.len() > 5, "{first:?}");
    for r in &rs[1..] {
        assert_eq!(contents(&r.kv), first);
    }
}

/// Compaction waits for every member; a member gone for good can be
/// forgotten, and then it does not. The follower makes the same epoch from
/// the leader's next message, and reports the keys whose value it changed.
#[test]
fn compaction_waits_for_members_and_followers_make_the_same_epoch() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    let mut states = Default::default();
    a.kv.set("x", b"1").unwrap();
    b.kv.set("y", b"1").unwrap();
    sync_into(&mut a, &mut b, &mut states);
    assert_eq!(a.kv.members(), ["a", "b"]);
    let heads = a.kv.heads();
    // `b` is a member and did not say it holds `heads`.
    assert_eq!(
        a.kv.compact_at(&heads, &[]).unwrap(),
        super::Compaction::Waiting
    );
    assert_eq!(a.kv.epoch().epoch, 0);
    assert_eq!(
        a.kv.compact_at(&heads, &["b".into()]).unwrap(),
        super::Compaction::Done
    );
    assert_eq!(a.kv.epoch().epoch, 1);
    // A write after the point, then `b` hears from `a`: it holds the
    // point, so it compacts itself, and ends with `a`'s heads (each merge
    // or move checked by `sync_into`: every changed key reported once).
    a.kv.set("x", b"2").unwrap();
    sync_into(&mut a, &mut b, &mut Default::default());
    assert_eq!((b.kv.epoch(), b.kv.heads()), (a.kv.epoch(), a.kv.heads()));
    assert_eq!(b.kv.get("x").as_deref(), Some(&b"2"[..]));
    assert!(a.kv.history_len() <= 3, "{}", a.kv.history_len());
    // `b` leaves for good: forgotten, it no longer holds compaction back.
    assert!(a.kv.forget_member("b").unwrap());
    assert!(!a.kv.forget_member("b").unwrap());
    assert_eq!(a.kv.members(), ["a"]);
    let heads = a.kv.heads();
    assert_eq!(
        a.kv.compact_at(&heads, &[]).unwrap(),
        super::Compaction::Done
    );
    assert_eq!(a.kv.epoch().epoch, 2);
}

/// Two lives of one node (a restart after `kill -9` gets a new actor)
/// writing its slot concurrently: the slot holds both values, one wins,
/// and `counter_slots` shows both, per node.
#[test]
fn counter_slots_show_every_value_a_node_wrote_concurrently() {
    let (mut a1, mut a2, mut b) = (replica("a"), replica("a"), replica("b"));
    a1.kv.incr("hits", 5).unwrap();
    a2.kv.incr("hits", 2).unwrap();
    b.kv.incr("hits", 1).unwrap();
    sync_into(&mut a1, &mut b, &mut Default::default());
    sync_into(&mut a2, &mut b, &mut Default::default());
    let slots = b.kv.counter_slots("hits");
    let nodes: Vec<&str> = slots.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["a", "b"]);
    let mut a_values = slots[0].1.clone();
    a_values.sort();
    assert_eq!((a_values, slots[1].1.clone()), (vec![2, 5], vec![1]));
    let sum: i64 = String::from_utf8(b.kv.get("hits").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        sum == 6 || sum == 3,
        "the winner of a's slot plus b's: {sum}"
    );
}
