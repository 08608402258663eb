//! The device wire protocol, version 1 (`PROTOCOL.md` is the reference;
//! this module and `c/covey_device.c` implement it).
//!
//! A frame is `version | type | flags | seq (u32 BE) | body | tag[16]`; the
//! tag is the first 16 bytes of HMAC-SHA256 over `direction | session
//! nonce | everything before the tag`, keyed with the device key. Strings
//! are a length byte and UTF-8; a payload runs to the end of the body.

use ring::hmac;

pub const VERSION: u8 = 1;
/// Version, type, flags, sequence number.
pub const HEADER_LEN: usize = 7;
pub const TAG_LEN: usize = 16;
/// The smallest frame: a header and a tag.
pub const MIN_FRAME: usize = HEADER_LEN + TAG_LEN;
/// What every device can take: an ESP8266's comfortable buffer.
pub const DEFAULT_MAX_FRAME: u16 = 512;
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 8;

/// Flag bit: the sender wants an `Ack` (QoS 1).
pub const FLAG_ACK: u8 = 0x01;

/// Who sent a frame; part of the authenticated data, so a frame cannot be
/// reflected back to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    DeviceToBridge,
    BridgeToDevice,
}

impl Dir {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Dir::DeviceToBridge => b'D',
            Dir::BridgeToDevice => b'B',
        }
    }
}

/// `Ack` status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    Ok = 0,
    /// The body did not parse, or a name or pattern is invalid.
    BadFrame = 1,
    /// Over the negotiated frame size or the node's payload limit.
    TooLarge = 2,
    /// The device is over its rate; retry later.
    RateLimited = 3,
    /// Refused by the node (a cap reached, a reserved name).
    Refused = 4,
    /// The node could not route it (unknown or down target).
    Failed = 5,
}

impl AckStatus {
    pub fn from_byte(b: u8) -> Option<AckStatus> {
        Some(match b {
            0 => AckStatus::Ok,
            1 => AckStatus::BadFrame,
            2 => AckStatus::TooLarge,
            3 => AckStatus::RateLimited,
            4 => AckStatus::Refused,
            5 => AckStatus::Failed,
            _ => return None,
        })
    }
}

/// A decoded frame body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body<'a> {
    Hello {
        client_nonce: [u8; NONCE_LEN],
        max_frame: u16,
        ping_interval_s: u16,
        name: &'a str,
        /// What the device can do beyond version 1 ([`crate::seal`]).
        features: u8,
    },
    Welcome {
        client_nonce: [u8; NONCE_LEN],
        session_nonce: [u8; NONCE_LEN],
        max_frame: u16,
        session_timeout_s: u16,
        node: &'a str,
        /// What this session uses: the hello's features the bridge took.
        features: u8,
    },
    Subscribe {
        from: &'a str,
        name: &'a str,
    },
    Unsubscribe {
        from: &'a str,
        name: &'a str,
    },
    /// Device → bridge: `from` is empty (the bridge knows who sent it).
    Event {
        from: &'a str,
        name: &'a str,
        payload: &'a [u8],
    },
    /// Bridge → device: `peer` is the sender; device → bridge: the target.
    Command {
        peer: &'a str,
        name: &'a str,
        payload: &'a [u8],
    },
    Call {
        call_id: u32,
        from: &'a str,
        name: &'a str,
        payload: &'a [u8],
    },
    /// `ok` false: `payload` is the error text.
    Reply {
        call_id: u32,
        ok: bool,
        payload: &'a [u8],
    },
    Ack {
        seq: u32,
        status: u8,
    },
    Ping,
    Pong,
    /// The bridge has no session for this address: send a new hello.
    Reset {
        reason: u8,
    },
}

pub const T_HELLO: u8 = 0x01;
pub const T_WELCOME: u8 = 0x02;
pub const T_SUBSCRIBE: u8 = 0x03;
pub const T_UNSUBSCRIBE: u8 = 0x04;
pub const T_EVENT: u8 = 0x05;
pub const T_COMMAND: u8 = 0x06;
pub const T_CALL: u8 = 0x07;
pub const T_REPLY: u8 = 0x08;
pub const T_ACK: u8 = 0x09;
pub const T_PING: u8 = 0x0A;
pub const T_PONG: u8 = 0x0B;
pub const T_RESET: u8 = 0x0C;

/// `Reset` reasons.
pub const RESET_NO_SESSION: u8 = 1;
pub const RESET_REVOKED: u8 = 2;

/// Why a frame was not accepted: the reasons counted in `covey status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Reject {
    #[error("shorter than a header and a tag")]
    Truncated,
    #[error("larger than the negotiated frame size")]
    Oversized,
    #[error("unsupported protocol version")]
    Version,
    #[error("unknown frame type")]
    UnknownType,
    #[error("malformed body")]
    Malformed,
    #[error("authentication tag does not match")]
    BadTag,
    #[error("unknown device")]
    UnknownDevice,
    #[error("no session for this address")]
    NoSession,
    #[error("sequence number replayed or too old")]
    Replay,
    #[error("over the device's rate limit")]
    RateLimited,
    #[error("serial CRC mismatch")]
    Crc,
    #[error("serial framing (COBS) error")]
    Framing,
    #[error("frame type not valid in this direction")]
    WrongDirection,
    #[error("the device must seal its frames and its hello did not offer it")]
    Unsealed,
}

impl Reject {
    /// A short stable name for counters.
    pub fn name(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::Oversized => "oversized",
            Reject::Version => "version",
            Reject::UnknownType => "unknown-type",
            Reject::Malformed => "malformed",
            Reject::BadTag => "bad-tag",
            Reject::UnknownDevice => "unknown-device",
            Reject::NoSession => "no-session",
            Reject::Unsealed => "unsealed",
            Reject::Replay => "replay",
            Reject::RateLimited => "rate-limited",
            Reject::Crc => "crc",
            Reject::Framing => "framing",
            Reject::WrongDirection => "wrong-direction",
        }
    }
}

/// A frame's header, read before its tag is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    pub seq: u32,
}

/// Check the length and version and read the header. The body is not
/// trusted until [`verify`] accepts the tag.
pub fn header(frame: &[u8], max_frame: usize) -> Result<Header, Reject> {
    if frame.len() < MIN_FRAME {
        return Err(Reject::Truncated);
    }
    if frame.len() > max_frame {
        return Err(Reject::Oversized);
    }
    if frame[0] != VERSION {
        return Err(Reject::Version);
    }
    Ok(Header {
        kind: frame[1],
        flags: frame[2],
        seq: u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]),
    })
}

fn tag(key: &hmac::Key, dir: Dir, nonce: &[u8; NONCE_LEN], signed: &[u8]) -> [u8; TAG_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&[dir.byte()]);
    ctx.update(nonce);
    ctx.update(signed);
    let full = ctx.sign();
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&full.as_ref()[..TAG_LEN]);
    out
}

/// A device key ready for tagging.
pub fn key(bytes: &[u8; KEY_LEN]) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, bytes)
}

/// Does the frame's tag match (constant time)?
pub fn verify(key: &hmac::Key, dir: Dir, nonce: &[u8; NONCE_LEN], frame: &[u8]) -> bool {
    if frame.len() < MIN_FRAME {
        return false;
    }
    let (signed, got) = frame.split_at(frame.len() - TAG_LEN);
    let want = tag(key, dir, nonce, signed);
    // Constant time: no early exit on the first differing byte.
    want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Decode the body of a frame whose tag was verified.
pub fn body(frame: &[u8]) -> Result<Body<'_>, Reject> {
    let kind = frame[1];
    let mut r = Reader(&frame[HEADER_LEN..frame.len() - TAG_LEN]);
    let body = match kind {
        T_HELLO => Body::Hello {
            client_nonce: r.nonce()?,
            max_frame: r.u16()?,
            ping_interval_s: r.u16()?,
            name: r.str8()?,
            features: r.features()?,
        },
        T_WELCOME => Body::Welcome {
            client_nonce: r.nonce()?,
            session_nonce: r.nonce()?,
            max_frame: r.u16()?,
            session_timeout_s: r.u16()?,
            node: r.str8()?,
            features: r.features()?,
        },
        T_SUBSCRIBE => Body::Subscribe {
            from: r.str8()?,
            name: r.str8()?,
        },
        T_UNSUBSCRIBE => Body::Unsubscribe {
            from: r.str8()?,
            name: r.str8()?,
        },
        T_EVENT => Body::Event {
            from: r.str8()?,
            name: r.str8()?,
            payload: r.rest(),
        },
        T_COMMAND => Body::Command {
            peer: r.str8()?,
            name: r.str8()?,
            payload: r.rest(),
        },
        T_CALL => Body::Call {
            call_id: r.u32()?,
            from: r.str8()?,
            name: r.str8()?,
            payload: r.rest(),
        },
        T_REPLY => Body::Reply {
            call_id: r.u32()?,
            ok: match r.u8()? {
                0 => true,
                1 => false,
                _ => return Err(Reject::Malformed),
            },
            payload: r.rest(),
        },
        T_ACK => Body::Ack {
            seq: r.u32()?,
            status: r.u8()?,
        },
        T_PING => Body::Ping,
        T_PONG => Body::Pong,
        T_RESET => Body::Reset { reason: r.u8()? },
        _ => return Err(Reject::UnknownType),
    };
    // Fixed-size bodies must not carry trailing bytes.
    if !r.0.is_empty() {
        return Err(Reject::Malformed);
    }
    Ok(body)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Reject> {
        if self.0.len() < n {
            return Err(Reject::Malformed);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Reject> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Reject> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Reject> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn nonce(&mut self) -> Result<[u8; NONCE_LEN], Reject> {
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(self.take(NONCE_LEN)?);
        Ok(n)
    }
    fn str8(&mut self) -> Result<&'a str, Reject> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| Reject::Malformed)
    }
    /// The features byte that ends a hello or welcome; absent (a version
    /// 1 device or bridge) reads as none.
    fn features(&mut self) -> Result<u8, Reject> {
        match self.0.is_empty() {
            true => Ok(0),
            false => self.u8(),
        }
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// Encode and tag a frame. Strings longer than 255 bytes are an error of
/// the caller (names are checked before they get here).
pub fn encode(
    key: &hmac::Key,
    dir: Dir,
    nonce: &[u8; NONCE_LEN],
    flags: u8,
    seq: u32,
    body: &Body<'_>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let kind = match body {
        Body::Hello { .. } => T_HELLO,
        Body::Welcome { .. } => T_WELCOME,
        Body::Subscribe { .. } => T_SUBSCRIBE,
        Body::Unsubscribe { .. } => T_UNSUBSCRIBE,
        Body::Event { .. } => T_EVENT,
        Body::Command { .. } => T_COMMAND,
        Body::Call { .. } => T_CALL,
        Body::Reply { .. } => T_REPLY,
        Body::Ack { .. } => T_ACK,
        Body::Ping => T_PING,
        Body::Pong => T_PONG,
        Body::Reset { .. } => T_RESET,
    };
    out.extend_from_slice(&[VERSION, kind, flags]);
    out.extend_from_slice(&seq.to_be_bytes());
    let str8 = |out: &mut Vec<u8>, s: &str| {
        let n = s.len().min(255);
        out.push(n as u8);
        out.extend_from_slice(&s.as_bytes()[..n]);
    };
    match body {
        Body::Hello {
            client_nonce,
            max_frame,
            ping_interval_s,
            name,
            features,
        } => {
            out.extend_from_slice(client_nonce);
            out.extend_from_slice(&max_frame.to_be_bytes());
            out.extend_from_slice(&ping_interval_s.to_be_bytes());
            str8(&mut out, name);
            if *features != 0 {
                out.push(*features);
            }
        }
        Body::Welcome {
            client_nonce,
            session_nonce,
            max_frame,
            session_timeout_s,
            node,
            features,
        } => {
            out.extend_from_slice(client_nonce);
            out.extend_from_slice(session_nonce);
            out.extend_from_slice(&max_frame.to_be_bytes());
            out.extend_from_slice(&session_timeout_s.to_be_bytes());
            str8(&mut out, node);
            if *features != 0 {
                out.push(*features);
            }
        }
        Body::Subscribe { from, name } | Body::Unsubscribe { from, name } => {
            str8(&mut out, from);
            str8(&mut out, name);
        }
        Body::Event {
            from,
            name,
            payload,
        }
        | Body::Command {
            peer: from,
            name,
            payload,
        } => {
            str8(&mut out, from);
            str8(&mut out, name);
            out.extend_from_slice(payload);
        }
        Body::Call {
            call_id,
            from,
            name,
            payload,
        } => {
            out.extend_from_slice(&call_id.to_be_bytes());
            str8(&mut out, from);
            str8(&mut out, name);
            out.extend_from_slice(payload);
        }
        Body::Reply {
            call_id,
            ok,
            payload,
        } => {
            out.extend_from_slice(&call_id.to_be_bytes());
            out.push(if *ok { 0 } else { 1 });
            out.extend_from_slice(payload);
        }
        Body::Ack { seq, status } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.push(*status);
        }
        Body::Ping | Body::Pong => {}
        Body::Reset { reason } => out.push(*reason),
    }
    let t = tag(key, dir, nonce, &out);
    out.extend_from_slice(&t);
    out
}

/// The bytes of a `Reset`: sent when the bridge has no session (and so no
/// nonce) for an address. Its tag is zero: a device treats a reset only as
/// a hint to send a new hello, never as proof of anything.
pub fn reset_frame(reason: u8) -> Vec<u8> {
    let mut out = vec![VERSION, T_RESET, 0, 0, 0, 0, 0, reason];
    out.extend_from_slice(&[0u8; TAG_LEN]);
    out
}

/// Device names follow the node-name rule: 1–63 ASCII letters, digits,
/// `-`, `_` or `.`, not starting with `.`.
pub fn valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 63
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}
