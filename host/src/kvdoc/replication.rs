//! The key-value store replicated: sync messages in an envelope naming the
//! epoch of the history they belong to, compaction once every member has
//! acknowledged the same heads, and the move of a node whose history is
//! older onto its peers' (see [`super::epoch`]).
//!
//! A message from a peer on our epoch merges as usual. A peer on an older
//! epoch is not answered: our messages (on the newer epoch) make it catch
//! up. A peer on a newer epoch is caught up with: if it is the next epoch
//! and this node holds the heads its base was made at, the node makes the
//! same base itself (no transfer); otherwise it fetches the peer's document
//! and rebases onto it ([`KvDoc::adopt`]).
//!
//! Who compacts: the member with the lowest name, once the history is
//! longer than the configured number of changes and every member (every
//! node that ever wrote its name into the store) is linked and holds this
//! node's heads. Requiring every member keeps the two sides of a partition
//! from compacting apart.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use automerge::sync;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ROOT, ReadDoc, ScalarValue};
use tokio::sync::watch;

use super::epoch::{self, EpochInfo};
use super::{KvDoc, layout};
use crate::docstore::{self, actor_node};
use crate::docsync::{Received, SyncTarget, blocking};
use crate::lifecycle;

/// First byte of every key-value sync message (the envelope's format).
const ENVELOPE: u8 = 0xC1;
/// How often the compactor looks at the history.
const COMPACT_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the heads to compact at get to reach the other members
/// before they are asked whether they hold them.
const HOLD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Most heads a compaction point may have (one per concurrent writer).
const MAX_POINT: usize = 64;

/// `\0m\0<node>`: a node that is a member (written once per node). Not
/// under the epoch's own prefix: compaction carries it into the base.
const MEMBER_PREFIX: &str = "\0m\0";

/// Which history a message belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Envelope {
    epoch: u64,
    base: Option<ChangeHash>,
    /// Where the epoch's base was made (empty if unknown).
    point: Vec<ChangeHash>,
}

impl Envelope {
    fn of(info: &EpochInfo) -> Envelope {
        Envelope {
            epoch: info.epoch,
            base: info.base,
            point: info.point.iter().take(MAX_POINT).copied().collect(),
        }
    }

    /// Histories order by epoch, then (two lineages) by base.
    fn rank(&self) -> (u64, Option<ChangeHash>) {
        (self.epoch, self.base)
    }

    fn wrap(&self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + 32 * (1 + self.point.len()) + msg.len());
        out.push(ENVELOPE);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        if let Some(base) = self.base {
            out.extend_from_slice(&base.0);
            out.push(self.point.len() as u8);
            self.point.iter().for_each(|h| out.extend_from_slice(&h.0));
        }
        out.extend_from_slice(msg);
        out
    }

    /// The envelope and the sync message inside. Peer data: every length
    /// is checked before it is used.
    fn open(bytes: &[u8]) -> Result<(Envelope, &[u8])> {
        let Some((&ENVELOPE, rest)) = bytes.split_first() else {
            bail!("not a key-value sync message (a peer of another version?)");
        };
        let (epoch, mut rest) = rest.split_at_checked(8).context("truncated envelope")?;
        let epoch = u64::from_le_bytes(epoch.try_into().unwrap());
        let mut env = Envelope {
            epoch,
            base: None,
            point: Vec::new(),
        };
        if epoch > 0 {
            let (base, r) = rest.split_at_checked(32).context("truncated envelope")?;
            env.base = Some(ChangeHash::try_from(base)?);
            let (&n, r) = r.split_first().context("truncated envelope")?;
            if n as usize > MAX_POINT {
                bail!("a compaction point of {n} heads");
            }
            let (point, r) = r
                .split_at_checked(32 * n as usize)
                .context("truncated envelope")?;
            env.point = point
                .chunks_exact(32)
                .map(ChangeHash::try_from)
                .collect::<Result<_, _>>()?;
            rest = r;
        }
        Ok((env, rest))
    }
}

/// What [`KvDoc::compact_at`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compaction {
    Done,
    /// A member is away or does not hold the heads yet.
    Waiting,
}

/// `msg` (an Automerge sync message) as a peer on epoch 0 sends it (for
/// the fuzz targets).
#[doc(hidden)]
pub fn epoch_zero_message(msg: &[u8]) -> Vec<u8> {
    let env = Envelope {
        epoch: 0,
        base: None,
        point: Vec::new(),
    };
    env.wrap(msg)
}

fn member_key(node: &str) -> String {
    format!("{MEMBER_PREFIX}{node}")
}

impl KvDoc {
    /// Record this node as a member (once): compaction waits for members.
    pub(super) fn join_members(&self) {
        let key = member_key(&self.node);
        if self
            .store
            .read(|d| d.get(ROOT, key.as_str()).ok().flatten().is_some())
        {
            return;
        }
        let _ = self
            .store
            .record(|d| d.put(ROOT, key.as_str(), ScalarValue::Uint(1)));
    }

    /// Stop counting `node` as a member (one gone for good); false if it
    /// was not one. It becomes one again if it ever starts.
    pub fn forget_member(&self, node: &str) -> Result<bool, super::KvError> {
        let key = member_key(node);
        self.store
            .record(|d| match d.get(ROOT, key.as_str())? {
                Some(_) => d.delete(ROOT, key.as_str()).map(|()| true),
                None => Ok(false),
            })
            .map_err(|e| super::KvError::Storage(e.to_string()))
    }

    /// Nodes that ever joined the store's replication, sorted.
    pub fn members(&self) -> Vec<String> {
        self.store.read(|d| {
            let keys = d.map_range(ROOT, MEMBER_PREFIX.to_string()..);
            keys.map_while(|i| i.key.strip_prefix(MEMBER_PREFIX).map(str::to_string))
                .collect()
        })
    }

    /// Changes in the history (what compaction bounds).
    pub fn history_len(&self) -> usize {
        self.store.inspect(|d| d.get_changes_meta(&[]).len())
    }

    /// The epoch the store is on.
    pub fn epoch(&self) -> EpochInfo {
        self.epoch.lock().unwrap().clone()
    }

    /// The heads to compact at, if compaction is due and this node's to
    /// do: it is the member with the lowest name and the history is longer
    /// than the configured number of changes.
    pub fn compaction_due(&self) -> Option<Vec<ChangeHash>> {
        let members = self.members();
        if members.first().is_some_and(|m| *m < self.node) {
            return None;
        }
        // Reading the heads closes the open transaction: the writes made
        // since the last flush count as the change they become.
        let heads = self.store.heads();
        let len = self.history_len();
        (len >= self.limits.compact_after.max(2)).then_some(heads)
    }

    /// Compact the history at `heads` if every other member is among
    /// `holders` (the peers that said they hold `heads`).
    pub fn compact_at(&self, heads: &[ChangeHash], holders: &[Arc<str>]) -> Result<Compaction> {
        let members = self.members();
        let waiting: Vec<&String> = (members.iter())
            .filter(|m| **m != self.node && !holders.iter().any(|h| **h == ***m))
            .collect();
        if !waiting.is_empty() {
            tracing::debug!(?waiting, "key-value history compaction waits for members");
            return Ok(Compaction::Waiting);
        }
        let mut info = self.epoch.lock().unwrap();
        let len = self.history_len();
        self.next_epoch(
            &mut info,
            |copy| epoch::compact(copy, heads),
            |_, _, _| Ok(()),
        )?;
        tracing::info!(
            epoch = info.epoch,
            changes = len,
            "key-value history compacted"
        );
        Ok(Compaction::Done)
    }

    /// Check now and then whether the history is due for compaction (see
    /// [`KvDoc::compaction_due`]); `holding` names the peers that hold
    /// given heads (asked over the cluster; none for a single node).
    pub fn spawn_compactor<F, Fut>(self: &Arc<Self>, holding: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Vec<ChangeHash>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<Arc<str>>> + Send,
    {
        let kv = self.clone();
        let mut version = self.store.watch_version();
        // The first look is unconditional: what the scripts wrote while the
        // node started (before this subscription), or a history left long
        // at the last stop, would otherwise wait for the next write.
        version.mark_changed();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(COMPACT_CHECK).await;
                // Nothing new since the last look: nothing to do.
                if !version.has_changed().unwrap_or(false) {
                    continue;
                }
                version.mark_unchanged();
                let k = kv.clone();
                let Ok(Some(heads)) = tokio::task::spawn_blocking(move || k.compaction_due()).await
                else {
                    continue;
                };
                // `heads` includes what this node wrote a moment ago: give
                // it time to reach the others (under steady writes nobody
                // ever holds the very latest heads).
                tokio::time::sleep(HOLD_WAIT).await;
                let holders = holding(heads.clone()).await;
                let k = kv.clone();
                let done =
                    tokio::task::spawn_blocking(move || k.compact_at(&heads, &holders)).await;
                match done {
                    Ok(Ok(Compaction::Done)) => {}
                    // Members away or behind: look again in a while even if
                    // nothing changes here.
                    Ok(Ok(Compaction::Waiting)) => {
                        tokio::time::sleep(COMPACT_CHECK * 4).await;
                        version.mark_changed();
                    }
                    Ok(Err(e)) => tracing::warn!("key-value history compaction failed: {e:#}"),
                    Err(e) => tracing::warn!("key-value history compaction task failed: {e}"),
                }
            }
        })
    }

    /// Move onto a peer's document (a later epoch this node could not make
    /// itself): our changes it lacks are re-created on top of it.
    pub fn adopt(&self, snapshot: &[u8]) -> Result<()> {
        let theirs = AutoCommit::load(snapshot).context("the peer's document does not load")?;
        let mut probe = theirs.clone();
        let (info, _) = EpochInfo::read(&mut probe);
        drop(probe);
        let mut mine = self.epoch.lock().unwrap();
        if (info.epoch, info.base) <= (mine.epoch, mine.base) {
            return Ok(());
        }
        let in_lineage = std::cell::Cell::new(true);
        let rebase = |copy: &mut AutoCommit| {
            let (next, kept) = epoch::rebase(copy, theirs)?;
            in_lineage.set(kept);
            Ok(next)
        };
        self.next_epoch(&mut mine, rebase, |doc, next, _| {
            if !in_lineage.get() {
                // Two histories compacted apart (stores that never met):
                // keys only ours had come along as new writes.
                tracing::warn!("the peer's key-value history does not descend from ours; keeping our keys it lacks");
                keep_missing(doc, next)?;
            }
            Ok(())
        })?;
        tracing::info!(
            epoch = info.epoch,
            "key-value store moved onto a peer's history"
        );
        Ok(())
    }

    /// Move the store to the next epoch `make` builds (a compaction, a
    /// rebase onto a peer's document) of a copy of the document: the work
    /// is done outside the store's lock, so scripts read and write
    /// meanwhile (a compaction of 100,000 keys takes ~0.7 s here, many
    /// times that on a Pi). Under the lock, the changes made since the copy
    /// are re-created on top; `finish` sees the live document and the
    /// result (and its epoch), and may refuse or add to it; the result is
    /// swapped in and scripts are told of every key whose value changed.
    /// `mine` is the epoch, locked: no sync message is made or merged
    /// between the document and its epoch.
    fn next_epoch(
        &self,
        mine: &mut EpochInfo,
        make: impl FnOnce(&mut AutoCommit) -> Result<epoch::NextEpoch>,
        finish: impl FnOnce(&AutoCommit, &mut AutoCommit, &EpochInfo) -> Result<()>,
    ) -> Result<()> {
        let mut copy = self.store.copy();
        let mut made = make(&mut copy)?;
        let mut changed = layout::differences(&copy, &made.doc);
        drop(copy);
        made.doc = docstore::reloaded(std::mem::take(&mut made.doc));
        let info = self.store.replace(|doc| {
            let touched = made.catch_up(doc)?;
            let mut next = made.doc;
            let (info, _) = EpochInfo::read(&mut next);
            finish(doc, &mut next, &info)?;
            changed.extend(layout::differences_in(doc, &next, &touched));
            Ok((next, info))
        })?;
        *mine = info;
        self.report_changed(&changed);
        Ok(())
    }

    /// Tell scripts watching `keys` their new values (a merge or a move
    /// changed them); a key now gone no longer counts against its writer.
    fn report_changed(&self, keys: &std::collections::BTreeSet<String>) {
        for key in keys {
            let value = self.get(key);
            if value.is_none() {
                self.ledger.lock().unwrap().release(key);
            }
            self.router.kv_changed(key, value.as_deref());
        }
    }

    /// Merge a peer's changes of our epoch; scripts watching a changed key
    /// are told, exactly once per key per merge, as for a local write. A
    /// key the merge left with concurrent values is a `covey.kv.conflict`.
    fn merge(&self, state: &mut sync::State, msg: &[u8]) -> Result<()> {
        let (changed, conflicts) = self
            .store
            .sync_receive(state, msg, |doc, log| {
                let changed = layout::changed_keys(&doc.make_patches(log));
                let conflicts: Vec<_> = (changed.iter())
                    .filter_map(|k| Some((k.clone(), layout::conflict(doc, k)?)))
                    .collect();
                (changed, conflicts)
            })?
            .unwrap_or_default();
        for (key, (winner, losers)) in conflicts {
            let event = lifecycle::ConflictEvent {
                key,
                winner: actor_node(&winner),
                losers: losers.iter().map(actor_node).collect(),
                copy: None,
            };
            tracing::info!(
                key = crate::logtext::for_log(&event.key),
                winner = event.winner,
                "key-value conflict: concurrent writes merged, one kept"
            );
            (self.router).emit_system(lifecycle::KV_CONFLICT, lifecycle::payload(&event));
        }
        self.report_changed(&changed);
        Ok(())
    }

    /// Make the epoch a peer is on ourselves, if it is the next one and we
    /// hold the heads its base was made at. False if we cannot.
    fn follow(&self, mine: &mut EpochInfo, env: &Envelope) -> Result<bool> {
        if env.epoch != mine.epoch + 1 || env.point.is_empty() {
            return Ok(false);
        }
        let held = self
            .store
            .inspect(|d| env.point.iter().all(|h| d.get_change_by_hash(h).is_some()));
        if !held {
            return Ok(false);
        }
        let mut made = None;
        // Called from a link's task: the runtime's other tasks move to
        // another thread while the compaction runs.
        let r = blocking(|| {
            let compact = |copy: &mut AutoCommit| epoch::compact(copy, &env.point);
            self.next_epoch(mine, compact, |_, _, info| {
                made = info.base;
                if info.base != env.base {
                    bail!("the base made here differs from the peer's");
                }
                Ok(())
            })
        });
        match r {
            Ok(()) => {
                tracing::info!(
                    epoch = env.epoch,
                    "key-value history compacted (following a peer)"
                );
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(?made, "cannot follow the peer's compaction: {e:#}");
                Ok(false)
            }
        }
    }
}

/// Put into `next` (as new writes) the visible keys of `old` it lacks.
fn keep_missing(old: &AutoCommit, next: &mut AutoCommit) -> Result<()> {
    for item in old.map_range(ROOT, ..) {
        if item.key.starts_with(epoch::META_PREFIX) || next.get(ROOT, item.key.as_ref())?.is_some()
        {
            continue;
        }
        if let automerge::Value::Scalar(s) = automerge::Value::from(item.value) {
            next.put(ROOT, item.key.as_ref(), s.into_owned())?;
        }
    }
    next.commit();
    Ok(())
}

impl SyncTarget for KvDoc {
    fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        let mine = self.epoch.lock().unwrap();
        let msg = self.store.sync_generate(state)?;
        Some(Envelope::of(&mine).wrap(&msg))
    }

    fn receive(&self, state: &mut sync::State, msg: &[u8]) -> Result<Received> {
        let (env, msg) = Envelope::open(msg)?;
        let mut mine = self.epoch.lock().unwrap();
        match env.rank().cmp(&Envelope::of(&mine).rank()) {
            std::cmp::Ordering::Equal => {
                self.merge(state, msg)?;
                Ok(Received::Applied)
            }
            // The peer catches up from our messages (sent afresh whenever
            // our history changed, and when an answer is overdue).
            std::cmp::Ordering::Less => Ok(Received::Applied),
            std::cmp::Ordering::Greater => {
                if !self.follow(&mut mine, &env)? {
                    return Ok(Received::Behind);
                }
                *state = sync::State::new();
                self.merge(state, msg)?;
                Ok(Received::Applied)
            }
        }
    }

    fn version(&self) -> watch::Receiver<u64> {
        self.store.watch_version()
    }

    fn generation(&self) -> u64 {
        self.store.generation()
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        Some(self.store.snapshot())
    }

    fn holds(&self, heads: &[ChangeHash]) -> bool {
        (self.store).inspect(|d| heads.iter().all(|h| d.get_change_by_hash(h).is_some()))
    }

    fn adopt(&self, snapshot: &[u8]) -> Result<()> {
        KvDoc::adopt(self, snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_hostile_ones_are_refused() {
        let h = |b: u8| ChangeHash([b; 32]);
        for env in [
            Envelope {
                epoch: 0,
                base: None,
                point: vec![],
            },
            Envelope {
                epoch: 7,
                base: Some(h(1)),
                point: vec![h(2), h(3)],
            },
        ] {
            let bytes = env.wrap(b"sync");
            let (back, msg) = Envelope::open(&bytes).unwrap();
            assert_eq!((back, msg), (env, &b"sync"[..]));
        }
        let good = Envelope {
            epoch: 7,
            base: Some(h(1)),
            point: vec![h(2)],
        }
        .wrap(b"");
        for n in 0..good.len() - 1 {
            assert!(Envelope::open(&good[..n]).is_err(), "{n} bytes");
        }
        let mut many = good.clone();
        many[9 + 32] = 200;
        assert!(Envelope::open(&many).is_err());
        assert!(Envelope::open(b"\x00raw automerge").is_err());
    }
}
