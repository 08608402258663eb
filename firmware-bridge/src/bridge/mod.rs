//! `Bridge`: device sessions by address, the handshake, and dispatch
//! between devices and the [`Bus`].
//!
//! A hello opens a *pending* session at the address it came from; it
//! replaces the address's live session (and any session of the same
//! device elsewhere: the device moved) only when the first frame tagged
//! with the new nonce arrives. So a replayed hello costs one welcome and
//! disturbs nothing. Frames without a session get a `Reset`, which makes
//! the device say hello again: how a restarted bridge (or a device that
//! reset and lost its session) recovers without anyone's help.
//!
//! Locking: one mutex over the sessions. Bus calls that may come back into
//! the bridge (an event or command from a device can reach another device
//! on this node) are made after it is released.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::proto::{self, AckStatus, Body, Reject};
use crate::session::{Peer, Session};
use crate::{BridgeStatus, Bus, BusError, DeviceError, DeviceStatus};

mod receive;

#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// The largest frame this bridge takes or sends; a session uses the
    /// smaller of this and the device's.
    pub max_frame: u16,
    /// Frames per second one device may send, and its burst.
    pub rate: u32,
    pub burst: u32,
    /// Subscriptions one device may hold.
    pub max_subscriptions: usize,
    /// A device that announces no ping interval is expired after this.
    pub default_timeout: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            max_frame: 4096,
            rate: 10_000,
            burst: 1_000,
            max_subscriptions: 64,
            default_timeout: Duration::from_secs(60),
        }
    }
}

/// A session's timeout: three ping intervals, within sane bounds.
fn session_timeout(ping_interval_s: u16, default: Duration) -> Duration {
    if ping_interval_s == 0 {
        return default;
    }
    Duration::from_secs(3 * ping_interval_s as u64)
        .clamp(Duration::from_secs(3), Duration::from_secs(3600))
}

/// How long a pending session waits for its first frame.
const PENDING_TTL: Duration = Duration::from_secs(10);
/// Hellos from one address closer than this are dropped.
const HELLO_GAP: Duration = Duration::from_millis(20);
/// Resets to one address closer than this are not sent.
const RESET_GAP: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Slot {
    active: Option<Session>,
    pending: Option<Session>,
    last_hello: Option<Instant>,
}

#[derive(Default)]
struct DevStats {
    frames_in: u64,
    frames_out: u64,
    errors: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct State {
    /// By address.
    slots: HashMap<Arc<str>, Slot>,
    /// Device → the address of its live session.
    by_device: HashMap<Arc<str>, Arc<str>>,
    stats: HashMap<Arc<str>, DevStats>,
    /// Refusals no session can be charged with.
    errors: BTreeMap<&'static str, u64>,
    resets: HashMap<Arc<str>, Instant>,
}

/// Work left for after the lock is released.
enum After {
    Emit {
        name: String,
        payload: Vec<u8>,
    },
    Command {
        target: String,
        name: String,
        payload: Vec<u8>,
    },
}

/// The bridge (clones share it).
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

/// A bridge reference that does not keep it alive: for the bus side,
/// which the bridge itself holds.
#[derive(Clone)]
pub struct WeakBridge(std::sync::Weak<Inner>);

impl WeakBridge {
    pub fn upgrade(&self) -> Option<Bridge> {
        self.0.upgrade().map(|inner| Bridge { inner })
    }
}

struct Inner {
    cfg: BridgeConfig,
    bus: Arc<dyn Bus>,
    state: Mutex<State>,
    rng: SystemRandom,
}

impl Bridge {
    pub fn new(cfg: BridgeConfig, bus: Arc<dyn Bus>) -> Self {
        Bridge {
            inner: Arc::new(Inner {
                cfg,
                bus,
                state: Mutex::new(State::default()),
                rng: SystemRandom::new(),
            }),
        }
    }

    pub fn downgrade(&self) -> WeakBridge {
        WeakBridge(Arc::downgrade(&self.inner))
    }

    pub fn config(&self) -> &BridgeConfig {
        &self.inner.cfg
    }

    /// A frame from a transport.
    pub fn receive(&self, peer: &Peer, frame: &[u8]) {
        let inner = &self.inner;
        let (after, device, ack) = {
            let mut st = inner.state.lock().unwrap();
            match inner.receive_locked(&mut st, peer, frame) {
                Ok(Some(work)) => work,
                Ok(None) => return,
                Err((reject, device)) => {
                    inner.count(&mut st, device.as_deref(), reject);
                    return;
                }
            }
        };
        let result = match after {
            After::Emit { name, payload } => inner.bus.emit(&device, &name, payload),
            After::Command {
                target,
                name,
                payload,
            } => inner.bus.command(&device, &target, &name, payload),
        };
        if let Err(e) = &result {
            tracing::debug!(device = %device, "device message refused: {e}");
        }
        if let Some(seq) = ack {
            let status = match result {
                Ok(()) => AckStatus::Ok,
                Err(BusError::TooLarge(_)) => AckStatus::TooLarge,
                Err(BusError::Refused(_)) => AckStatus::Refused,
                Err(BusError::Failed(_)) => AckStatus::Failed,
            };
            let mut st = inner.state.lock().unwrap();
            inner.ack(&mut st, &device, Some(seq), status);
        }
    }

    /// A command for one of this node's devices, from `from`.
    pub fn command(
        &self,
        device: &str,
        from: &str,
        name: &str,
        payload: &[u8],
    ) -> Result<(), DeviceError> {
        let mut st = self.inner.state.lock().unwrap();
        let body = Body::Command {
            peer: from,
            name,
            payload,
        };
        self.inner.send_checked(&mut st, device, &body)
    }

    /// An event a device subscribed to.
    pub fn event(&self, device: &str, from: &str, name: &str, payload: &[u8]) {
        let mut st = self.inner.state.lock().unwrap();
        let body = Body::Event {
            from,
            name,
            payload,
        };
        if let Err(DeviceError::TooLarge(_)) = self.inner.send_checked(&mut st, device, &body) {
            self.inner.count(&mut st, Some(device), Reject::Oversized);
        }
    }

    /// A call to a device; the device's reply, or why there is none.
    pub async fn call(
        &self,
        device: &str,
        from: &str,
        name: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, DeviceError> {
        let (tx, rx) = oneshot::channel();
        let call_id = {
            let mut st = self.inner.state.lock().unwrap();
            let session = self.inner.live(&mut st, device)?;
            let call_id = session.next_call_id();
            session.calls.insert(call_id, tx);
            let body = Body::Call {
                call_id,
                from,
                name,
                payload,
            };
            if let Err(e) = self.inner.send_checked(&mut st, device, &body) {
                if let Ok(s) = self.inner.live(&mut st, device) {
                    s.calls.remove(&call_id);
                }
                return Err(e);
            }
            call_id
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DeviceError::Gone("session ended".into())),
            Err(_) => {
                let mut st = self.inner.state.lock().unwrap();
                if let Ok(s) = self.inner.live(&mut st, device) {
                    s.calls.remove(&call_id);
                }
                Err(DeviceError::Timeout)
            }
        }
    }

    /// End sessions whose device was removed or got a new key.
    pub fn refresh_keys(&self) {
        let inner = &self.inner;
        let mut st = inner.state.lock().unwrap();
        let stale: Vec<(Arc<str>, bool)> = st
            .slots
            .iter()
            .flat_map(|(addr, slot)| {
                let check = |s: &Option<Session>, active: bool| {
                    s.as_ref()
                        .filter(|s| inner.bus.key(&s.device) != Some(s.key_bytes))
                        .map(|_| (addr.clone(), active))
                };
                [check(&slot.active, true), check(&slot.pending, false)]
            })
            .flatten()
            .collect();
        for (addr, active) in stale {
            let Some(slot) = st.slots.get_mut(&addr) else {
                continue;
            };
            if !active {
                slot.pending = None;
                continue;
            }
            if let Some(s) = slot.active.take() {
                tracing::info!(device = %s.device, "device removed or re-keyed: session ended");
                s.peer.tx.send(&proto::reset_frame(proto::RESET_REVOKED));
                inner.end(&mut st, s, "device removed");
            }
        }
    }

    /// Expire sessions whose device went quiet; pending ones never
    /// confirmed. Runs until aborted.
    pub fn spawn_sweeper(&self) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                me.sweep(Instant::now());
            }
        })
    }

    fn sweep(&self, now: Instant) {
        let inner = &self.inner;
        let mut st = inner.state.lock().unwrap();
        let mut expired = Vec::new();
        st.slots.retain(|_, slot| {
            if slot
                .pending
                .as_ref()
                .is_some_and(|p| now.duration_since(p.created) > PENDING_TTL)
            {
                slot.pending = None;
            }
            if slot
                .active
                .as_ref()
                .is_some_and(|s| now.duration_since(s.last_seen) > s.timeout)
            {
                expired.extend(slot.active.take());
            }
            slot.active.is_some() || slot.pending.is_some()
        });
        for s in expired {
            tracing::info!(device = %s.device, "device silent for {:?}: session expired", s.timeout);
            inner.end(&mut st, s, "session expired");
        }
        if st.resets.len() > 1024 {
            st.resets.retain(|_, t| now.duration_since(*t) < RESET_GAP);
        }
    }

    /// Every attached device and the refusal counters.
    pub fn status(&self) -> BridgeStatus {
        let st = self.inner.state.lock().unwrap();
        let now = Instant::now();
        let now_ms = crate::now_ms();
        let count =
            |m: &BTreeMap<&'static str, u64>| m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mut devices: Vec<DeviceStatus> = st
            .slots
            .values()
            .filter_map(|slot| slot.active.as_ref())
            .map(|s| {
                let stats = st.stats.get(&s.device);
                DeviceStatus {
                    name: s.device.to_string(),
                    transport: s.peer.transport.to_string(),
                    address: s.peer.address.to_string(),
                    since_ms: s.since_ms,
                    last_seen_ms: now_ms
                        .saturating_sub(now.duration_since(s.last_seen).as_millis() as u64),
                    frames_in: stats.map_or(0, |x| x.frames_in),
                    frames_out: stats.map_or(0, |x| x.frames_out),
                    subscriptions: s.subs.len(),
                    sealed: s.sealed(),
                    errors: stats.map(|x| count(&x.errors)).unwrap_or_default(),
                }
            })
            .collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        BridgeStatus {
            devices,
            errors: count(&st.errors),
        }
    }

    /// Bytes on a serial line that were not a frame.
    pub fn line_noise(&self, r: Reject) {
        let mut st = self.inner.state.lock().unwrap();
        self.inner.count(&mut st, None, r);
    }

    /// Is `device` attached here?
    pub fn attached(&self, device: &str) -> bool {
        self.inner
            .state
            .lock()
            .unwrap()
            .by_device
            .contains_key(device)
    }
}

impl Inner {
    /// A session ends: its subscriptions go, its waiting calls fail.
    fn end(&self, st: &mut State, mut s: Session, why: &str) {
        for (_, id) in s.subs.drain() {
            self.bus.unsubscribe(&s.device, id);
        }
        s.fail_calls(why);
        if st.by_device.get(&s.device) == Some(&s.peer.address) {
            st.by_device.remove(&s.device);
            self.bus.detach(&s.device);
            tracing::info!(device = %s.device, "device detached: {why}");
        }
    }

    fn reset(&self, st: &mut State, peer: &Peer) {
        let now = Instant::now();
        match st.resets.get(&peer.address) {
            Some(t) if now.duration_since(*t) < RESET_GAP => {}
            _ => {
                st.resets.insert(peer.address.clone(), now);
                peer.tx.send(&proto::reset_frame(proto::RESET_NO_SESSION));
            }
        }
    }

    fn live<'s>(&self, st: &'s mut State, device: &str) -> Result<&'s mut Session, DeviceError> {
        live_session(st, device).ok_or_else(|| DeviceError::NotAttached(device.to_string()))
    }

    /// Send to a device's live session, if the frame fits it.
    fn send_checked(
        &self,
        st: &mut State,
        device: &str,
        body: &Body<'_>,
    ) -> Result<(), DeviceError> {
        let session = self.live(st, device)?;
        let Some(frame) = session.encode(body) else {
            return Err(DeviceError::TooLarge(session.max_frame));
        };
        session.peer.tx.send(&frame);
        let device = session.device.clone();
        st.stats.entry(device).or_default().frames_out += 1;
        Ok(())
    }

    /// Acknowledge frame `seq` with `status`, if the device asked (QoS 1).
    fn ack(&self, st: &mut State, device: &str, seq: Option<u32>, status: AckStatus) {
        if let Some(seq) = seq {
            let status = status as u8;
            self.send_to(st, device, &Body::Ack { seq, status });
        }
    }

    fn send_to(&self, st: &mut State, device: &str, body: &Body<'_>) {
        let _ = self.send_checked(st, device, body);
    }

    /// Count a refusal (logged at powers of two: a flood cannot flood the
    /// log).
    fn count(&self, st: &mut State, device: Option<&str>, r: Reject) {
        let counter = match device {
            Some(d) => st
                .stats
                .entry(d.into())
                .or_default()
                .errors
                .entry(r.name())
                .or_default(),
            None => st.errors.entry(r.name()).or_default(),
        };
        *counter += 1;
        if counter.is_power_of_two() {
            tracing::warn!(
                device = device.unwrap_or("-"),
                total = *counter,
                "device frame refused: {r}"
            );
        }
    }
}

fn live_session<'s>(st: &'s mut State, device: &str) -> Option<&'s mut Session> {
    let addr = st.by_device.get(device)?;
    st.slots.get_mut(addr)?.active.as_mut()
}
