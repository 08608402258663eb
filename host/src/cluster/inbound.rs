//! What arrives on a link: frames to the router and the replicated
//! documents, and the requests peers make on streams of their own (blobs,
//! whole documents, whether heads are held).

use std::borrow::Cow;
use std::sync::Arc;

use super::*;

impl Inbound for Shared {
    fn frame(self: &Arc<Self>, link: &Arc<PeerLink>, frame: Frame<'_>, events: &mut Vec<Message>) {
        if !matches!(frame, Frame::Event(_)) {
            self.events(events);
        }
        let limit = self.router.max_payload();
        match frame {
            // A peer with a larger limit (or none) cannot push past ours.
            Frame::Event(w) | Frame::Command(w) if w.payload.len() > limit => {
                oversized(link, &w.name, w.payload.len(), limit);
            }
            Frame::Event(w) | Frame::Command(w) | Frame::Call { msg: w, .. } if !w.via_ok() => {
                tracing::warn!(
                    peer = %link.node,
                    via = crate::logtext::for_log(&w.via),
                    "dropped a message from a peer: not a device name"
                );
            }
            Frame::Call { call, msg, .. } if msg.payload.len() > limit => {
                oversized(link, &msg.name, msg.payload.len(), limit);
                let reply = Frame::Reply {
                    call,
                    result: Err(WireCallError::PayloadTooLarge(limit as u64)),
                };
                link.offer(reply.encode());
            }
            Frame::Reply {
                call,
                result: Ok(reply),
            } if reply.len() > limit => {
                oversized(link, "(reply)", reply.len(), limit);
                link.complete_call(call, Err(CallError::PayloadTooLarge(limit as u64)));
            }
            Frame::Event(w)
                if !crate::lifecycle::peer_may_send(&link.node, &w.name, &w.payload) =>
            {
                tracing::warn!(
                    peer = %link.node,
                    name = crate::logtext::for_log(&w.name),
                    "dropped an event from a peer: a system event only this node emits"
                );
            }
            Frame::Event(w) => events.push(w.to_message(&link.node)),
            Frame::Command(w) => {
                self.router.deliver_command(w.to_message(&link.node));
            }
            Frame::Call {
                call,
                timeout_ms,
                msg,
            } => {
                let router = self.router.clone();
                let link = link.clone();
                let msg = msg.to_message(&link.node);
                tokio::spawn(async move {
                    let timeout = Duration::from_millis(timeout_ms as u64);
                    let result = router.call_local(None, msg, timeout).await;
                    let reply = Frame::Reply {
                        call,
                        result: result.map(Cow::Owned).map_err(Into::into),
                    };
                    link.offer(reply.encode());
                });
            }
            Frame::Reply { call, result } => {
                link.complete_call(call, result.map(|r| r.to_vec()).map_err(Into::into));
            }
            Frame::Peers(list) => {
                for p in list {
                    self.learn(&p.node, &[p.addr]);
                }
            }
            Frame::Sync { doc, msg } => {
                if let Some(r) = self.replicas.iter().find(|r| r.doc() == doc) {
                    r.receive(link, &msg);
                }
            }
            Frame::Hello(_) => {
                link.close(close::PROTOCOL, "a second hello on a link");
            }
        }
    }

    fn events(&self, events: &mut Vec<Message>) {
        if !events.is_empty() {
            self.router.deliver_events(events);
        }
    }

    fn blob(&self, hash: &[u8; 32]) -> Option<Vec<u8>> {
        self.blobs.as_ref()?.blob(hash)
    }

    fn snapshot(&self, doc: DocId) -> Option<Vec<u8>> {
        self.replicas.iter().find(|r| r.doc() == doc)?.snapshot()
    }

    fn holds(&self, doc: DocId, heads: &[[u8; 32]]) -> bool {
        (self.replicas.iter().find(|r| r.doc() == doc)).is_some_and(|r| r.holds(heads))
    }

    fn link_closed(&self, link: &Arc<PeerLink>, why: String) {
        for r in &self.replicas {
            r.peer_down(link);
        }
        if self.members.set_down(link) {
            tracing::warn!(peer = %link.node, "peer down: {why}");
            let reason = presence::reason_of(&link.conn);
            (self.presence).down(&link.node, link.conn.stable_id(), reason);
        }
    }
}

/// A message from a peer over this node's payload limit: dropped, logged.
fn oversized(link: &PeerLink, name: &str, len: usize, limit: usize) {
    tracing::warn!(
        peer = %link.node,
        name = crate::logtext::for_log(name),
        "dropped a {len}-byte message from a peer: over this node's payload limit of {limit}"
    );
}
