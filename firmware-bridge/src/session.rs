//! One device's session with this bridge: its key and nonce, the replay
//! window, its rate, its subscriptions and the calls waiting for it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::borrow::Cow;

use ring::hmac;

use crate::seal::{FEATURE_SEAL, SealKeys};
use tokio::sync::oneshot;

use crate::proto::{self, Body, Dir, KEY_LEN, NONCE_LEN};
use crate::{DeviceError, Transmit};

/// Where a device talks from: the transport and its address there.
#[derive(Clone)]
pub struct Peer {
    /// `udp` or `serial` (or a test transport).
    pub transport: &'static str,
    /// `IP:port` or the serial device path; one session per address.
    pub address: Arc<str>,
    pub tx: Arc<dyn Transmit>,
}

/// Sequence numbers a device already used in this session: the highest
/// and a bitmap of the 64 below it (as IPsec's anti-replay window).
#[derive(Default)]
pub struct ReplayWindow {
    highest: u32,
    seen: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SeqCheck {
    Fresh,
    /// Seen already (a retry whose ack was lost).
    Duplicate,
    /// Below the window, or zero: refused.
    TooOld,
}

impl ReplayWindow {
    pub fn check(&self, seq: u32) -> SeqCheck {
        if seq == 0 {
            return SeqCheck::TooOld;
        }
        if seq > self.highest {
            return SeqCheck::Fresh;
        }
        let back = self.highest - seq;
        if back >= 64 {
            SeqCheck::TooOld
        } else if self.seen & (1 << back) != 0 {
            SeqCheck::Duplicate
        } else {
            SeqCheck::Fresh
        }
    }

    pub fn mark(&mut self, seq: u32) {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest = seq;
        } else {
            self.seen |= 1 << (self.highest - seq);
        }
    }
}

/// Frames a device may send: `rate` per second, bursts of `burst`.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: rate as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: Instant::now(),
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub type CallReply = oneshot::Sender<Result<Vec<u8>, DeviceError>>;

pub struct Session {
    pub device: Arc<str>,
    pub key_bytes: [u8; KEY_LEN],
    key: hmac::Key,
    pub nonce: [u8; NONCE_LEN],
    pub peer: Peer,
    pub max_frame: usize,
    pub timeout: Duration,
    pub since_ms: u64,
    pub created: Instant,
    pub last_seen: Instant,
    pub window: ReplayWindow,
    /// Sealed session: the keys (none: tagged frames in clear).
    seal: Option<SealKeys>,
    out_seq: u32,
    pub bucket: TokenBucket,
    /// `(from, name)` → the router's subscription id.
    pub subs: HashMap<(String, String), u64>,
    pub calls: HashMap<u32, CallReply>,
    next_call: u32,
}

pub struct SessionParams {
    pub max_frame: usize,
    pub timeout: Duration,
    pub rate: u32,
    pub burst: u32,
}

impl Session {
    pub fn new(
        device: Arc<str>,
        key_bytes: [u8; KEY_LEN],
        nonce: [u8; NONCE_LEN],
        peer: Peer,
        p: SessionParams,
        seal: Option<SealKeys>,
    ) -> Self {
        let now = Instant::now();
        Session {
            seal,
            device,
            key: proto::key(&key_bytes),
            key_bytes,
            nonce,
            peer,
            max_frame: p.max_frame,
            timeout: p.timeout,
            since_ms: crate::now_ms(),
            created: now,
            last_seen: now,
            window: ReplayWindow::default(),
            out_seq: 0,
            bucket: TokenBucket::new(p.rate, p.burst),
            subs: HashMap::new(),
            calls: HashMap::new(),
            next_call: 1,
        }
    }

    /// `frame` as this session authenticates it: as it is (tagged), or
    /// opened (sealed); none if it does not authenticate.
    pub fn open<'f>(&self, frame: &'f [u8]) -> Option<Cow<'f, [u8]>> {
        match &self.seal {
            Some(keys) => keys.open(Dir::DeviceToBridge, frame).map(Cow::Owned),
            None => proto::verify(&self.key, Dir::DeviceToBridge, &self.nonce, frame)
                .then_some(Cow::Borrowed(frame)),
        }
    }

    /// Are this session's frames sealed?
    pub fn sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// Encode a frame for the device, or none if it would not fit the
    /// device's frame size.
    pub fn encode(&mut self, body: &Body<'_>) -> Option<Vec<u8>> {
        self.out_seq = self.out_seq.wrapping_add(1).max(1);
        let mut f = proto::encode(
            &self.key,
            Dir::BridgeToDevice,
            &self.nonce,
            0,
            self.out_seq,
            body,
        );
        if let Some(keys) = &self.seal {
            // The HMAC tag's place takes the Poly1305 tag.
            keys.seal(Dir::BridgeToDevice, &mut f);
        }
        (f.len() <= self.max_frame).then_some(f)
    }

    /// The welcome that opens this session (sequence number 0).
    pub fn welcome(&self, client_nonce: [u8; NONCE_LEN], node: &str) -> Vec<u8> {
        proto::encode(
            &self.key,
            Dir::BridgeToDevice,
            &self.nonce,
            0,
            0,
            &Body::Welcome {
                client_nonce,
                session_nonce: self.nonce,
                max_frame: self.max_frame as u16,
                session_timeout_s: self.timeout.as_secs().min(u16::MAX as u64) as u16,
                node,
                features: if self.sealed() { FEATURE_SEAL } else { 0 },
            },
        )
    }

    pub fn next_call_id(&mut self) -> u32 {
        let id = self.next_call;
        self.next_call = self.next_call.wrapping_add(1).max(1);
        id
    }

    /// Fail every call still waiting: the device left.
    pub fn fail_calls(&mut self, why: &str) {
        for (_, tx) in self.calls.drain() {
            let _ = tx.send(Err(DeviceError::Gone(why.to_string())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_reordering_refuses_repeats_and_old() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(0), SeqCheck::TooOld);
        for s in [1, 3, 2, 10, 5] {
            assert_eq!(w.check(s), SeqCheck::Fresh, "{s}");
            w.mark(s);
        }
        for s in [1, 2, 3, 5, 10] {
            assert_eq!(w.check(s), SeqCheck::Duplicate, "{s}");
        }
        assert_eq!(w.check(4), SeqCheck::Fresh);
        w.mark(200);
        assert_eq!(w.check(136), SeqCheck::TooOld);
        assert_eq!(w.check(137), SeqCheck::Fresh);
        assert_eq!(w.check(200), SeqCheck::Duplicate);
        w.mark(u32::MAX);
        assert_eq!(w.check(u32::MAX), SeqCheck::Duplicate);
        assert_eq!(w.check(200), SeqCheck::TooOld);
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let mut b = TokenBucket::new(10, 5);
        let t0 = Instant::now();
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| b.take(t1)).count(), 5);
    }
}
