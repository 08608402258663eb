use automerge::transaction::Transactable;

use super::*;

fn replica(name: &str) -> AutoCommit {
    let mut id = name.as_bytes().to_vec();
    id.push(0);
    AutoCommit::new().with_actor(ActorId::from(id))
}

fn put(doc: &mut AutoCommit, key: &str, value: &str) {
    doc.put(ROOT, key, ScalarValue::Bytes(value.into()))
        .unwrap();
    doc.commit();
}

fn get(doc: &AutoCommit, key: &str) -> Option<String> {
    match doc.get(ROOT, key).unwrap()? {
        (Value::Scalar(s), _) => match s.as_ref() {
            ScalarValue::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
            ScalarValue::Int(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        },
        _ => None,
    }
}

/// The visible state, epoch records left out.
fn state(doc: &AutoCommit) -> Vec<(String, String)> {
    (doc.keys(ROOT))
        .filter(|k| !k.starts_with(META_PREFIX))
        .map(|k| {
            let v = get(doc, &k).unwrap();
            (k, v)
        })
        .collect()
}

fn merge(a: &mut AutoCommit, b: &mut AutoCommit) {
    a.merge(b).unwrap();
    b.merge(a).unwrap();
    assert_eq!(a.get_heads(), b.get_heads());
}

fn epoch_info(doc: &mut AutoCommit) -> EpochInfo {
    let changes = doc.get_changes(&[]);
    EpochInfo::with_base(doc, &changes)
}

fn changes(doc: &mut AutoCommit) -> usize {
    doc.get_changes(&[]).len()
}

#[test]
fn replicas_compacting_at_the_same_heads_make_the_same_document() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    for i in 0..50 {
        put(&mut a, &format!("k{}", i % 7), &format!("a{i}"));
        put(&mut b, &format!("k{}", i % 5), &format!("b{i}"));
    }
    merge(&mut a, &mut b);
    let before = state(&a);
    let h = a.get_heads();
    let mut ca = compact(&mut a, &h).unwrap().doc;
    let mut cb = compact(&mut b, &h).unwrap().doc;
    assert_eq!(ca.get_heads(), cb.get_heads());
    assert_eq!(state(&ca), before);
    assert_eq!(changes(&mut ca), 1);
    let info = epoch_info(&mut ca);
    assert_eq!(info.epoch, 1);
    assert_eq!(info.base, Some(ca.get_heads()[0]));
    // And again: epoch 2 remembers epoch 1's base.
    let h = ca.get_heads();
    let mut c2 = compact(&mut ca, &h).unwrap().doc;
    let info2 = epoch_info(&mut c2);
    assert_eq!(
        (info2.epoch, info2.lineage.get(&1)),
        (2, info.base.as_ref())
    );
    assert_eq!(state(&c2), before);
    assert_eq!(changes(&mut c2), 1);
}

#[test]
fn changes_after_the_compaction_point_are_recreated_the_same_everywhere() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    put(&mut a, "x", "1");
    put(&mut b, "y", "1");
    merge(&mut a, &mut b);
    let h = a.get_heads();
    // Past `h`: concurrent writes on both sides, one key on both.
    put(&mut a, "x", "2");
    put(&mut a, "shared", "from a");
    put(&mut b, "shared", "from b");
    put(&mut b, "y", "2");
    // `a` compacts before hearing from `b`; `b` after merging `a`'s.
    let mut ca = compact(&mut a, &h).unwrap().doc;
    b.merge(&mut a).unwrap();
    let mut cb = compact(&mut b, &h).unwrap().doc;
    assert_eq!(changes(&mut ca), 1 + 2);
    assert_eq!(changes(&mut cb), 1 + 4);
    // Same epoch, same base: they merge, and `a`'s two re-created changes
    // are the same changes on both sides (no duplicates).
    merge(&mut ca, &mut cb);
    assert_eq!(changes(&mut ca), 1 + 4);
    assert_eq!(get(&ca, "x").as_deref(), Some("2"));
    assert_eq!(get(&ca, "y").as_deref(), Some("2"));
    assert!(get(&ca, "shared").is_some());
    assert_eq!(state(&ca), state(&cb));
}

#[test]
fn a_node_away_across_two_compactions_rebases_and_keeps_its_writes() {
    let (mut a, mut b, mut c) = (replica("a"), replica("b"), replica("c"));
    put(&mut a, "x", "a0");
    put(&mut c, "slot\0c", "1");
    merge(&mut a, &mut b);
    merge(&mut a, &mut c);
    merge(&mut a, &mut b);
    // `c` goes away after sending one write `a` has but `b` does not.
    put(&mut c, "c-before", "sent");
    a.merge(&mut c).unwrap();
    put(&mut c, "slot\0c", "2");
    put(&mut c, "x", "c-away");
    put(&mut c, "c-only", "kept");
    // `a` and `b` compact twice meanwhile, writing between.
    b.merge(&mut a).unwrap();
    put(&mut a, "x", "a1");
    merge(&mut a, &mut b);
    let h = a.get_heads();
    let (mut a1, mut b1) = (
        compact(&mut a, &h).unwrap().doc,
        compact(&mut b, &h).unwrap().doc,
    );
    put(&mut b1, "b-key", "b1");
    merge(&mut a1, &mut b1);
    let h = a1.get_heads();
    let mut a2 = compact(&mut a1, &h).unwrap().doc;
    put(&mut a2, "after", "a2");
    // `c` comes back on epoch 0 and moves onto `a`'s epoch 2.
    let (c2, in_lineage) = rebase(&mut c, a2.clone()).unwrap();
    let mut c2 = c2.doc;
    assert!(in_lineage);
    assert_eq!(get(&c2, "c-only").as_deref(), Some("kept"));
    assert_eq!(get(&c2, "c-before").as_deref(), Some("sent"));
    assert_eq!(get(&c2, "slot\0c").as_deref(), Some("2"));
    assert_eq!(get(&c2, "b-key").as_deref(), Some("b1"));
    assert_eq!(get(&c2, "after").as_deref(), Some("a2"));
    // Its write made while away comes after everything in the base.
    assert_eq!(get(&c2, "x").as_deref(), Some("c-away"));
    // `c-before` was covered by a base: not re-created.
    let recreated = (c2.get_changes(&[]).iter())
        .filter(|ch| ch.message().is_some_and(|m| m.starts_with(ORIGIN_MESSAGE)))
        .count();
    assert_eq!(recreated, 3, "c's three writes made while away");
    merge(&mut a2, &mut c2);
    assert_eq!(state(&a2), state(&c2));
}

#[test]
fn two_nodes_rebasing_the_same_changes_make_the_same_changes() {
    let (mut a, mut c, mut d) = (replica("a"), replica("c"), replica("d"));
    put(&mut a, "x", "0");
    merge(&mut a, &mut c);
    merge(&mut a, &mut d);
    // `c` and `d` are away together and exchange their writes.
    put(&mut c, "x", "c");
    put(&mut d, "y", "d");
    merge(&mut c, &mut d);
    let h = a.get_heads();
    let mut a1 = compact(&mut a, &h).unwrap().doc;
    let (c1, _) = rebase(&mut c, a1.clone()).unwrap();
    let mut c1 = c1.doc;
    let (d1, _) = rebase(&mut d, a1.clone()).unwrap();
    let mut d1 = d1.doc;
    assert_eq!(c1.get_heads(), d1.get_heads());
    merge(&mut a1, &mut c1);
    merge(&mut a1, &mut d1);
    assert_eq!(changes(&mut a1), 1 + 2);
    assert_eq!(get(&a1, "x").as_deref(), Some("c"));
}

/// A node away for more compactions than the lineage keeps: its writes
/// from before it left (covered by a base long ago) are not re-applied
/// over newer values or deleted keys; what it wrote while away is kept.
#[test]
fn a_node_away_longer_than_the_lineage_reaches_reapplies_nothing_old() {
    let (mut a, mut c) = (replica("a"), replica("c"));
    put(&mut c, "gone", "soon deleted");
    merge(&mut a, &mut c);
    let h = a.get_heads();
    let (mut a1, mut c1) = (
        compact(&mut a, &h).unwrap().doc,
        compact(&mut c, &h).unwrap().doc,
    );
    // A write of `c`'s after that base, which `a` gets.
    put(&mut c1, "x", "old");
    merge(&mut a1, &mut c1);
    let (mut a, mut c) = (a1, c1);
    // `c` goes away; `a` overwrites, deletes and compacts many times.
    put(&mut c, "offline", "kept");
    put(&mut a, "x", "new");
    a.delete(ROOT, "gone").unwrap();
    a.commit();
    for i in 0..EPOCHS_KEPT + 6 {
        let h = a.get_heads();
        a = compact(&mut a, &h).unwrap().doc;
        put(&mut a, "tick", &i.to_string());
    }
    let info = epoch_info(&mut a);
    assert!(!info.lineage.contains_key(&1) && info.epoch > EPOCHS_KEPT);
    let (c2, in_lineage) = rebase(&mut c, a.clone()).unwrap();
    let c2 = c2.doc;
    assert!(in_lineage, "the same store, however long away");
    assert_eq!(get(&c2, "x").as_deref(), Some("new"));
    assert_eq!(get(&c2, "gone"), None);
    assert_eq!(get(&c2, "offline").as_deref(), Some("kept"));
    // And a store that never met this one is still told apart.
    let mut stranger = replica("s");
    put(&mut stranger, "mine", "1");
    let h = stranger.get_heads();
    let mut stranger = compact(&mut stranger, &h).unwrap().doc;
    let (_, in_lineage) = rebase(&mut stranger, a.clone()).unwrap();
    assert!(!in_lineage);
}

/// A compaction made on a copy, caught up with what the live document
/// got meanwhile (own writes, a peer's concurrent ones, a key the base
/// holds), is the document compacting the live one makes: same heads.
#[test]
fn a_compaction_made_on_a_copy_catches_up_to_the_same_document() {
    let (mut a, mut b) = (replica("a"), replica("b"));
    for i in 0..20 {
        put(&mut a, &format!("k{}", i % 4), &format!("a{i}"));
        put(&mut b, &format!("k{}", i % 3), &format!("b{i}"));
    }
    merge(&mut a, &mut b);
    let h = a.get_heads();
    put(&mut a, "after", "1");
    let mut copy = a.clone();
    let mut made = compact(&mut copy, &h).unwrap();
    // Meanwhile, on the live document.
    put(&mut a, "k0", "while compacting");
    put(&mut b, "k1", "from b, concurrent");
    put(&mut b, "fresh", "b");
    a.merge(&mut b).unwrap();
    put(&mut a, "after", "2");
    let touched = made.catch_up(&mut a).unwrap();
    for key in ["k0", "k1", "fresh", "after"] {
        assert!(touched.contains(key), "{key} not in {touched:?}");
    }
    assert!(!touched.contains("k2"));
    let mut direct = compact(&mut a.clone(), &h).unwrap().doc;
    assert_eq!(made.doc.get_heads(), direct.get_heads());
    assert_eq!(state(&made.doc), state(&a));
    // Caught up twice: the second time only what came after the first.
    put(&mut a, "k3", "later");
    assert_eq!(
        made.catch_up(&mut a)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["k3"]
    );
    assert_eq!(state(&made.doc), state(&a));
}

/// The same for a rebase onto a peer's later epoch: made on a copy, then
/// caught up with a write made meanwhile, it is the rebase of the live
/// document.
#[test]
fn a_rebase_made_on_a_copy_catches_up_to_the_same_document() {
    let (mut a, mut c) = (replica("a"), replica("c"));
    put(&mut a, "x", "1");
    merge(&mut a, &mut c);
    put(&mut c, "away", "1");
    let h = a.get_heads();
    let mut a1 = compact(&mut a, &h).unwrap().doc;
    put(&mut a1, "y", "a1");
    let (mut made, in_lineage) = rebase(&mut c.clone(), a1.clone()).unwrap();
    assert!(in_lineage);
    put(&mut c, "away", "2");
    put(&mut c, "late", "1");
    let touched = made.catch_up(&mut c).unwrap();
    assert_eq!(touched.into_iter().collect::<Vec<_>>(), ["away", "late"]);
    let (mut direct, _) = rebase(&mut c.clone(), a1).unwrap();
    assert_eq!(made.doc.get_heads(), direct.doc.get_heads());
    assert_eq!(get(&made.doc, "away").as_deref(), Some("2"));
    assert_eq!(get(&made.doc, "y").as_deref(), Some("a1"));
}

#[test]
fn a_document_saved_after_compaction_loads_with_its_epoch() {
    let mut a = replica("a");
    put(&mut a, "x", "1");
    let h = a.get_heads();
    let mut c = compact(&mut a, &h).unwrap().doc;
    put(
        &mut c.clone().with_actor(ActorId::from(b"z".as_slice())),
        "ignored",
        "",
    );
    let mut loaded = AutoCommit::load(&c.save()).unwrap();
    let info = epoch_info(&mut loaded);
    assert_eq!(info.epoch, 1);
    assert_eq!(info.base, c.get_heads().first().copied());
    assert_eq!(state(&loaded), vec![("x".to_string(), "1".to_string())]);
}

/// Four replicas writing (own keys, shared keys, deletes, their counter
/// slot), merging in random pairs, compacting (all but one away) and
/// catching up as the protocol does: a replica one epoch behind that holds
/// the compaction point compacts itself, any other rebases onto the
/// peer's document. At the end every replica holds the same contents, each
/// own key its owner's last value and each slot its owner's last total.
#[test]
fn random_writes_merges_and_compactions_converge_and_lose_nothing() {
    const N: usize = 4;
    let mut rs: Vec<AutoCommit> = (0..N).map(|i| replica(&format!("r{i}"))).collect();
    // Per epoch (by base), the heads it was compacted at.
    let mut points: HashMap<ChangeHash, Vec<ChangeHash>> = HashMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for step in 0..1500 {
        let r = next(N as u64) as usize;
        match next(12) {
            0..=3 => {
                let key = format!("own{r}.{}", next(4));
                put(&mut rs[r], &key, &format!("{step}"));
                last.insert(key, format!("{step}"));
            }
            4 | 5 => put(
                &mut rs[r],
                &format!("shared{}", next(3)),
                &format!("{step}"),
            ),
            6 => {
                let key = format!("own{r}.{}", next(4));
                if rs[r].get(ROOT, key.as_str()).unwrap().is_some() {
                    rs[r].delete(ROOT, key.as_str()).unwrap();
                    rs[r].commit();
                }
                last.remove(&key);
            }
            7 | 8 => {
                let key = format!("slot{r}");
                let n = get(&rs[r], &key).map_or(0, |v| v.parse::<i64>().unwrap()) + 1;
                rs[r].put(ROOT, key.as_str(), ScalarValue::Int(n)).unwrap();
                rs[r].commit();
                last.insert(key, n.to_string());
            }
            9 | 10 => {
                let j = next(N as u64) as usize;
                if j != r {
                    meet(&mut rs, r, j, &points);
                }
            }
            _ => {
                // Every replica but one away (or none) shares its heads,
                // and they compact at them. (Two groups never compact apart:
                // the protocol wants every member in sync.)
                let away = next(N as u64 + 1) as usize;
                let group: Vec<usize> = (0..N).filter(|&i| i != away).collect();
                for &i in &group[1..] {
                    meet(&mut rs, group[0], i, &points);
                }
                for &i in &group[1..] {
                    meet(&mut rs, group[0], i, &points);
                }
                let h = rs[group[0]].get_heads();
                if group.iter().all(|&i| rs[i].get_heads() == h) {
                    for &i in &group {
                        // Half the time on a copy, with a write to the
                        // live replica before it catches up (as a node
                        // compacts while its scripts write).
                        rs[i] = if next(2) == 0 {
                            compact(&mut rs[i], &h).unwrap().doc
                        } else {
                            let mut made = compact(&mut rs[i].clone(), &h).unwrap();
                            let key = format!("own{i}.{}", next(4));
                            put(&mut rs[i], &key, &format!("{step} during"));
                            last.insert(key, format!("{step} during"));
                            made.catch_up(&mut rs[i]).unwrap();
                            made.doc
                        };
                    }
                    points.insert(epoch_info(&mut rs[group[0]]).base.unwrap(), h);
                }
            }
        }
    }
    for _ in 0..2 {
        for i in 0..N {
            for j in 0..N {
                if i != j {
                    meet(&mut rs, i, j, &points);
                }
            }
        }
    }
    let first = state(&rs[0]);
    for r in &rs[1..] {
        assert_eq!(state(r), first);
    }
    let expected: Vec<(String, String)> = last.into_iter().collect();
    let mine: Vec<(String, String)> = (first.into_iter())
        .filter(|(k, _)| !k.starts_with("shared"))
        .collect();
    assert_eq!(mine, expected);
    assert!(
        epoch_info(&mut rs[0]).epoch > 3,
        "too few compactions to mean anything"
    );
}

/// Replicas `i` and `j` meet: the one on the older epoch (or the smaller
/// base, for two lineages) catches up, then they merge.
fn meet(rs: &mut [AutoCommit], i: usize, j: usize, points: &HashMap<ChangeHash, Vec<ChangeHash>>) {
    let (ei, ej) = (epoch_info(&mut rs[i]), epoch_info(&mut rs[j]));
    if (ei.epoch, ei.base) != (ej.epoch, ej.base) {
        let (behind, ahead, info) = if (ei.epoch, ei.base) < (ej.epoch, ej.base) {
            (i, j, ej)
        } else {
            (j, i, ei)
        };
        let point = &points[&info.base.unwrap()];
        let holds_point = point
            .iter()
            .all(|h| rs[behind].get_change_by_hash(h).is_some());
        let own = epoch_info(&mut rs[behind]).epoch;
        let mut caught_up = None;
        if own + 1 == info.epoch && holds_point {
            let c = compact(&mut rs[behind], point).unwrap().doc;
            let mut c2 = c.clone();
            if epoch_info(&mut c2).base == info.base {
                caught_up = Some(c);
            }
        }
        let peer = rs[ahead].clone();
        rs[behind] = match caught_up {
            Some(c) => c,
            None => {
                let (doc, in_lineage) = rebase(&mut rs[behind], peer).unwrap();
                let doc = doc.doc;
                assert!(in_lineage);
                doc
            }
        };
    }
    let (lo, hi) = rs.split_at_mut(i.max(j));
    let (a, b) = (&mut lo[i.min(j)], &mut hi[0]);
    merge(a, b);
}
