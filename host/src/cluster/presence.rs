//! Which other nodes this node's scripts have been told are up: the
//! `covey.node.up` / `covey.node.down` system events (`lifecycle`).
//!
//! Membership ([`super::members`]) follows links as they are; presence
//! follows what scripts were told, once per transition. A link that drops
//! for any reason but a clean shutdown is reported down only if it is still
//! down after the flap window; one that comes back within it is not
//! reported at all, and the drop is counted in the `flaps` of the node's
//! next event. A node that comes back as a new process (a new incarnation)
//! while still reported up was restarted: `down` (reason `restarted`), then
//! `up`.
//!
//! Every event is delivered while the presence lock is held, and so is a
//! script's replay of the nodes up when it subscribes: a script never sees
//! a transition twice, or out of order with its replay.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;
use crate::lifecycle::{self, DownReason, NodeEvent};
use crate::router::Router;

/// How long a dropped link may stay down before it is reported, unless
/// configured (`cluster.flap_window_ms`).
pub const DEFAULT_FLAP_WINDOW: Duration = Duration::from_secs(5);

pub struct Presence {
    router: Arc<Router>,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<Arc<str>, Seen>,
    /// Set when this node shuts down: its own links closing are no news.
    closed: bool,
    /// Bumped by every drop, so a drop's timer knows if it is still current.
    epoch: u64,
}

struct Seen {
    /// Reported up to scripts (true also while a drop awaits its window).
    up: bool,
    /// The connection of its current link (`stable_id`): a late close of
    /// an older one is no news.
    link: usize,
    incarnation: u64,
    address: SocketAddr,
    since_ms: u64,
    flaps: u32,
    /// A drop waiting out the flap window: its epoch, reason and time.
    pending: Option<(u64, DownReason, u64)>,
}

impl Presence {
    pub fn new(router: Arc<Router>, window: Duration) -> Arc<Self> {
        Arc::new(Presence {
            router,
            window,
            state: Mutex::new(State::default()),
        })
    }

    /// Link `link` to `node` (process `incarnation`) is up.
    pub fn up(&self, node: &Arc<str>, link: usize, incarnation: u64, address: SocketAddr) {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return;
        }
        let now = now_ms();
        let seen = st.nodes.entry(node.clone()).or_insert(Seen {
            up: false,
            link,
            incarnation,
            address,
            since_ms: now,
            flaps: 0,
            pending: None,
        });
        let restarted = seen.up && seen.incarnation != incarnation;
        let flapped = seen.pending.take().is_some();
        seen.address = address;
        seen.link = link;
        if restarted {
            seen.incarnation = incarnation;
            self.report(node, seen, Some(DownReason::Restarted), now);
        } else if flapped {
            seen.flaps += 1;
            tracing::info!(peer = %node, "link came back within the flap window: not reported");
            return;
        }
        if !seen.up {
            seen.incarnation = incarnation;
            self.report(node, seen, None, now);
        }
    }

    /// Link `link` to `node` closed for `reason`.
    pub fn down(self: &Arc<Self>, node: &Arc<str>, link: usize, reason: DownReason) {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return;
        }
        st.epoch += 1;
        let epoch = st.epoch;
        let Some(seen) = st.nodes.get_mut(node) else {
            return;
        };
        if !seen.up || seen.link != link {
            return;
        }
        let now = now_ms();
        if reason == DownReason::Shutdown || self.window.is_zero() {
            seen.pending = None;
            self.report(node, seen, Some(reason), now);
            return;
        }
        seen.pending = Some((epoch, reason, now));
        let me = self.clone();
        let node = node.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.window).await;
            me.window_over(&node, epoch);
        });
    }

    /// A drop's flap window is over: report it if the node is still down.
    fn window_over(&self, node: &Arc<str>, epoch: u64) {
        let mut st = self.state.lock().unwrap();
        if st.closed {
            return;
        }
        let Some(seen) = st.nodes.get_mut(node) else {
            return;
        };
        if let Some((e, reason, at)) = seen.pending
            && e == epoch
        {
            seen.pending = None;
            self.report(node, seen, Some(reason), at);
        }
    }

    /// Tell this node's scripts (`reason` none: up, else down), under the
    /// lock.
    fn report(&self, node: &str, seen: &mut Seen, reason: Option<DownReason>, at: u64) {
        seen.up = reason.is_none();
        seen.since_ms = at;
        let event = NodeEvent {
            node: node.to_string(),
            address: seen.address.to_string(),
            since_ms: at,
            reason,
            flaps: std::mem::take(&mut seen.flaps),
            replay: false,
        };
        let name = match reason {
            None => lifecycle::NODE_UP,
            Some(_) => lifecycle::NODE_DOWN,
        };
        tracing::debug!(peer = node, "{name}");
        self.router.emit_system(name, lifecycle::payload(&event));
    }

    /// `covey.node.up` payloads (`replay`) for every node reported up.
    pub fn replay(&self, deliver: &mut dyn FnMut(Vec<u8>)) {
        let st = self.state.lock().unwrap();
        for (node, seen) in st.nodes.iter().filter(|(_, s)| s.up) {
            let event = NodeEvent {
                node: node.to_string(),
                address: seen.address.to_string(),
                since_ms: seen.since_ms,
                reason: None,
                flaps: 0,
                replay: true,
            };
            deliver(lifecycle::payload(&event));
        }
    }

    /// This node is shutting down: no more events.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
    }
}

/// Why a link closed, from its connection's close reason.
pub fn reason_of(conn: &quinn::Connection) -> DownReason {
    use quinn::ConnectionError as E;
    match conn.close_reason() {
        Some(E::ApplicationClosed(c)) if c.error_code == super::link::close::SHUTDOWN.into() => {
            DownReason::Shutdown
        }
        Some(E::ApplicationClosed(_)) | Some(E::ConnectionClosed(_)) => DownReason::Refused,
        Some(E::TimedOut) => DownReason::Timeout,
        _ => DownReason::Lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::SystemEvent;
    use crate::pattern::Pattern;
    use crate::router::{Delivery, MailboxRx, SubKind, mailbox};

    /// A presence whose events land in the returned mailbox.
    fn watched(window: Duration) -> (Arc<Presence>, MailboxRx) {
        let router = Arc::new(Router::new("me", 1 << 20));
        let (tx, rx) = mailbox(64);
        router.register("watch.lua".into(), tx);
        let kind = SubKind::Event {
            from: Pattern::new("*"),
            name: Pattern::new("covey.node.*"),
        };
        router.subscribe("watch.lua", 1, kind);
        (Presence::new(router, window), rx)
    }

    fn events(rx: &mut MailboxRx) -> Vec<SystemEvent> {
        let mut out = Vec::new();
        while let Some(Delivery::Event { msg, .. }) = rx.try_recv() {
            out.push(SystemEvent::parse(&msg.name, &msg.payload).unwrap());
        }
        out
    }

    fn down_reason(e: &SystemEvent) -> Option<DownReason> {
        match e {
            SystemEvent::NodeDown(n) => n.reason,
            _ => None,
        }
    }

    #[tokio::test]
    async fn restarts_stale_links_and_shutdowns() {
        let (p, mut rx) = watched(Duration::ZERO);
        let node: Arc<str> = "b".into();
        let addr: SocketAddr = "10.0.0.2:7466".parse().unwrap();
        p.up(&node, 1, 100, addr);
        assert!(matches!(events(&mut rx)[..], [SystemEvent::NodeUp(_)]));
        // A new process (incarnation) while reported up: down, then up.
        p.up(&node, 2, 200, addr);
        let ev = events(&mut rx);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(down_reason(&ev[0]), Some(DownReason::Restarted));
        assert!(matches!(ev[1], SystemEvent::NodeUp(_)));
        // The replaced link closing late is no news.
        p.down(&node, 1, DownReason::Lost);
        assert!(events(&mut rx).is_empty());
        p.down(&node, 2, DownReason::Shutdown);
        let ev = events(&mut rx);
        assert_eq!(
            ev.iter().map(down_reason).collect::<Vec<_>>(),
            [Some(DownReason::Shutdown)]
        );
        // Down once: a second close reports nothing.
        p.down(&node, 2, DownReason::Lost);
        assert!(events(&mut rx).is_empty());
        // After close (this node stopping), nothing at all.
        p.close();
        p.up(&node, 3, 200, addr);
        assert!(events(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn a_drop_longer_than_the_window_is_reported_with_its_reason_and_time() {
        let (p, mut rx) = watched(Duration::from_millis(20));
        let node: Arc<str> = "b".into();
        let addr: SocketAddr = "10.0.0.2:7466".parse().unwrap();
        p.up(&node, 1, 100, addr);
        p.down(&node, 1, DownReason::Timeout);
        p.up(&node, 2, 100, addr); // back within the window: a flap
        p.down(&node, 2, DownReason::Timeout);
        let dropped_at = now_ms();
        assert_eq!(events(&mut rx).len(), 1, "only the first up so far");
        let down = loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Some(e) = events(&mut rx).pop() {
                break e;
            }
        };
        let SystemEvent::NodeDown(n) = down else {
            panic!("{down:?}")
        };
        assert_eq!((n.reason, n.flaps), (Some(DownReason::Timeout), 1));
        assert!(
            n.since_ms <= dropped_at,
            "the time of the drop, not of the report"
        );
    }
}
