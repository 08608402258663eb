//! `DocReplicator`: keeps a replicated document (the key-value store, the
//! scripts manifest) in sync with every peer, using Automerge's sync
//! protocol over the cluster links.
//!
//! One sync state per peer. Whenever the document changes (a local write
//! or a merge from another peer) or a peer's message arrives, one task asks
//! the document for the next message to each peer and queues it on the
//! link. The protocol exchanges heads and Bloom filters first, so a peer
//! that reconnects, or one that already has most of the history, receives
//! only what it lacks. When a link goes down its peer's state is kept
//! (encoded: the heads both sides shared) and used when it comes back.
//!
//! While a message that carried changes is unanswered, that peer gets no
//! new one for up to [`UNANSWERED`] (25 ms): what is written meanwhile goes
//! in one message after the peer's answer, so an unanswered peer costs at
//! most 40 messages a second. Otherwise every write (and with several nodes
//! every merge) cost a message per peer, each with a Bloom filter over all
//! the changes the peer has not confirmed (the chaos suite saw half a core
//! in `generate_sync_message` with five nodes under load). A peer that
//! answers — it merged something new — gets the next message at once.
//!
//! A sync message must never be lost silently — the protocol remembers
//! what it sent and would not send it again — so if a link's queue refuses
//! one, that peer's state is reset and the exchange starts over.
//!
//! A document may replace its history (the key-value store compacts it:
//! `kvdoc::epoch`): every peer's state then starts over, and a peer found
//! on a later history than ours is asked for its document whole, which the
//! target adopts ([`SyncTarget::adopt`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::{ChangeHash, sync};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cluster::Replica;
use crate::cluster::frame::{DocId, Frame};
use crate::cluster::link::PeerLink;

/// A document that can be synced: what `DocReplicator` needs of it.
pub trait SyncTarget: Send + Sync + 'static {
    /// The next sync message for a peer, if there is anything to say.
    fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>>;
    /// Apply a peer's sync message, and act on what it changed.
    fn receive(&self, state: &mut sync::State, msg: &[u8]) -> anyhow::Result<Received>;
    /// Changes whenever the document does.
    fn version(&self) -> watch::Receiver<u64>;
    /// Bumped whenever the document's history is replaced: sync states
    /// from before describe another history.
    fn generation(&self) -> u64 {
        0
    }
    /// The document whole, for a peer that has to start over.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }
    /// Whether the document holds every change `heads` name.
    fn holds(&self, heads: &[ChangeHash]) -> bool {
        let _ = heads;
        false
    }
    /// Move onto a peer's document (after [`Received::Behind`]).
    fn adopt(&self, snapshot: &[u8]) -> anyhow::Result<()> {
        let _ = snapshot;
        anyhow::bail!("this document cannot adopt a peer's")
    }
}

/// A sync state kept for a peer whose link is down: the target's
/// generation and the encoded state.
type Resume = (u64, Vec<u8>);

/// What a peer's sync message led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Applied (or nothing to apply).
    Applied,
    /// The peer is on a later history that this node cannot make itself:
    /// fetch the peer's document and adopt it.
    Behind,
}

/// A sync message at least this large (a first sync of a big store) is
/// merged with the runtime's other tasks moved off the link's thread: on a
/// one-core Pi its merge would otherwise stall every link and script.
const BIG_MESSAGE: usize = 256 << 10;

/// Run `f`, long blocking work called from async code, with the
/// runtime's other tasks moved to another thread meanwhile (on a
/// multi-threaded runtime, which the node runs; others just run it).
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A peer that has not answered a message for this long never will (it
/// was dropped on the way): the exchange starts over.
const STALLED: Duration = Duration::from_secs(5);
/// Wait before trying again when a link's queue refused a message.
const RETRY: Duration = Duration::from_millis(100);
/// Longest wait for a peer's answer to whether it holds given heads.
const HOLDS_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed catch-up, the wait before the next.
const CATCH_UP_BACKOFF: Duration = Duration::from_secs(10);
/// Longest wait for a peer's whole document.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Sync messages a document exchanged with peers, for metrics.
#[derive(Default, Debug)]
pub struct SyncCounters {
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
}

/// Longest wait for a peer's answer before the next message goes anyway.
pub const UNANSWERED: Duration = Duration::from_millis(25);

struct Peer {
    link: Arc<PeerLink>,
    state: sync::State,
    /// The target's generation `state` belongs to.
    generation: u64,
    /// When a message carrying changes was last sent.
    changes_sent: Option<Instant>,
    /// When any message was last sent.
    sent_at: Option<Instant>,
}

pub struct DocReplicator<T> {
    doc: DocId,
    target: Arc<T>,
    peers: Mutex<HashMap<Arc<str>, Peer>>,
    /// Shared heads of peers whose link is down, for a quick resume (with
    /// the generation they belong to).
    resume: Mutex<HashMap<Arc<str>, Resume>>,
    /// A peer's document is being fetched to adopt.
    catching_up: AtomicBool,
    wake: Notify,
    pub counters: Arc<SyncCounters>,
    /// This replicator, for the tasks it starts from `&self`.
    me: std::sync::Weak<Self>,
}

impl<T: SyncTarget> DocReplicator<T> {
    pub fn new(doc: DocId, target: Arc<T>) -> Arc<Self> {
        Arc::new_cyclic(|me| DocReplicator {
            doc,
            target,
            peers: Mutex::new(HashMap::new()),
            resume: Mutex::new(HashMap::new()),
            catching_up: AtomicBool::new(false),
            wake: Notify::new(),
            counters: Arc::default(),
            me: me.clone(),
        })
    }

    /// The task that sends: runs until aborted.
    pub fn spawn(self: &Arc<Self>) -> JoinHandle<()> {
        let me = self.clone();
        let mut version = self.target.version();
        tokio::spawn(async move {
            // When a peer held back for want of an answer is due anyway.
            let mut due: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = version.changed() => {}
                    _ = me.wake.notified() => {}
                    _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                }
                due = me.send_pending();
            }
        })
    }

    /// Queue the next message for every peer that is owed one; returns
    /// when the first peer held back (awaiting an answer) is due anyway.
    fn send_pending(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut due: Option<Instant> = None;
        let mut soon = |at: Instant| due = Some(due.map_or(at, |d: Instant| d.min(at)));
        let mut peers = self.peers.lock().unwrap();
        let generation = self.target.generation();
        for peer in peers.values_mut() {
            peer.follow(generation);
            if let Some(sent) = peer.changes_sent
                && peer.state.in_flight
                && now < sent + UNANSWERED
            {
                soon(sent + UNANSWERED);
                continue;
            }
            // An answer that never came (the protocol then waits forever):
            // start the exchange over from the heads both sides share.
            if peer.state.in_flight
                && let Some(sent) = peer.sent_at
            {
                if now < sent + STALLED {
                    soon(sent + STALLED);
                } else {
                    tracing::debug!(peer = %peer.link.node, doc = ?self.doc, "no answer to a sync message; restarting the exchange");
                    peer.restart();
                }
            }
            let sent_before = peer.state.sent_hashes.len();
            if let Some(msg) = self.target.generate(&mut peer.state) {
                let with_changes = peer.state.sent_hashes.len() > sent_before;
                let len = msg.len() as u64;
                let frame = Frame::Sync {
                    doc: self.doc,
                    msg: msg.into(),
                };
                if peer.link.offer(frame.encode()) {
                    self.counters.sent_bytes.fetch_add(len, Ordering::Relaxed);
                    peer.changes_sent = with_changes.then_some(now);
                    peer.sent_at = Some(now);
                } else {
                    // Nothing else may wake us: try again shortly.
                    tracing::debug!(peer = %peer.link.node, "sync message not queued; restarting the exchange");
                    peer.restart();
                    soon(now + RETRY);
                }
            }
        }
        due
    }

    fn state_for(&self, name: &Arc<str>) -> sync::State {
        let generation = self.target.generation();
        self.resume
            .lock()
            .unwrap()
            .remove(name)
            .filter(|(g, _)| *g == generation)
            .and_then(|(_, b)| sync::State::decode(&b).ok())
            .unwrap_or_default()
    }

    /// The peers that are up and say they hold every change `heads` name
    /// (asked now, each on a stream of its own: the sync protocol does not
    /// confirm what a peer already had).
    pub async fn holding(&self, heads: &[ChangeHash]) -> Vec<Arc<str>> {
        let links: Vec<Arc<PeerLink>> = (self.peers.lock().unwrap().values())
            .map(|p| p.link.clone())
            .filter(|l| !l.is_closed())
            .collect();
        let heads: Arc<[[u8; 32]]> = heads.iter().map(|h| h.0).collect();
        let mut asks = tokio::task::JoinSet::new();
        for link in links {
            let (heads, doc) = (heads.clone(), self.doc);
            asks.spawn(async move {
                let ask = crate::cluster::link::ask_holds(&link.conn, doc, &heads);
                let yes = matches!(tokio::time::timeout(HOLDS_TIMEOUT, ask).await, Ok(Ok(true)));
                yes.then(|| link.node.clone())
            });
        }
        asks.join_all().await.into_iter().flatten().collect()
    }

    /// Fetch `link`'s peer's document and adopt it (one at a time).
    fn catch_up(self: &Arc<Self>, link: &Arc<PeerLink>) {
        if self.catching_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let (me, link) = (self.clone(), link.clone());
        tokio::spawn(async move {
            let fetched = tokio::time::timeout(
                SNAPSHOT_TIMEOUT,
                crate::cluster::link::fetch_snapshot(&link.conn, me.doc),
            )
            .await;
            let adopted = match fetched {
                Ok(Ok(Some(bytes))) => {
                    let target = me.target.clone();
                    match tokio::task::spawn_blocking(move || target.adopt(&bytes)).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("cannot adopt the peer's document: {e:#}")),
                        Err(e) => Err(format!("adopting the peer's document failed: {e}")),
                    }
                }
                Ok(Ok(None)) => Err("the peer has no document to give".to_string()),
                Ok(Err(e)) => Err(format!("fetching the peer's document: {e:#}")),
                Err(_) => Err("fetching the peer's document timed out".to_string()),
            };
            if let Err(why) = adopted {
                tracing::warn!(peer = %link.node, doc = ?me.doc, "{why}; trying again later");
                // Not at once: every message from a peer ahead asks again.
                tokio::time::sleep(CATCH_UP_BACKOFF).await;
            }
            me.catching_up.store(false, Ordering::Release);
            me.wake.notify_one();
        });
    }
}

impl Peer {
    /// Start over if the document's history was replaced.
    fn follow(&mut self, generation: u64) {
        if self.generation != generation {
            self.state = sync::State::new();
            self.generation = generation;
            self.changes_sent = None;
        }
    }

    /// Start the exchange over from the heads both sides share.
    fn restart(&mut self) {
        let shared = std::mem::take(&mut self.state.shared_heads);
        self.state = sync::State::new();
        self.state.shared_heads = shared;
        self.changes_sent = None;
        self.sent_at = None;
    }
}

impl<T: SyncTarget> Replica for DocReplicator<T> {
    fn doc(&self) -> DocId {
        self.doc
    }

    fn peer_up(&self, link: &Arc<PeerLink>) {
        let mut peers = self.peers.lock().unwrap();
        if peers
            .get(&link.node)
            .is_some_and(|p| Arc::ptr_eq(&p.link, link))
        {
            return;
        }
        let state = self.state_for(&link.node);
        peers.insert(
            link.node.clone(),
            Peer {
                link: link.clone(),
                state,
                generation: self.target.generation(),
                changes_sent: None,
                sent_at: None,
            },
        );
        drop(peers);
        self.wake.notify_one();
    }

    fn peer_down(&self, link: &Arc<PeerLink>) {
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get(&link.node)
            && Arc::ptr_eq(&p.link, link)
        {
            let p = peers.remove(&link.node).unwrap();
            self.resume
                .lock()
                .unwrap()
                .insert(link.node.clone(), (p.generation, p.state.encode()));
        }
    }

    fn snapshot(&self) -> Option<Vec<u8>> {
        self.target.snapshot()
    }

    fn holds(&self, heads: &[[u8; 32]]) -> bool {
        let heads: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(*h)).collect();
        self.target.holds(&heads)
    }

    fn receive(&self, link: &Arc<PeerLink>, msg: &[u8]) {
        // Leftovers of a link that was replaced (a duplicate link closed,
        // a restarted peer) must not take the peer's place: the live link
        // would lose its entry when the old one goes down, and neither
        // side would send again (a convergence stall seen after heals).
        // The live link's exchange covers whatever this message said.
        if link.is_closed() {
            return;
        }
        if let Some(p) = self.peers.lock().unwrap().get(&link.node)
            && !Arc::ptr_eq(&p.link, link)
            && !p.link.is_closed()
        {
            return;
        }
        // The reader may deliver before `peer_up` ran for this link.
        self.peer_up(link);
        let mut peers = self.peers.lock().unwrap();
        let Some(peer) = peers.get_mut(&link.node) else {
            return;
        };
        (self.counters.received_bytes).fetch_add(msg.len() as u64, Ordering::Relaxed);
        peer.follow(self.target.generation());
        let received = if msg.len() >= BIG_MESSAGE {
            blocking(|| self.target.receive(&mut peer.state, msg))
        } else {
            self.target.receive(&mut peer.state, msg)
        };
        match received {
            Ok(Received::Applied) => {}
            Ok(Received::Behind) => {
                if let Some(me) = self.me.upgrade() {
                    me.catch_up(link);
                }
            }
            Err(e) => {
                tracing::warn!(peer = %link.node, doc = ?self.doc, "bad sync message ({e:#}); restarting the exchange");
                peer.state = sync::State::new();
            }
        }
        drop(peers);
        // Answer this peer, and pass anything new on to the others.
        self.wake.notify_one();
    }
}
