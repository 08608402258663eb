//! History compaction of the key-value store: epochs.
//!
//! Automerge keeps every change ever made, and a node pays for them in
//! memory and on every merge (the soak measured both growing with history).
//! Compaction replaces a document's history with one *base* change holding
//! the visible state at heads `H` that every linked node has acknowledged,
//! followed by the changes made after `H`, re-created on top of it. The
//! result is the next *epoch* of the document. Nodes never merge documents
//! of different epochs (sync messages carry the epoch; see `KvDoc`).
//!
//! Everything here is deterministic, so that nodes agree without shipping
//! the document:
//! - the base is a function of the state at `H` (fixed actor, time 0, keys
//!   in order): every node that compacts at `H` makes the same bytes, hence
//!   the same hash;
//! - a re-created change is a function of the original change and the
//!   images of its dependencies: same actor, time and operations (by key),
//!   its predecessors read from the new history. Two nodes that re-create
//!   the same change make the same change, and Automerge keeps one.
//!
//! Every change has an *origin* — the epoch it was first made in, its actor
//! and its sequence number there — which a re-created change carries in its
//! message, and the base records, per actor, the highest origin it covers
//! (an actor's changes form a chain, so that covers all its earlier ones). That is what lets a node that was away (on an older epoch, or
//! whose history is not an ancestor of the new base) join: it takes a
//! peer's document and re-creates on top of it each of its changes whose
//! origin that document neither covers nor holds ([`rebase`]). Its writes
//! then come after everything in the peer's base: a value it wrote while
//! away wins over one written concurrently elsewhere (as any later write
//! would). Counters lose nothing: a counter is one slot per node, and only
//! its node writes it.
//!
//! The layout this assumes is the key-value store's: scalars in the root
//! map (see [`super::layout`]). Anything else in a change is dropped from
//! its re-creation with a warning.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroU64;

use anyhow::{Context, Result, bail};
use automerge::legacy::{self, Key, ObjectId, OpId, OpType, SortedVec};
use automerge::{
    ActorId, AutoCommit, Change, ChangeHash, ExpandedChange, ObjId, ROOT, ReadDoc, ScalarValue,
    Value,
};

/// Keys of the epoch's own records (hidden from scripts, as all keys
/// starting with NUL are).
pub const META_PREFIX: &str = "\0e\0";
const EPOCH_KEY: &str = "\0e\0epoch";
/// `\0e\0o\0<epoch>\0<actor hex>` = the highest sequence number of that
/// actor's changes from that epoch the history covers.
const ORIGIN_PREFIX: &str = "\0e\0o\0";
/// The heads the epoch's base was made at (in the previous epoch's
/// history), concatenated: a node still on that epoch that holds them can
/// make the same base itself.
const POINT_KEY: &str = "\0e\0at";
/// `\0e\0b\0<epoch>` = that epoch's base hash: the lineage.
const LINEAGE_PREFIX: &str = "\0e\0b\0";
/// The base of every epoch is this actor's only change.
const BASE_ACTOR: &[u8] = b"covey-epoch-base";
/// Epochs whose bases a document remembers (its lineage). A node away for
/// more compactions than this is told from a store that never met this one
/// by the writers the two share (origins are kept per actor, for good).
pub const EPOCHS_KEPT: u64 = 64;
const ORIGIN_MESSAGE: &str = "covey origin ";

pub fn base_actor() -> ActorId {
    ActorId::from(BASE_ACTOR)
}

/// Where a change was first made.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Origin {
    epoch: u64,
    actor: ActorId,
    seq: u64,
}

impl Origin {
    fn of(change: &Change, epoch: u64) -> Origin {
        change
            .message()
            .and_then(Origin::parse)
            .unwrap_or_else(|| Origin {
                epoch,
                actor: change.actor_id().clone(),
                seq: change.seq(),
            })
    }

    fn parse(msg: &str) -> Option<Origin> {
        let mut it = msg.strip_prefix(ORIGIN_MESSAGE)?.split(' ');
        let epoch = it.next()?.parse().ok()?;
        let actor = ActorId::from(crate::files::unhex(it.next()?)?);
        let seq = it.next()?.parse().ok()?;
        Some(Origin { epoch, actor, seq })
    }

    fn message(&self) -> String {
        let actor = crate::files::hex(self.actor.to_bytes());
        format!("{ORIGIN_MESSAGE}{} {actor} {}", self.epoch, self.seq)
    }
}

/// Per epoch and actor, the highest sequence number covered; compaction
/// keeps one entry per actor, its highest (older documents may hold more).
type OriginClock = BTreeMap<(u64, ActorId), u64>;

/// What a document says about its epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochInfo {
    /// 0 for a document never compacted.
    pub epoch: u64,
    /// The base change (none at epoch 0). A base cannot hold its own
    /// hash: [`EpochInfo::with_base`] finds it among the changes.
    pub base: Option<ChangeHash>,
    /// Bases of the earlier epochs this one descends from (as far as kept).
    pub lineage: BTreeMap<u64, ChangeHash>,
    /// The heads of the previous epoch this one's base was made at.
    pub point: Vec<ChangeHash>,
    clock: OriginClock,
}

impl EpochInfo {
    /// Read from the document (its base's records).
    pub fn of(doc: &AutoCommit) -> EpochInfo {
        let mut info = EpochInfo::default();
        let meta = doc.map_range(ROOT, META_PREFIX.to_string()..);
        for item in meta.take_while(|i| i.key.starts_with(META_PREFIX)) {
            let value = Value::from(item.value);
            let Some(v) = value.as_scalar() else { continue };
            let key = item.key.as_ref();
            if key == EPOCH_KEY {
                info.epoch = scalar_u64(v).unwrap_or(0);
            } else if key == POINT_KEY
                && let ScalarValue::Bytes(b) = v
            {
                let hashes = b.chunks_exact(32).map(ChangeHash::try_from);
                info.point = hashes.filter_map(Result::ok).collect();
            } else if let Some(rest) = key.strip_prefix(ORIGIN_PREFIX) {
                let (epoch, actor) = rest.split_once('\0').unwrap_or(("", ""));
                if let (Ok(e), Some(a), Some(seq)) =
                    (epoch.parse(), crate::files::unhex(actor), scalar_u64(v))
                {
                    info.clock.insert((e, ActorId::from(a)), seq);
                }
            } else if let Some(epoch) = key.strip_prefix(LINEAGE_PREFIX)
                && let (Ok(e), ScalarValue::Bytes(b)) = (epoch.parse(), v)
                && let Ok(h) = ChangeHash::try_from(b.as_slice())
            {
                info.lineage.insert(e, h);
            }
        }
        info
    }

    /// [`EpochInfo::of`] with the base found, and the number of changes
    /// in the history.
    pub fn read(doc: &mut AutoCommit) -> (EpochInfo, usize) {
        let actor = base_actor();
        let meta = doc.get_changes_meta(&[]);
        let base = (meta.iter().find(|c| *c.actor == actor)).map(|c| c.hash);
        let len = meta.len();
        drop(meta);
        (
            EpochInfo {
                base,
                ..EpochInfo::of(doc)
            },
            len,
        )
    }

    /// [`EpochInfo::of`] with the base found among `changes` (the
    /// document's).
    pub fn with_base(doc: &AutoCommit, changes: &[Change]) -> EpochInfo {
        let actor = base_actor();
        EpochInfo {
            base: (changes.iter().find(|c| *c.actor_id() == actor)).map(|c| c.hash()),
            ..EpochInfo::of(doc)
        }
    }

    /// Whether the base covers the change first made as `o`: the actor's
    /// highest covered origin is at or after it. An actor's changes form a
    /// chain (each is an ancestor of its next, re-created or not, across
    /// epochs), so what a base covers of one actor is everything up to
    /// one origin in (epoch, sequence) order.
    fn covers(&self, o: &Origin) -> bool {
        (self.clock.iter()).any(|((e, a), &s)| *a == o.actor && (o.epoch, o.seq) <= (*e, s))
    }

    /// Whether the base covers any change of an actor of `other`'s base or
    /// of `changes`: the two documents have shared writes.
    fn shares_writers(&self, other: &EpochInfo, changes: &[Change]) -> bool {
        let mine: HashSet<&ActorId> = (other.clock.keys().map(|(_, a)| a))
            .chain(changes.iter().map(|c| c.actor_id()))
            .collect();
        self.clock.keys().any(|(_, a)| mine.contains(a))
    }
}

fn scalar_u64(v: &ScalarValue) -> Option<u64> {
    match v {
        ScalarValue::Uint(u) => Some(*u),
        ScalarValue::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

/// The next epoch of `doc`: its state at `at` as one base change, then the
/// changes not in `at`'s history re-created on top. Every node that
/// compacts the same history at the same heads makes the same document
/// (each change's re-creation depends only on its ancestors'); it goes on
/// writing as `doc`'s actor.
pub fn compact(doc: &mut AutoCommit, at: &[ChangeHash]) -> Result<NextEpoch> {
    let changes = doc.get_changes(&[]);
    let info = EpochInfo::with_base(doc, &changes);
    let below = ancestors(&changes, at)?;
    let base_actor = base_actor();
    // Origins the new base covers: the old base's, and every change at or
    // below `at`.
    let mut clock = info.clock.clone();
    for c in changes.iter().filter(|c| below.contains(&c.hash())) {
        if *c.actor_id() == base_actor {
            continue;
        }
        let o = Origin::of(c, info.epoch);
        let max = clock.entry((o.epoch, o.actor)).or_default();
        *max = (*max).max(o.seq);
    }
    let epoch = info.epoch + 1;
    // One entry per actor: its highest covered origin covers the rest
    // (see `EpochInfo::covers`), however many epochs ago they were made.
    let mut newest: HashMap<ActorId, (u64, u64)> = HashMap::new();
    for ((e, actor), seq) in clock {
        let n = newest.entry(actor).or_default();
        *n = (*n).max((e, seq));
    }
    let clock: OriginClock = (newest.into_iter())
        .map(|(actor, (e, seq))| ((e, actor), seq))
        .collect();
    let mut lineage = info.lineage.clone();
    if let Some(b) = info.base {
        lineage.insert(info.epoch, b);
    }
    let mut state = state_at(doc, at);
    let mut point = at.to_vec();
    point.sort();
    let point_bytes = point.iter().flat_map(|h| h.0).collect();
    state.insert(POINT_KEY.into(), ScalarValue::Bytes(point_bytes));
    let (mut next, base) = make_base(epoch, state, &clock, &mut lineage)?;
    let rest = changes.into_iter().filter(|c| !below.contains(&c.hash()));
    let mut trail = Trail::new(base, info.epoch);
    let t = &mut trail;
    Rebuild { doc: &mut next, t }.run(rest, |_| None)?;
    next.set_actor(doc.get_actor().clone());
    Ok(NextEpoch {
        doc: next,
        copied_at: doc.get_heads(),
        trail,
    })
}

/// The next epoch made by [`compact`] or [`rebase`]: of the live document
/// itself, or of a copy, so that the work is done without its lock.
pub struct NextEpoch {
    pub doc: AutoCommit,
    /// The heads of the document it was made of.
    copied_at: Vec<ChangeHash>,
    trail: Trail,
}

impl NextEpoch {
    /// Bring the next epoch up to `live`, the document it was made of a
    /// copy of: the changes made since the copy are re-created on top, as
    /// [`compact`] or [`rebase`] of `live` would have (changes that new
    /// are neither covered by a base nor held by a peer on another epoch).
    /// Returns the keys they touch.
    pub fn catch_up(&mut self, live: &mut AutoCommit) -> Result<BTreeSet<String>> {
        let since = live.get_changes(&self.copied_at);
        let mut touched = BTreeSet::new();
        for c in &since {
            for op in c.decode().operations {
                if let (ObjectId::Root, Key::Map(key)) = (&op.obj, &op.key) {
                    touched.insert(key.to_string());
                }
            }
        }
        let t = &mut self.trail;
        Rebuild {
            doc: &mut self.doc,
            t,
        }
        .run(since.into_iter(), |_| None)?;
        self.copied_at = live.get_heads();
        Ok(touched)
    }
}

/// `ours` moved onto `theirs` (a peer's document of a later epoch, or of
/// another lineage): `theirs` plus each of our changes it neither covers
/// nor holds, re-created on top. Also says whether our base was in their
/// lineage (if not, writes compacted into it that they never saw are not
/// carried over: the caller reports it).
pub fn rebase(ours: &mut AutoCommit, mut theirs: AutoCommit) -> Result<(NextEpoch, bool)> {
    let changes = ours.get_changes(&[]);
    let mine = EpochInfo::with_base(ours, &changes);
    let their_changes = theirs.get_changes(&[]);
    let info = EpochInfo::with_base(&theirs, &their_changes);
    let Some(base) = info.base else {
        bail!("the peer's document has no epoch base");
    };
    let in_lineage = match mine.base {
        None => true,
        Some(b) if info.lineage.contains_key(&mine.epoch) => {
            info.lineage.get(&mine.epoch) == Some(&b)
        }
        // Our epoch is older than their lineage reaches (away for more
        // than EPOCHS_KEPT compactions): the same store if their base
        // covers writes of ours (stores that never met share no actor).
        Some(_) => {
            let oldest = info.lineage.keys().next().copied().unwrap_or(info.epoch);
            mine.epoch < oldest && info.shares_writers(&mine, &changes)
        }
    };
    let base_actor = base_actor();
    // Changes they hold past their base, by origin.
    let held: HashMap<Origin, ChangeHash> = (their_changes.iter())
        .filter(|c| *c.actor_id() != base_actor)
        .map(|c| (Origin::of(c, info.epoch), c.hash()))
        .collect();
    drop(their_changes);
    let mut trail = Trail::new(base, mine.epoch);
    let t = &mut trail;
    Rebuild {
        doc: &mut theirs,
        t,
    }
    .run(changes.into_iter(), |c| {
        if *c.actor_id() == base_actor {
            return Some(base);
        }
        let o = Origin::of(c, mine.epoch);
        if info.covers(&o) {
            return Some(base);
        }
        held.get(&o).copied()
    })?;
    theirs.set_actor(ours.get_actor().clone());
    let next = NextEpoch {
        doc: theirs,
        copied_at: ours.get_heads(),
        trail,
    };
    Ok((next, in_lineage))
}

/// The hashes of `at` and all their ancestors.
fn ancestors(changes: &[Change], at: &[ChangeHash]) -> Result<HashSet<ChangeHash>> {
    let deps: HashMap<ChangeHash, &[ChangeHash]> =
        changes.iter().map(|c| (c.hash(), c.deps())).collect();
    let mut seen = HashSet::new();
    let mut todo: Vec<ChangeHash> = at.to_vec();
    while let Some(h) = todo.pop() {
        if !seen.insert(h) {
            continue;
        }
        let d = deps.get(&h).with_context(|| format!("no change {h}"))?;
        todo.extend_from_slice(d);
    }
    Ok(seen)
}

/// The visible root values at `at`, the epoch's own records left out.
fn state_at(doc: &AutoCommit, at: &[ChangeHash]) -> BTreeMap<String, ScalarValue> {
    let mut state = BTreeMap::new();
    for item in doc.map_range_at(ROOT, .., at) {
        if item.key.starts_with(META_PREFIX) {
            continue;
        }
        let key = item.key.to_string();
        match Value::from(item.value) {
            Value::Scalar(s) => {
                state.insert(key, s.into_owned());
            }
            Value::Object(_) => {
                tracing::warn!(
                    key = crate::logtext::for_log(&key),
                    "compaction: an object in the key-value store is dropped"
                );
            }
        }
    }
    state
}

/// The base change of `epoch` holding `state`, and a document of it alone.
fn make_base(
    epoch: u64,
    mut state: BTreeMap<String, ScalarValue>,
    clock: &OriginClock,
    lineage: &mut BTreeMap<u64, ChangeHash>,
) -> Result<(AutoCommit, ChangeHash)> {
    state.insert(EPOCH_KEY.into(), ScalarValue::Uint(epoch));
    for ((e, actor), seq) in clock {
        let key = format!(
            "{ORIGIN_PREFIX}{e}\0{}",
            crate::files::hex(actor.to_bytes())
        );
        state.insert(key, ScalarValue::Uint(*seq));
    }
    lineage.retain(|e, _| e + EPOCHS_KEPT > epoch);
    for (e, hash) in lineage.iter() {
        state.insert(
            format!("{LINEAGE_PREFIX}{e}"),
            ScalarValue::Bytes(hash.0.to_vec()),
        );
    }
    let operations = (state.into_iter())
        .map(|(key, value)| legacy::Op {
            action: OpType::Put(value),
            obj: ObjectId::Root,
            key: Key::Map(key.into()),
            pred: SortedVec::new(),
            insert: false,
        })
        .collect();
    let base = Change::from(ExpandedChange {
        operations,
        actor_id: base_actor(),
        hash: None,
        seq: 1,
        start_op: NonZeroU64::MIN,
        time: 0,
        message: Some(format!("covey epoch {epoch}")),
        deps: vec![],
        extra_bytes: vec![],
        author: None,
    });
    let hash = base.hash();
    let mut doc = AutoCommit::new();
    doc.apply_changes([base])?;
    Ok((doc, hash))
}

/// Where a change went in the new history.
#[derive(Clone, Copy)]
struct Image {
    hash: ChangeHash,
    /// Its sequence number if it is a re-creation by the same actor (the
    /// next change of that actor follows it), else 0.
    seq: u64,
}

/// What re-creating changes on top of a new history has done so far:
/// kept between two runs, the second continues the first (a compaction
/// built on a copy catches up with the live document).
struct Trail {
    base: ChangeHash,
    /// The epoch the source changes were made in (for their origins).
    epoch: u64,
    images: HashMap<ChangeHash, Image>,
    /// The source changes seen so far, by actor and sequence number.
    by_seq: HashMap<(ActorId, u64), ChangeHash>,
    /// Last op number of changes in the new history (the base is one
    /// large change: read it once, not per change built on it).
    max_ops: HashMap<ChangeHash, u64>,
}

impl Trail {
    fn new(base: ChangeHash, epoch: u64) -> Self {
        Trail {
            base,
            epoch,
            images: HashMap::new(),
            by_seq: HashMap::new(),
            max_ops: HashMap::new(),
        }
    }
}

/// Re-creates changes on top of a new history.
struct Rebuild<'a> {
    doc: &'a mut AutoCommit,
    t: &'a mut Trail,
}

impl<'a> Rebuild<'a> {
    /// Re-create `changes` (in causal order) unless `existing` names the
    /// change already standing for one (then that is its image).
    fn run(
        mut self,
        changes: impl Iterator<Item = Change>,
        existing: impl Fn(&Change) -> Option<ChangeHash>,
    ) -> Result<()> {
        for c in changes {
            let image = match existing(&c) {
                Some(hash) => {
                    let seq = self.seq_of(hash, c.actor_id());
                    Image { hash, seq }
                }
                None => self.recreate(&c)?,
            };
            self.t.images.insert(c.hash(), image);
            self.t
                .by_seq
                .insert((c.actor_id().clone(), c.seq()), c.hash());
        }
        Ok(())
    }

    fn seq_of(&mut self, hash: ChangeHash, actor: &ActorId) -> u64 {
        match self.doc.get_change_by_hash(&hash) {
            Some(c) if c.actor_id() == actor => c.seq(),
            _ => 0,
        }
    }

    fn recreate(&mut self, c: &Change) -> Result<Image> {
        let mut deps: Vec<ChangeHash> = (c.deps().iter())
            .map(|d| self.t.images.get(d).map_or(self.t.base, |i| i.hash))
            .collect();
        deps.sort();
        deps.dedup();
        if deps.is_empty() {
            deps.push(self.t.base);
        }
        // Next after the image of the actor's previous change (an
        // ancestor, so re-created first — or covered by the base).
        let prev = self.t.by_seq.get(&(c.actor_id().clone(), c.seq() - 1));
        let seq = 1 + prev.and_then(|h| self.t.images.get(h)).map_or(0, |i| i.seq);
        let mut max_op = 0;
        for d in &deps {
            let m = match self.t.max_ops.get(d) {
                Some(m) => *m,
                None => {
                    let change = self.doc.get_change_by_hash(d).context("image missing")?;
                    self.t.max_ops.insert(*d, change.max_op());
                    change.max_op()
                }
            };
            max_op = max_op.max(m);
        }
        let start_op = NonZeroU64::new(max_op + 1).unwrap();
        let operations = self.ops(c, &deps, start_op.get())?;
        let change = Change::from(ExpandedChange {
            operations,
            actor_id: c.actor_id().clone(),
            hash: None,
            seq,
            start_op,
            time: c.timestamp(),
            message: Some(Origin::of(c, self.t.epoch).message()),
            deps,
            extra_bytes: vec![],
            author: None,
        });
        let hash = change.hash();
        self.t.max_ops.insert(hash, change.max_op());
        self.doc.apply_changes([change])?;
        Ok(Image { hash, seq })
    }

    /// `c`'s operations on the new history: by key, each replacing what
    /// the re-created change's dependencies show there.
    fn ops(&mut self, c: &Change, deps: &[ChangeHash], start_op: u64) -> Result<Vec<legacy::Op>> {
        let at_heads = {
            let mut heads = self.doc.get_heads();
            heads.sort();
            heads == deps
        };
        let actor = c.actor_id().clone();
        // What this change itself last left at a key.
        let mut own: HashMap<String, Vec<OpId>> = HashMap::new();
        let mut out = Vec::new();
        for op in c.decode().operations {
            let (ObjectId::Root, Key::Map(key), false) = (&op.obj, &op.key, op.insert) else {
                tracing::warn!("compaction: an operation outside the root map is dropped");
                continue;
            };
            let key = key.to_string();
            let pred = match own.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let all = if at_heads {
                        self.doc.get_all(ROOT, key.as_str())?
                    } else {
                        self.doc.get_all_at(ROOT, key.as_str(), deps)?
                    };
                    all.into_iter()
                        .filter_map(|(_, id)| match id {
                            ObjId::Id(counter, actor, _) => Some(OpId(counter, actor)),
                            ObjId::Root => None,
                        })
                        .collect()
                }
            };
            let id = OpId(start_op + out.len() as u64, actor.clone());
            let left = match &op.action {
                OpType::Put(_) => vec![id],
                OpType::Increment(_) => pred.clone(),
                OpType::Delete if pred.is_empty() => continue,
                OpType::Delete => vec![],
                _ => {
                    tracing::warn!("compaction: an object operation is dropped");
                    continue;
                }
            };
            own.insert(key.clone(), left);
            out.push(legacy::Op {
                action: op.action,
                obj: ObjectId::Root,
                key: Key::Map(key.into()),
                pred: pred.into_iter().collect(),
                insert: false,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
