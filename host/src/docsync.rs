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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::sync;
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
    fn receive(&self, state: &mut sync::State, msg: &[u8]) -> anyhow::Result<()>;
    /// Changes whenever the document does.
    fn version(&self) -> watch::Receiver<u64>;
}

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
    /// When a message carrying changes was last sent.
    changes_sent: Option<Instant>,
}

pub struct DocReplicator<T> {
    doc: DocId,
    target: Arc<T>,
    peers: Mutex<HashMap<Arc<str>, Peer>>,
    /// Shared heads of peers whose link is down, for a quick resume.
    resume: Mutex<HashMap<Arc<str>, Vec<u8>>>,
    wake: Notify,
    pub counters: Arc<SyncCounters>,
}

impl<T: SyncTarget> DocReplicator<T> {
    pub fn new(doc: DocId, target: Arc<T>) -> Arc<Self> {
        Arc::new(DocReplicator {
            doc,
            target,
            peers: Mutex::new(HashMap::new()),
            resume: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            counters: Arc::default(),
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
        let mut peers = self.peers.lock().unwrap();
        for peer in peers.values_mut() {
            if let Some(sent) = peer.changes_sent
                && peer.state.in_flight
                && now < sent + UNANSWERED
            {
                due = Some(due.map_or(sent + UNANSWERED, |d| d.min(sent + UNANSWERED)));
                continue;
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
                } else {
                    tracing::debug!(peer = %peer.link.node, "sync message not queued; restarting the exchange");
                    peer.state = sync::State::new();
                    peer.changes_sent = None;
                }
            }
        }
        due
    }

    fn state_for(&self, name: &Arc<str>) -> sync::State {
        self.resume
            .lock()
            .unwrap()
            .remove(name)
            .and_then(|b| sync::State::decode(&b).ok())
            .unwrap_or_default()
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
                changes_sent: None,
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
                .insert(link.node.clone(), p.state.encode());
        }
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
        if let Err(e) = self.target.receive(&mut peer.state, msg) {
            tracing::warn!(peer = %link.node, doc = ?self.doc, "bad sync message ({e:#}); restarting the exchange");
            peer.state = sync::State::new();
        }
        drop(peers);
        // Answer this peer, and pass anything new on to the others.
        self.wake.notify_one();
    }
}
