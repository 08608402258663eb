//! The routing table: the registered scripts, their subscriptions, and an
//! index over those subscriptions so that routing a message costs what the
//! matching subscriptions cost, not what all of them cost.
//!
//! Index layout, by the shape of the name pattern (events and commands
//! alike; key-value watches use the prefix part only):
//! - exact names: a hash map, one probe per message;
//! - `prefix*` and `*suffix` (one `*`, at an end: the common wildcards): a
//!   hash map keyed by prefix (suffix), probed once per distinct prefix
//!   (suffix) *length* held — a handful;
//! - `*`: a list, every entry a candidate;
//! - any other glob (`a*b`, `*x*`): a list, each entry matched.
//!
//! Candidates are then checked against the whole subscription (its `from`
//! pattern, the system-event rule of [`Pattern::selects`]), and the newest
//! matching subscription of each script decides the generation a delivery
//! is for (as when subscriptions were walked in order).
//!
//! Subscribe and unsubscribe are O(1) amortised: a per-script map finds a
//! duplicate (same generation, same kind) and a subscription by id; removal
//! from the index searches one bucket only (the subscriptions to one exact
//! name or one prefix, or the `*` and glob lists: few in practice).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use smallvec::SmallVec;

use super::{MailboxTx, Message, ScriptId, SubKind};
use crate::pattern::Pattern;

/// Where a script's deliveries go.
pub(super) struct Mailbox {
    pub script: ScriptId,
    pub tx: MailboxTx,
    /// Deliveries dropped because this mailbox was full.
    pub dropped: AtomicU64,
}

/// One subscription, shared by its script's entry and the index.
pub(super) struct Sub {
    pub id: u64,
    pub generation: u64,
    pub kind: SubKind,
    pub mailbox: Arc<Mailbox>,
}

struct Entry {
    mailbox: Arc<Mailbox>,
    subs: HashMap<u64, Arc<Sub>>,
    /// Finds a repeat of a subscription: (generation, kind) → id.
    by_kind: HashMap<(u64, SubKind), u64>,
}

/// Candidates for one message: few, so kept on the stack.
pub(super) type Found<'a> = SmallVec<[&'a Arc<Sub>; 8]>;

#[derive(Default)]
pub(super) struct Table {
    scripts: BTreeMap<ScriptId, Entry>,
    events: Names,
    commands: Names,
    watches: Affixes<PREFIX>,
}

impl Table {
    pub fn register(&mut self, script: ScriptId, tx: MailboxTx) {
        self.unregister(&script);
        let mailbox = Arc::new(Mailbox {
            script: script.clone(),
            tx,
            dropped: AtomicU64::new(0),
        });
        let entry = Entry {
            mailbox,
            subs: HashMap::new(),
            by_kind: HashMap::new(),
        };
        self.scripts.insert(script, entry);
    }

    pub fn unregister(&mut self, script: &str) {
        if let Some(entry) = self.scripts.remove(script) {
            for sub in entry.subs.values() {
                self.unindex(sub);
            }
        }
    }

    /// Add a subscription (`id` is the one to use if it is new). Returns
    /// its id — an identical one of the same generation is reused — or
    /// none when the script is not registered.
    pub fn subscribe(
        &mut self,
        script: &str,
        generation: u64,
        kind: SubKind,
        id: u64,
    ) -> Option<u64> {
        let entry = self.scripts.get_mut(script)?;
        let key = (generation, kind);
        if let Some(&old) = entry.by_kind.get(&key) {
            return Some(old);
        }
        let sub = Arc::new(Sub {
            id,
            generation,
            kind: key.1.clone(),
            mailbox: entry.mailbox.clone(),
        });
        entry.by_kind.insert(key, id);
        entry.subs.insert(id, sub.clone());
        match &sub.kind {
            SubKind::Event { name, .. } => self.events.insert(name, sub.clone()),
            SubKind::Command { name, .. } => self.commands.insert(name, sub.clone()),
            SubKind::Watch { prefix } => self.watches.insert(prefix, sub.clone()),
        }
        Some(id)
    }

    pub fn unsubscribe(&mut self, script: &str, id: u64) -> bool {
        let Some(entry) = self.scripts.get_mut(script) else {
            return false;
        };
        let Some(sub) = entry.subs.remove(&id) else {
            return false;
        };
        entry.by_kind.remove(&(sub.generation, sub.kind.clone()));
        self.unindex(&sub);
        true
    }

    /// Remove every subscription of `script` for which `drop` holds.
    pub fn unsubscribe_where(&mut self, script: &str, drop: impl Fn(&Sub) -> bool) {
        let Some(entry) = self.scripts.get(script) else {
            return;
        };
        let ids: Vec<u64> = entry
            .subs
            .values()
            .filter(|s| drop(s))
            .map(|s| s.id)
            .collect();
        for id in ids {
            self.unsubscribe(script, id);
        }
    }

    fn unindex(&mut self, sub: &Sub) {
        match &sub.kind {
            SubKind::Event { name, .. } => self.events.remove(name, sub.id),
            SubKind::Command { name, .. } => self.commands.remove(name, sub.id),
            SubKind::Watch { prefix } => self.watches.remove(prefix, sub.id),
        }
    }

    /// For each script with an event subscription selecting `msg`, its
    /// newest such subscription.
    pub fn event_subscribers(&self, msg: &Message) -> Found<'_> {
        let mut found = Found::new();
        self.events.candidates(&msg.name, &mut found);
        newest_per_script(found, |k| k.matches_event(msg))
    }

    /// For each script with a handler for the command `msg`, its newest.
    pub fn command_handlers(&self, msg: &Message) -> Found<'_> {
        let mut found = Found::new();
        self.commands.candidates(&msg.name, &mut found);
        newest_per_script(found, |k| k.matches_command(msg))
    }

    /// Every watch whose prefix `key` starts with.
    pub fn watchers(&self, key: &str) -> Found<'_> {
        let mut found = Found::new();
        self.watches.each_affix_of(key, &mut |s| found.push(s));
        found
    }

    pub fn mailbox(&self, script: &str) -> Option<&Arc<Mailbox>> {
        self.scripts.get(script).map(|e| &e.mailbox)
    }

    pub fn scripts(&self) -> impl Iterator<Item = &ScriptId> {
        self.scripts.keys()
    }
}

/// Keep the candidates that `selects`, one per script: the newest (the
/// highest id; ids grow with time).
fn newest_per_script<'a>(mut found: Found<'a>, selects: impl Fn(&SubKind) -> bool) -> Found<'a> {
    found.retain(|s| selects(&s.kind));
    if found.len() > 1 {
        found.sort_unstable_by_key(|s| (Arc::as_ptr(&s.mailbox), Reverse(s.id)));
        found.dedup_by_key(|s| Arc::as_ptr(&s.mailbox));
    }
    found
}

/// Subscriptions to a name pattern, by the pattern's shape.
#[derive(Default)]
struct Names {
    exact: HashMap<Box<str>, Vec<Arc<Sub>>>,
    prefixed: Affixes<PREFIX>,
    suffixed: Affixes<SUFFIX>,
    any: Vec<Arc<Sub>>,
    globs: Vec<Arc<Sub>>,
}

/// Where a glob with one `*`, at an end, goes.
enum Shape<'a> {
    Prefix(&'a str),
    Suffix(&'a str),
    Other,
}

fn shape(glob: &str) -> Shape<'_> {
    let one_star = |rest: &str| !rest.contains('*');
    match (glob.strip_suffix('*'), glob.strip_prefix('*')) {
        (Some(prefix), _) if one_star(prefix) => Shape::Prefix(prefix),
        (_, Some(suffix)) if one_star(suffix) => Shape::Suffix(suffix),
        _ => Shape::Other,
    }
}

impl Names {
    fn insert(&mut self, name: &Pattern, sub: Arc<Sub>) {
        match name {
            Pattern::Exact(n) => self.exact.entry(n.as_str().into()).or_default().push(sub),
            Pattern::Any => self.any.push(sub),
            Pattern::Glob(g) => match shape(g) {
                Shape::Prefix(prefix) => self.prefixed.insert(prefix, sub),
                Shape::Suffix(suffix) => self.suffixed.insert(suffix, sub),
                Shape::Other => self.globs.push(sub),
            },
        }
    }

    fn remove(&mut self, name: &Pattern, id: u64) {
        match name {
            Pattern::Exact(n) => {
                if let Some(bucket) = self.exact.get_mut(n.as_str()) {
                    remove_id(bucket, id);
                    if bucket.is_empty() {
                        self.exact.remove(n.as_str());
                    }
                }
            }
            Pattern::Any => remove_id(&mut self.any, id),
            Pattern::Glob(g) => match shape(g) {
                Shape::Prefix(prefix) => self.prefixed.remove(prefix, id),
                Shape::Suffix(suffix) => self.suffixed.remove(suffix, id),
                Shape::Other => remove_id(&mut self.globs, id),
            },
        }
    }

    /// Subscriptions whose name pattern matches `name` (before the
    /// system-event rule, which the caller's full check applies).
    fn candidates<'a>(&'a self, name: &str, found: &mut Found<'a>) {
        if let Some(bucket) = self.exact.get(name) {
            found.extend(bucket.iter());
        }
        self.prefixed.each_affix_of(name, &mut |s| found.push(s));
        self.suffixed.each_affix_of(name, &mut |s| found.push(s));
        found.extend(self.any.iter());
        found.extend(self.globs.iter().filter(|s| match &s.kind {
            SubKind::Event { name: p, .. } | SubKind::Command { name: p, .. } => p.matches(name),
            SubKind::Watch { .. } => false,
        }));
    }
}

const PREFIX: bool = false;
const SUFFIX: bool = true;

/// Subscriptions keyed by a prefix (or, `SUFFIX`, a suffix) of what they
/// select.
#[derive(Default)]
struct Affixes<const SUFFIX: bool> {
    by_affix: HashMap<Box<str>, Vec<Arc<Sub>>>,
    /// Affix length → how many distinct affixes of that length are held.
    lens: BTreeMap<usize, usize>,
}

impl<const SUFFIX: bool> Affixes<SUFFIX> {
    fn insert(&mut self, affix: &str, sub: Arc<Sub>) {
        let bucket = self.by_affix.entry(affix.into()).or_default();
        if bucket.is_empty() {
            *self.lens.entry(affix.len()).or_default() += 1;
        }
        bucket.push(sub);
    }

    fn remove(&mut self, affix: &str, id: u64) {
        let Some(bucket) = self.by_affix.get_mut(affix) else {
            return;
        };
        remove_id(bucket, id);
        if bucket.is_empty() {
            self.by_affix.remove(affix);
            if let Some(n) = self.lens.get_mut(&affix.len()) {
                *n -= 1;
                if *n == 0 {
                    self.lens.remove(&affix.len());
                }
            }
        }
    }

    fn each_affix_of<'a>(&'a self, s: &str, f: &mut impl FnMut(&'a Arc<Sub>)) {
        for &len in self.lens.keys() {
            if len > s.len() {
                break;
            }
            // `get` is none off a character boundary: no affix there.
            let affix = if SUFFIX {
                s.get(s.len() - len..)
            } else {
                s.get(..len)
            };
            if let Some(bucket) = affix.and_then(|a| self.by_affix.get(a)) {
                bucket.iter().for_each(&mut *f);
            }
        }
    }
}

/// Remove subscription `id` from a bucket (order within a bucket does not
/// matter: the newest is chosen by id).
fn remove_id(bucket: &mut Vec<Arc<Sub>>, id: u64) {
    if let Some(i) = bucket.iter().position(|s| s.id == id) {
        bucket.swap_remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic xorshift: the test is reproducible.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
        fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
            of[self.below(of.len())]
        }
    }

    const NAMES: &[&str] = &[
        "a",
        "ab",
        "abc",
        "a.b",
        "a.bc",
        "b",
        "b.a",
        "",
        "covey.node.up",
        "covey.node.down",
        "é.x",
    ];
    const PATTERNS: &[&str] = &[
        "a",
        "ab",
        "a.b",
        "b",
        "*",
        "a*",
        "a.*",
        "ab*",
        "*b",
        "*.b*",
        "a*c",
        "**",
        "covey.*",
        "covey.node.up",
        "*.up",
        "é*",
        "",
        "*x",
        "*é.x",
        "*.b",
        "*c",
    ];
    const FROM: &[&str] = &["*", "n1", "n2", "n*"];

    fn table_with(scripts: usize) -> Table {
        let mut t = Table::default();
        for i in 0..scripts {
            t.register(format!("s{i}.lua").into(), super::super::mailbox(1).0);
        }
        t
    }

    /// What walking every subscription in order finds: for each script,
    /// its newest subscription that selects.
    fn brute(t: &Table, selects: impl Fn(&SubKind) -> bool) -> Vec<(ScriptId, u64)> {
        let mut out: Vec<(ScriptId, u64)> = (t.scripts.iter())
            .filter_map(|(script, e)| {
                let newest = e
                    .subs
                    .values()
                    .filter(|s| selects(&s.kind))
                    .map(|s| s.id)
                    .max()?;
                Some((script.clone(), newest))
            })
            .collect();
        out.sort();
        out
    }

    fn indexed(found: Found<'_>) -> Vec<(ScriptId, u64)> {
        let mut out: Vec<_> = found
            .iter()
            .map(|s| (s.mailbox.script.clone(), s.id))
            .collect();
        out.sort();
        out
    }

    fn random_kind(rng: &mut Rng) -> SubKind {
        let from = Pattern::new(rng.pick(FROM));
        let name = Pattern::new(rng.pick(PATTERNS));
        match rng.below(3) {
            0 => SubKind::Event { from, name },
            1 => SubKind::Command { from, name },
            _ => SubKind::Watch {
                prefix: rng.pick(PATTERNS).replace('*', ""),
            },
        }
    }

    /// Random subscribes, repeats, unsubscribes and generation swaps over
    /// 8 scripts; after each step the index agrees with a full walk for
    /// every name, sender and key.
    #[test]
    fn index_agrees_with_walking_every_subscription() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = table_with(8);
        let mut next_id = 1;
        let mut held: Vec<(String, u64)> = Vec::new();
        for step in 0..3000 {
            let script = format!("s{}.lua", rng.below(8));
            match rng.below(10) {
                0..=5 => {
                    let generation = rng.below(3) as u64;
                    let id = t.subscribe(&script, generation, random_kind(&mut rng), next_id);
                    if id == Some(next_id) {
                        held.push((script, next_id));
                    }
                    next_id += 1;
                }
                6..=8 if !held.is_empty() => {
                    let (script, id) = held.swap_remove(rng.below(held.len()));
                    assert!(t.unsubscribe(&script, id), "step {step}");
                    assert!(!t.unsubscribe(&script, id), "removed twice at step {step}");
                }
                _ => {
                    let keep = rng.below(3) as u64;
                    t.unsubscribe_where(&script, |s| s.generation != keep);
                    held.retain(|(s, id)| {
                        *s != script || t.scripts[s.as_str()].subs.contains_key(id)
                    });
                }
            }
            check(&t, step);
        }
        // Unregistering empties the index.
        for i in 0..8 {
            t.unregister(&format!("s{i}.lua"));
        }
        assert!(t.events.exact.is_empty() && t.events.any.is_empty() && t.events.globs.is_empty());
        assert!(t.events.prefixed.by_affix.is_empty() && t.events.prefixed.lens.is_empty());
        assert!(t.events.suffixed.by_affix.is_empty() && t.events.suffixed.lens.is_empty());
        assert!(t.watches.by_affix.is_empty() && t.commands.exact.is_empty());
    }

    fn check(t: &Table, step: usize) {
        let router = crate::router::Router::new("n1", 1024);
        for from in ["n1", "n2", "x"] {
            for name in NAMES {
                let mut msg = router.message("*", name, vec![]);
                msg.from = from.into();
                assert_eq!(
                    indexed(t.event_subscribers(&msg)),
                    brute(t, |k| k.matches_event(&msg)),
                    "events `{name}` from {from}, step {step}"
                );
                assert_eq!(
                    indexed(t.command_handlers(&msg)),
                    brute(t, |k| k.matches_command(&msg)),
                    "commands `{name}` from {from}, step {step}"
                );
            }
        }
        for key in NAMES {
            let mut want: Vec<u64> = (t.scripts.values())
                .flat_map(|e| e.subs.values())
                .filter(|s| matches!(&s.kind, SubKind::Watch { prefix } if key.starts_with(prefix.as_str())))
                .map(|s| s.id)
                .collect();
            let mut got: Vec<u64> = t.watchers(key).iter().map(|s| s.id).collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "watchers of `{key}`, step {step}");
        }
    }

    #[test]
    fn a_repeat_is_answered_with_the_first_id_and_delivered_once() {
        let mut t = table_with(1);
        let kind = SubKind::Event {
            from: Pattern::Any,
            name: Pattern::new("temp"),
        };
        assert_eq!(t.subscribe("s0.lua", 1, kind.clone(), 10), Some(10));
        assert_eq!(t.subscribe("s0.lua", 1, kind.clone(), 11), Some(10));
        // Another generation's identical subscription is its own.
        assert_eq!(t.subscribe("s0.lua", 2, kind, 12), Some(12));
        assert_eq!(
            t.subscribe("nobody.lua", 1, SubKind::Watch { prefix: "".into() }, 13),
            None
        );
        let msg = crate::router::Router::new("n1", 1024).message("*", "temp", vec![]);
        let found = t.event_subscribers(&msg);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].id, found[0].generation),
            (12, 2),
            "the newest decides"
        );
    }

    #[test]
    fn candidates_are_only_what_matches_the_name() {
        // Not a timing: the candidates of a name are only what matches it.
        let mut t = table_with(64);
        let mut id = 1;
        for i in 0..64 {
            for j in 0..50 {
                let name = Pattern::new(&format!("s{i}.reading.{j}"));
                let kind = SubKind::Event {
                    from: Pattern::Any,
                    name,
                };
                t.subscribe(&format!("s{i}.lua"), 1, kind, id);
                id += 1;
            }
        }
        let mut found = Found::new();
        t.events.candidates("s3.reading.7", &mut found);
        assert_eq!(found.len(), 1);
        found.clear();
        t.events.candidates("nothing", &mut found);
        assert!(found.is_empty());
    }
}
