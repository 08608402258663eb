//! The receiving half of the bridge: a frame from a transport, checked
//! (length, version, tag, replay window, rate) and acted on; the
//! handshake.

use std::sync::Arc;
use std::time::Instant;

use ring::rand::SecureRandom;

use super::{After, HELLO_GAP, Inner, State, live_session, session_timeout};
use crate::proto::{self, AckStatus, Body, FLAG_ACK, NONCE_LEN, Reject};
use crate::seal::{FEATURE_SEAL, SealKeys};
use crate::session::{Peer, SeqCheck, Session, SessionParams};
use crate::{BusError, DeviceError};

pub(super) type Work = (After, Arc<str>, Option<u32>);
pub(super) type Refusal = (Reject, Option<Arc<str>>);

impl Inner {
    pub(super) fn receive_locked(
        &self,
        st: &mut State,
        peer: &Peer,
        frame: &[u8],
    ) -> Result<Option<Work>, Refusal> {
        let h = proto::header(frame, self.cfg.max_frame as usize).map_err(|r| (r, None))?;
        if h.kind == proto::T_HELLO {
            self.hello(st, peer, frame)?;
            return Ok(None);
        }
        let slot = st.slots.get_mut(&peer.address);
        let Some(slot) = slot else {
            self.reset(st, peer);
            return Err((Reject::NoSession, None));
        };
        let opened = match slot.active.as_ref().and_then(|s| s.open(frame)) {
            Some(f) => f,
            None => match slot.pending.as_ref().and_then(|p| p.open(frame)) {
                Some(f) => {
                    self.promote(st, &peer.address);
                    f
                }
                None => {
                    let device = slot.active.as_ref().map(|s| s.device.clone());
                    if device.is_none() {
                        self.reset(st, peer);
                    }
                    return Err((Reject::BadTag, device));
                }
            },
        };
        let frame = &opened[..];
        let session = st
            .slots
            .get_mut(&peer.address)
            .and_then(|s| s.active.as_mut())
            .expect("a verified session");
        let device = session.device.clone();
        let refuse = |r: Reject| (r, Some(device.clone()));
        if frame.len() > session.max_frame {
            return Err(refuse(Reject::Oversized));
        }
        let ack = (h.flags & FLAG_ACK != 0).then_some(h.seq);
        match session.window.check(h.seq) {
            SeqCheck::TooOld => return Err(refuse(Reject::Replay)),
            SeqCheck::Duplicate => {
                // A retry whose ack was lost: acknowledge, do not redo.
                self.ack(st, &device, ack, AckStatus::Ok);
                return Err(refuse(Reject::Replay));
            }
            SeqCheck::Fresh => {}
        }
        let now = Instant::now();
        if !session.bucket.take(now) {
            // Not marked as seen: the device's retry will be taken.
            self.ack(st, &device, ack, AckStatus::RateLimited);
            return Err(refuse(Reject::RateLimited));
        }
        session.window.mark(h.seq);
        session.last_seen = now;
        st.stats.entry(device.clone()).or_default().frames_in += 1;
        let body = match proto::body(frame) {
            Ok(b) => b,
            Err(r) => {
                self.ack(st, &device, ack, AckStatus::BadFrame);
                return Err(refuse(r));
            }
        };
        self.dispatch(st, &device, body, ack).map_err(refuse)
    }

    fn dispatch(
        &self,
        st: &mut State,
        device: &Arc<str>,
        body: Body<'_>,
        ack: Option<u32>,
    ) -> Result<Option<Work>, Reject> {
        let after = match body {
            Body::Event {
                from,
                name,
                payload,
            } => {
                if !from.is_empty() || name.is_empty() {
                    self.ack(st, device, ack, AckStatus::BadFrame);
                    return Err(Reject::Malformed);
                }
                After::Emit {
                    name: name.to_string(),
                    payload: payload.to_vec(),
                }
            }
            Body::Command {
                peer,
                name,
                payload,
            } => After::Command {
                target: peer.to_string(),
                name: name.to_string(),
                payload: payload.to_vec(),
            },
            Body::Subscribe { from, name } => {
                let status = self.subscribe(st, device, from, name);
                self.ack(st, device, ack, status);
                return Ok(None);
            }
            Body::Unsubscribe { from, name } => {
                let session = live_session(st, device);
                if let Some(id) =
                    session.and_then(|s| s.subs.remove(&(from.to_string(), name.to_string())))
                {
                    self.bus.unsubscribe(device, id);
                }
                self.ack(st, device, ack, AckStatus::Ok);
                return Ok(None);
            }
            Body::Reply {
                call_id,
                ok,
                payload,
            } => {
                if let Some(tx) = live_session(st, device).and_then(|s| s.calls.remove(&call_id)) {
                    let result = if ok {
                        Ok(payload.to_vec())
                    } else {
                        Err(DeviceError::Failed(
                            String::from_utf8_lossy(payload).into_owned(),
                        ))
                    };
                    let _ = tx.send(result);
                }
                return Ok(None);
            }
            Body::Ping => {
                self.send_to(st, device, &Body::Pong);
                return Ok(None);
            }
            // The bridge sends no QoS 1 frames: nothing to match an ack to.
            Body::Ack { .. } => return Ok(None),
            Body::Hello { .. }
            | Body::Welcome { .. }
            | Body::Call { .. }
            | Body::Pong
            | Body::Reset { .. } => {
                return Err(Reject::WrongDirection);
            }
        };
        Ok(Some((after, device.clone(), ack)))
    }

    fn subscribe(&self, st: &mut State, device: &Arc<str>, from: &str, name: &str) -> AckStatus {
        let max = self.cfg.max_subscriptions;
        let Some(session) = live_session(st, device) else {
            return AckStatus::Failed;
        };
        let key = (from.to_string(), name.to_string());
        if session.subs.contains_key(&key) {
            return AckStatus::Ok;
        }
        if session.subs.len() >= max {
            return AckStatus::Refused;
        }
        match self.bus.subscribe(device, from, name) {
            Ok(id) => {
                session.subs.insert(key, id);
                AckStatus::Ok
            }
            Err(BusError::TooLarge(_)) => AckStatus::TooLarge,
            Err(_) => AckStatus::Refused,
        }
    }

    /// A hello: check the device and its tag, open a pending session and
    /// answer with a welcome.
    fn hello(&self, st: &mut State, peer: &Peer, frame: &[u8]) -> Result<(), Refusal> {
        // The name is read before the tag is checked, to find the key; it
        // is trusted only after.
        let Ok(Body::Hello {
            client_nonce,
            max_frame,
            ping_interval_s,
            name,
            features,
        }) = proto::body(frame)
        else {
            return Err((Reject::Malformed, None));
        };
        let Some(key) = proto::valid_device_name(name)
            .then(|| self.bus.key(name))
            .flatten()
        else {
            return Err((Reject::UnknownDevice, None));
        };
        if !proto::verify(
            &proto::key(&key),
            proto::Dir::DeviceToBridge,
            &[0; NONCE_LEN],
            frame,
        ) {
            return Err((Reject::BadTag, None));
        }
        let now = Instant::now();
        let slot = st.slots.entry(peer.address.clone()).or_default();
        if slot
            .last_hello
            .is_some_and(|t| now.duration_since(t) < HELLO_GAP)
        {
            return Err((Reject::RateLimited, Some(name.into())));
        }
        slot.last_hello = Some(now);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).expect("system random");
        let params = SessionParams {
            max_frame: (max_frame.max(proto::MIN_FRAME as u16 + 8)).min(self.cfg.max_frame)
                as usize,
            timeout: session_timeout(ping_interval_s, self.cfg.default_timeout),
            rate: self.cfg.rate,
            burst: self.cfg.burst,
        };
        // Sealed whenever the device offers it; a device that must be
        // sealed and does not offer it gets no welcome.
        let offered = features & FEATURE_SEAL != 0;
        if !offered && self.bus.seal_required(name) {
            return Err((Reject::Unsealed, Some(name.into())));
        }
        let seal = offered.then(|| SealKeys::derive(&key, &client_nonce, &nonce));
        let session = Session::new(name.into(), key, nonce, peer.clone(), params, seal);
        peer.tx
            .send(&session.welcome(client_nonce, self.bus.node()));
        slot.pending = Some(session);
        Ok(())
    }

    /// The pending session at `addr` proved itself: it becomes the live
    /// one, replacing the address's old session and the device's session
    /// at any other address.
    fn promote(&self, st: &mut State, addr: &Arc<str>) {
        let slot = st.slots.get_mut(addr).expect("slot");
        let new = slot.pending.take().expect("pending");
        let old_here = slot.active.take();
        let device = new.device.clone();
        if let Some(old) = old_here {
            self.end(st, old, "replaced by a new session");
        }
        if let Some(other) = st.by_device.get(&device).cloned()
            && let Some(old) = st.slots.get_mut(&other).and_then(|s| s.active.take())
        {
            self.end(st, old, "the device moved");
        }
        tracing::info!(device = %device, transport = new.peer.transport, address = %new.peer.address, "device attached");
        self.bus.attach(&device);
        st.by_device.insert(device, addr.clone());
        st.slots.get_mut(addr).expect("slot").active = Some(new);
    }
}
