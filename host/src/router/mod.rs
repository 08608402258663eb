//! The router: where events, commands, calls and key-value change
//! notifications find the scripts that want them.
//!
//! Data paths: instance → router → mailboxes (this node), instance →
//! router → [`Remote`] (the cluster's links) → network, and network →
//! router → instance. Scripts never see each other directly; they only see
//! the router through the `events` and `kv` capabilities.
//!
//! Subscriptions belong to a *generation* of a script (one instantiation).
//! During a hot reload or a crash restart, the old generation's
//! subscriptions stay routed until the new generation's `init` succeeds, so
//! messages keep queueing in the script's mailbox and none is lost in the
//! swap; then the old generation is retired in one step.
//!
//! System events (`covey.*`, see `lifecycle`) enter only through
//! [`Router::emit_system`]; every other sender is refused the prefix.
//!
//! - `mailbox` — a script's queue of deliveries, filled a run at a time.
//! - `message` — the message as it is carried (strings inline, a
//!   refcounted payload).
//! - `peers` — the traits through which it reaches other nodes, devices
//!   and the node's own answers.
//! - `table` — the registered scripts and the index over their
//!   subscriptions (routing cost independent of non-matching ones).
//! - `calls` — request/reply.
//! - `stats` — counters by outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use smallvec::SmallVec;
use smol_str::SmolStr;
use tokio::sync::oneshot;

use crate::bindings::{CallError, SendError};
use crate::clock::now_ms;
use crate::lifecycle;
use crate::logtext::for_log;
use crate::pattern::Pattern;

mod calls;
mod mailbox;
mod message;
mod peers;
mod stats;
mod table;
pub use mailbox::{MailboxRx, MailboxTx, mailbox};
pub use message::Message;
pub use peers::{
    CallFuture, Devices, PeerStatus, Remote, SYSTEM_LOGS, SYSTEM_SCRIPTS, SystemCalls, split_target,
};
pub use stats::{Outcome, Outcomes, RouterStats};

/// A script's identity: its path relative to the scripts directory, with `/`
/// separators (e.g. `sensors/temp.wasm`). Stable across versions.
pub type ScriptId = Arc<str>;

/// The reply to a call, sent back by the handling script's instance.
pub type Reply = oneshot::Sender<Result<Vec<u8>, CallError>>;

/// Something for a script to handle, queued in its mailbox.
pub enum Delivery {
    /// An event; `generation` is the generation whose subscription matched.
    Event { msg: Message, generation: u64 },
    /// A command, or a call when `reply` is set.
    Command {
        msg: Message,
        generation: u64,
        reply: Option<Reply>,
    },
    /// A watched key changed (`value` none = deleted).
    KvChange {
        watch: u64,
        key: Arc<str>,
        value: Option<Arc<[u8]>>,
    },
    /// A timer of the given generation fired.
    Timer { generation: u64, id: u64 },
}

/// What a subscription selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SubKind {
    Event { from: Pattern, name: Pattern },
    Command { from: Pattern, name: Pattern },
    Watch { prefix: String },
}

impl SubKind {
    pub fn matches_event(&self, msg: &Message) -> bool {
        self.selects_event(&msg.from, &msg.name)
    }

    /// Would an event `name` from `node` be delivered to this subscription?
    pub fn selects_event(&self, node: &str, name: &str) -> bool {
        matches!(self, SubKind::Event { from, name: p } if p.selects(name) && from.matches(node))
    }

    pub fn matches_command(&self, msg: &Message) -> bool {
        matches!(self, SubKind::Command { from, name } if name.matches(&msg.name) && from.matches(&msg.from))
    }
}

/// Routes messages among the scripts of this node and, through
/// [`Remote`], to other nodes; through [`Devices`], to its devices.
pub struct Router {
    node: SmolStr,
    max_payload: usize,
    remote: OnceLock<Arc<dyn Remote>>,
    devices: OnceLock<Arc<dyn Devices>>,
    system: OnceLock<Arc<dyn SystemCalls>>,
    table: RwLock<table::Table>,
    next_sub: AtomicU64,
    /// Next message id. Starts at a random point so ids do not repeat across
    /// restarts of this node.
    msg_seq: AtomicU64,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(node: &str, max_payload: usize) -> Self {
        Router {
            node: node.into(),
            max_payload,
            remote: OnceLock::new(),
            devices: OnceLock::new(),
            system: OnceLock::new(),
            table: RwLock::default(),
            next_sub: AtomicU64::new(1),
            msg_seq: AtomicU64::new(crate::random::u64()),
            stats: RouterStats::default(),
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Connect the router to the cluster (once, at node start).
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        if self.remote.set(remote).is_err() {
            panic!("router already has a remote");
        }
    }

    /// Connect the router to the firmware bridge (once, at node start).
    pub fn set_devices(&self, devices: Arc<dyn Devices>) {
        if self.devices.set(devices).is_err() {
            panic!("router already has devices");
        }
    }

    /// The node's own answers to `covey.node.*` calls (set once, at start).
    pub fn set_system(&self, system: Arc<dyn SystemCalls>) {
        if self.system.set(system).is_err() {
            panic!("router already has system calls");
        }
    }

    /// The device part of `to` when it names a device of this node.
    fn local_device<'a>(&self, to: &'a str) -> Option<&'a str> {
        match split_target(to) {
            (node, Some(device)) if node == &*self.node => Some(device),
            _ => None,
        }
    }

    fn device_command(&self, device: &str, msg: &Message) -> Result<(), SendError> {
        match self.devices.get() {
            Some(d) => d.command(device, msg),
            None => Err(SendError::UnknownNode(msg.to.to_string())),
        }
    }

    pub fn remote(&self) -> Option<&Arc<dyn Remote>> {
        self.remote.get()
    }

    /// The remote that reaches `target` (not `*`, not this node), or why
    /// none does: it is `Down` or `Unknown`.
    fn route(&self, target: &str) -> Result<&Arc<dyn Remote>, PeerStatus> {
        let remote = self.remote.get().ok_or(PeerStatus::Unknown)?;
        match remote.peer(target) {
            PeerStatus::Up => Ok(remote),
            other => Err(other),
        }
    }

    /// Make a script reachable. Its subscriptions start empty.
    pub fn register(&self, script: ScriptId, mailbox: MailboxTx) {
        self.table.write().unwrap().register(script, mailbox);
    }

    /// Remove a script and all its subscriptions.
    pub fn unregister(&self, script: &str) {
        self.table.write().unwrap().unregister(script);
    }

    /// Add a subscription for `generation` of `script`. An identical one of
    /// the same generation is reused, so each message is delivered once.
    /// 0 when the script is not registered.
    pub fn subscribe(&self, script: &str, generation: u64, kind: SubKind) -> u64 {
        let id = self.next_sub.fetch_add(1, Ordering::Relaxed);
        let mut table = self.table.write().unwrap();
        table.subscribe(script, generation, kind, id).unwrap_or(0)
    }

    /// Remove one subscription of `script`.
    pub fn unsubscribe(&self, script: &str, id: u64) -> bool {
        self.table.write().unwrap().unsubscribe(script, id)
    }

    /// Keep only `generation`'s subscriptions: the swap to a new generation.
    pub fn retire_other_generations(&self, script: &str, generation: u64) {
        let mut table = self.table.write().unwrap();
        table.unsubscribe_where(script, |s| s.generation != generation);
    }

    /// Drop `generation`'s subscriptions: a new version that failed to start.
    pub fn drop_generation(&self, script: &str, generation: u64) {
        let mut table = self.table.write().unwrap();
        table.unsubscribe_where(script, |s| s.generation == generation);
    }

    /// A new message from this node.
    pub fn message(&self, to: &str, name: &str, payload: impl Into<Bytes>) -> Message {
        self.message_from(None, to, name, payload.into())
    }

    /// A new message from this node, or from one of its devices.
    fn message_from(&self, device: Option<&str>, to: &str, name: &str, payload: Bytes) -> Message {
        Message {
            id: self.msg_seq.fetch_add(1, Ordering::Relaxed),
            from: match device {
                Some(d) => smol_str::format_smolstr!("{}/{d}", self.node),
                None => self.node.clone(),
            },
            to: to.into(),
            name: name.into(),
            payload,
            timestamp_ms: now_ms(),
        }
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), u64> {
        if payload.len() > self.max_payload {
            Err(self.max_payload as u64)
        } else {
            Ok(())
        }
    }

    /// Broadcast an event to local scripts and every peer. Returns how many
    /// local scripts it was queued for. The payload is taken as it is
    /// (a `Vec` or a shared `Bytes`): a host sender's buffer is not copied.
    pub fn emit(&self, name: &str, payload: impl Into<Bytes>) -> Result<usize, SendError> {
        self.emit_from(None, name, payload)
    }

    /// Broadcast an event from this node or one of its devices.
    pub fn emit_from(
        &self,
        device: Option<&str>,
        name: &str,
        payload: impl Into<Bytes>,
    ) -> Result<usize, SendError> {
        let payload = payload.into();
        if lifecycle::is_reserved(name) {
            self.stats.events.count(Outcome::ReservedName);
            return Err(SendError::ReservedName(name.to_string()));
        }
        if let Err(max) = self.check_payload(&payload) {
            self.stats.events.count(Outcome::PayloadTooLarge);
            return Err(SendError::PayloadTooLarge(max));
        }
        let msg = self.message_from(device, "*", name, payload);
        Ok(self.publish(msg, true))
    }

    /// A system event (`lifecycle`): to this node's scripts, and to every
    /// peer when its scope says so. Its payload is the node's own JSON,
    /// far below any payload limit.
    pub fn emit_system(&self, name: &str, payload: Vec<u8>) {
        let Some(scope) = lifecycle::scope(name) else {
            debug_assert!(false, "{name} is not a system event");
            return;
        };
        let msg = self.message("*", name, payload);
        self.publish(msg, scope == lifecycle::Scope::Cluster);
    }

    /// Count an emitted event, send it to every peer that is up when
    /// `to_peers`, and queue it for this node's subscribers (how many).
    fn publish(&self, msg: Message, to_peers: bool) -> usize {
        self.stats.events.count(Outcome::Ok);
        if to_peers && let Some(remote) = self.remote.get() {
            remote.broadcast_event(&msg);
        }
        self.deliver_event(msg)
    }

    /// Queue a `covey.node.up` for every node up now, to one generation of
    /// one script only: what it missed before it subscribed. The cluster
    /// holds its membership lock meanwhile, so no transition slips between
    /// these and the live events that follow.
    pub fn replay_nodes_up(&self, script: &str, generation: u64) {
        let Some(remote) = self.remote.get() else {
            return;
        };
        remote.replay_up(&mut |payload| {
            let msg = self.message("*", lifecycle::NODE_UP, payload);
            let table = self.table.read().unwrap();
            if let Some(mailbox) = table.mailbox(script) {
                self.offer(mailbox, Delivery::Event { msg, generation });
            }
        });
    }

    /// Queue `msg` for every local script with a matching event subscription.
    pub fn deliver_event(&self, msg: Message) -> usize {
        let table = self.table.read().unwrap();
        // The newest matching generation decides; the instance re-checks
        // against its own subscriptions if that is not the live one.
        let subs = table.event_subscribers(&msg);
        self.offer_each(&subs, msg, |msg, generation| Delivery::Event {
            msg,
            generation,
        })
    }

    /// Queue a run of events (one read off a link) for the local scripts
    /// subscribed to each, in order: the table is locked once for the run
    /// and each mailbox is filled once. How many deliveries were queued.
    pub fn deliver_events(&self, msgs: &mut Vec<Message>) -> usize {
        let table = self.table.read().unwrap();
        let mut runs: SmallVec<[(&Arc<table::Mailbox>, Vec<Delivery>); 2]> = SmallVec::new();
        let each = msgs.len();
        for msg in msgs.drain(..) {
            let subs = table.event_subscribers(&msg);
            let event = |msg, generation| Delivery::Event { msg, generation };
            each_delivery(&subs, msg, event, |sub, d| {
                let i = (runs.iter().position(|(m, _)| Arc::ptr_eq(m, &sub.mailbox)))
                    .unwrap_or_else(|| {
                        runs.push((&sub.mailbox, Vec::with_capacity(each)));
                        runs.len() - 1
                    });
                runs[i].1.push(d);
            });
        }
        let mut queued = 0;
        for (mailbox, mut run) in runs {
            let n = mailbox.tx.send_many(&mut run);
            self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
            if !run.is_empty() {
                self.count_dropped(mailbox, run.len() as u64);
            }
            queued += n;
        }
        queued
    }

    /// Offer `msg` to each of `subs`; how many were queued.
    fn offer_each(
        &self,
        subs: &[&Arc<table::Sub>],
        msg: Message,
        delivery: impl Fn(Message, u64) -> Delivery,
    ) -> usize {
        let mut queued = 0;
        each_delivery(subs, msg, delivery, |sub, d| {
            queued += self.offer(&sub.mailbox, d) as usize;
        });
        queued
    }

    /// Send a command to `target` (a node or `*`); every matching handler
    /// there gets it. Returns how many local scripts it was queued for.
    pub fn send_command(
        &self,
        target: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<usize, SendError> {
        self.send_command_from(None, target, name, payload)
    }

    /// A command from this node or one of its devices, to a node, `*`, or
    /// `NODE/DEVICE`.
    pub fn send_command_from(
        &self,
        device: Option<&str>,
        target: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<usize, SendError> {
        let r = self.route_command(device, target, name, payload);
        self.stats.commands.count(Outcome::of_send(&r));
        r
    }

    fn route_command(
        &self,
        device: Option<&str>,
        target: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<usize, SendError> {
        self.check_payload(&payload)
            .map_err(SendError::PayloadTooLarge)?;
        let msg = self.message_from(device, target, name, payload.into());
        if target == "*" {
            if let Some(remote) = self.remote.get() {
                remote.send_command(None, &msg);
            }
            return Ok(self.deliver_command(msg));
        }
        let (node, on_device) = split_target(target);
        if node == &*self.node {
            return match on_device {
                Some(d) => self.device_command(d, &msg).map(|()| 0),
                None => Ok(self.deliver_command(msg)),
            };
        }
        match self.route(node) {
            Ok(remote) => {
                remote.send_command(Some(node), &msg);
                Ok(0)
            }
            Err(PeerStatus::Down) => Err(SendError::NodeDown(node.to_string())),
            Err(_) => Err(SendError::UnknownNode(node.to_string())),
        }
    }

    /// Queue a command for every local script with a matching handler, or
    /// hand it to the device it names.
    pub fn deliver_command(&self, msg: Message) -> usize {
        if let Some(device) = self.local_device(&msg.to) {
            if let Err(e) = self.device_command(device, &msg) {
                tracing::debug!(to = for_log(&msg.to), "command for a device dropped: {e:?}");
            }
            return 0;
        }
        let table = self.table.read().unwrap();
        let subs = table.command_handlers(&msg);
        self.offer_each(&subs, msg, |msg, generation| Delivery::Command {
            msg,
            generation,
            reply: None,
        })
    }

    /// Tell watchers of `key` that it changed.
    pub fn kv_changed(&self, key: &str, value: Option<&[u8]>) {
        let table = self.table.read().unwrap();
        let watchers = table.watchers(key);
        if watchers.is_empty() {
            return;
        }
        let key: Arc<str> = key.into();
        let value: Option<Arc<[u8]>> = value.map(Into::into);
        for sub in watchers {
            let d = Delivery::KvChange {
                watch: sub.id,
                key: key.clone(),
                value: value.clone(),
            };
            self.offer(&sub.mailbox, d);
        }
    }

    /// Queue without waiting: a full mailbox (a stuck or crashed script)
    /// never blocks the sender or other scripts; the drop is counted.
    fn offer(&self, mailbox: &table::Mailbox, d: Delivery) -> bool {
        let queued = mailbox.tx.try_send(d);
        if queued {
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.count_dropped(mailbox, 1);
        }
        queued
    }

    /// `n` deliveries to `mailbox` did not fit.
    fn count_dropped(&self, mailbox: &table::Mailbox, n: u64) {
        mailbox.dropped.fetch_add(n, Ordering::Relaxed);
        let before = self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        // Logged at each power of two passed, so a flood logs rarely.
        if (before + n).ilog2() != before.checked_ilog2().unwrap_or(u32::MAX) {
            let script = &*mailbox.script;
            let dropped_total = before + n;
            tracing::warn!(
                script,
                dropped_total,
                "mailbox full (or script stopping), message dropped"
            );
        }
    }

    /// Deliveries to `script` dropped because its mailbox was full.
    pub fn dropped(&self, script: &str) -> u64 {
        let table = self.table.read().unwrap();
        (table.mailbox(script)).map_or(0, |m| m.dropped.load(Ordering::Relaxed))
    }

    /// Names of the registered scripts, sorted (devices' entries, named
    /// `device:NAME`, left out: no script path has a `:`).
    pub fn scripts(&self) -> Vec<ScriptId> {
        let table = self.table.read().unwrap();
        table
            .scripts()
            .filter(|k| !k.contains(':'))
            .cloned()
            .collect()
    }
}

/// `msg` made a delivery by `delivery` (with the subscription's
/// generation) for each of `subs`, handed to `to`: clones for all but the
/// last, which takes `msg` itself.
fn each_delivery<'t>(
    subs: &[&'t Arc<table::Sub>],
    msg: Message,
    delivery: impl Fn(Message, u64) -> Delivery,
    mut to: impl FnMut(&'t Arc<table::Sub>, Delivery),
) {
    let Some((last, others)) = subs.split_last() else {
        return;
    };
    for sub in others {
        to(sub, delivery(msg.clone(), sub.generation));
    }
    to(last, delivery(msg, last.generation));
}
