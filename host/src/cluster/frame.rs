//! What travels on a link: length-prefixed postcard frames.
//!
//! Each side of a link opens one unidirectional QUIC stream and writes all
//! its frames there, in order: that stream is what makes delivery ordered
//! per sender→receiver pair, and one stream per direction means one
//! encryption and one syscall per batch, not per message (see
//! `docs/benchmarks.md` for the measurement behind this choice).
//!
//! The first frame is always a [`Hello`]. Versioning: the ALPN protocol
//! (`covey/1`) fails a handshake between incompatible major versions, and
//! `Hello::proto` is checked as well; new frame kinds are only ever added
//! at the end of [`Frame`], so an older node reports an unknown frame
//! clearly instead of misreading it.

use std::borrow::Cow;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::bindings::{CallError, Message};

/// Wire protocol version, sent in the hello.
/// 2: messages carry the device they came from (`via`).
/// 3: key-value sync messages carry their history's epoch; whole-document
///    requests.
pub const PROTOCOL: u32 = 3;

/// Bytes of framing allowed on top of the payload limit (names, ids).
pub const FRAME_OVERHEAD: usize = 64 * 1024;
/// Largest document sync message. Automerge sends everything a peer lacks
/// in one message, so after a partition it can hold many values of up to
/// the value limit each; messages are limited on send by the payload
/// limit, this bound only stops a runaway frame.
pub const MAX_SYNC_FRAME: usize = 256 << 20;

/// Read buffer kept between frames.
const KEEP_BUFFER: usize = 1 << 20;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto: u32,
    /// Cluster fingerprint (both sides already proved membership in TLS;
    /// this catches a token mix-up with a readable error).
    pub cluster: String,
    pub node: String,
    /// Random per process start: tells a restarted peer from a second
    /// connection of the same process.
    pub incarnation: u64,
    /// The UDP port this node accepts links on.
    pub listen_port: u16,
    /// `covey` version, shown in `covey status`.
    pub version: String,
}

/// A message on the wire; the sender is the link's peer (a node can only
/// send as itself, or as one of its devices: `via`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireMessage<'a> {
    pub id: u64,
    pub to: Cow<'a, str>,
    pub name: Cow<'a, str>,
    #[serde(with = "cow_bytes")]
    pub payload: Cow<'a, [u8]>,
    pub timestamp_ms: u64,
    /// The device of the sending node it came from, or empty.
    pub via: Cow<'a, str>,
}

impl<'a> WireMessage<'a> {
    /// `msg` from this node (`from` is `NODE` or `NODE/DEVICE`).
    pub fn borrow(msg: &'a Message) -> Self {
        let via = crate::router::split_target(&msg.from).1.unwrap_or("");
        WireMessage {
            via: Cow::Borrowed(via),
            id: msg.id,
            to: Cow::Borrowed(&msg.to),
            name: Cow::Borrowed(&msg.name),
            payload: Cow::Borrowed(&msg.payload),
            timestamp_ms: msg.timestamp_ms,
        }
    }

    /// Is `via` empty or a device name? Checked before `into_message`.
    pub fn via_ok(&self) -> bool {
        self.via.is_empty() || covey_firmware_bridge::proto::valid_device_name(&self.via)
    }

    pub fn into_message(self, from: &str) -> Message {
        Message {
            id: self.id,
            from: if self.via.is_empty() {
                from.to_string()
            } else {
                format!("{from}/{}", self.via)
            },
            to: self.to.into_owned(),
            name: self.name.into_owned(),
            payload: self.payload.into_owned(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// `call-error` on the wire (kept separate from the WIT type so the wire
/// format does not change when the WIT does).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireCallError {
    NoHandler(String),
    Timeout,
    UnknownNode(String),
    NodeDown(String),
    HandlerFailed(String),
    NoReply,
    PayloadTooLarge(u64),
    InvalidTarget(String),
}

impl From<CallError> for WireCallError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NoHandler(s) => WireCallError::NoHandler(s),
            CallError::Timeout => WireCallError::Timeout,
            CallError::UnknownNode(s) => WireCallError::UnknownNode(s),
            CallError::NodeDown(s) => WireCallError::NodeDown(s),
            CallError::HandlerFailed(s) => WireCallError::HandlerFailed(s),
            CallError::NoReply => WireCallError::NoReply,
            CallError::PayloadTooLarge(n) => WireCallError::PayloadTooLarge(n),
            CallError::InvalidTarget(s) => WireCallError::InvalidTarget(s),
        }
    }
}

impl From<WireCallError> for CallError {
    fn from(e: WireCallError) -> Self {
        match e {
            WireCallError::NoHandler(s) => CallError::NoHandler(s),
            WireCallError::Timeout => CallError::Timeout,
            WireCallError::UnknownNode(s) => CallError::UnknownNode(s),
            WireCallError::NodeDown(s) => CallError::NodeDown(s),
            WireCallError::HandlerFailed(s) => CallError::HandlerFailed(s),
            WireCallError::NoReply => CallError::NoReply,
            WireCallError::PayloadTooLarge(n) => CallError::PayloadTooLarge(n),
            WireCallError::InvalidTarget(s) => CallError::InvalidTarget(s),
        }
    }
}

/// A peer's address, as gossiped so one seed leads to the whole cluster.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    pub node: String,
    pub addr: SocketAddr,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    /// A broadcast event.
    Event(WireMessage<'a>),
    /// A command for this node (sent to it by name or to `*`).
    Command(WireMessage<'a>),
    /// A call; answer with a `Reply` carrying the same `call` id.
    Call {
        call: u64,
        timeout_ms: u32,
        msg: WireMessage<'a>,
    },
    Reply {
        call: u64,
        #[serde(with = "reply_bytes")]
        result: Result<Cow<'a, [u8]>, WireCallError>,
    },
    /// The sender's live peers.
    Peers(Vec<PeerAddr>),
    /// A sync message of a replicated document (see [`DocId`]).
    Sync {
        doc: DocId,
        #[serde(with = "cow_bytes")]
        msg: Cow<'a, [u8]>,
    },
}

/// Which replicated document a sync message is for.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocId {
    /// The key-value store.
    Kv,
    /// The scripts directory manifest.
    Scripts,
    /// The device registry (names and keys of microcontrollers).
    Devices,
}

impl DocId {
    /// One byte naming the document in a request.
    pub fn to_byte(self) -> u8 {
        match self {
            DocId::Kv => 0,
            DocId::Scripts => 1,
            DocId::Devices => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<DocId> {
        [DocId::Kv, DocId::Scripts, DocId::Devices]
            .into_iter()
            .find(|d| d.to_byte() == b)
    }
}

/// Bytes written as one blob (not a sequence of numbers), read back owned
/// so a decoded frame does not borrow the read buffer.
mod cow_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(b).serialize(s)
    }

    pub fn deserialize<'de, 'a, D: Deserializer<'de>>(d: D) -> Result<Cow<'a, [u8]>, D::Error> {
        Ok(Cow::Owned(serde_bytes::ByteBuf::deserialize(d)?.into_vec()))
    }
}

mod reply_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize)]
    enum Out<'b> {
        Ok(#[serde(with = "serde_bytes")] &'b [u8]),
        Err(&'b WireCallError),
    }

    #[derive(Deserialize)]
    enum In {
        Ok(#[serde(with = "serde_bytes")] Vec<u8>),
        Err(WireCallError),
    }

    pub fn serialize<S: Serializer>(
        r: &Result<Cow<'_, [u8]>, WireCallError>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match r {
            Ok(b) => Out::Ok(b).serialize(s),
            Err(e) => Out::Err(e).serialize(s),
        }
    }

    pub fn deserialize<'de, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Cow<'a, [u8]>, WireCallError>, D::Error> {
        Ok(match In::deserialize(d)? {
            In::Ok(b) => Ok(Cow::Owned(b)),
            In::Err(e) => Err(e),
        })
    }
}

impl Frame<'_> {
    /// Length prefix (u32, little endian) + postcard body.
    pub fn encode(&self) -> Bytes {
        let body = postcard::to_stdvec(self).expect("frames always serialize");
        let mut buf = BytesMut::with_capacity(4 + body.len());
        buf.put_u32_le(body.len() as u32);
        buf.put_slice(&body);
        buf.freeze()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("link closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("undecodable frame (a peer speaking another protocol version?): {0}")]
    Decode(#[from] postcard::Error),
    #[error("reading from link: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames off one stream into a reused buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_payload: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            max: max_payload.max(MAX_SYNC_FRAME) + FRAME_OVERHEAD,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next frame; `Closed` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Frame<'static>, FrameError> {
        let mut len = [0u8; 4];
        match self.inner.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(FrameError::Closed);
            }
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge(len, self.max));
        }
        // The length is the peer's word: memory grows with the bytes that
        // actually arrive, not with what the prefix promises.
        self.buf.clear();
        let got = (&mut self.inner)
            .take(len as u64)
            .read_to_end(&mut self.buf)
            .await?;
        if got < len {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let frame = postcard::from_bytes(&self.buf)?;
        // A rare large frame (a sync after a partition) does not keep its
        // buffer for the life of the link.
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let msg = Message {
            id: 7,
            from: "a".into(),
            to: "*".into(),
            name: "temp".into(),
            payload: b"21.5".to_vec(),
            timestamp_ms: 1,
        };
        let frames = vec![
            Frame::Event(WireMessage::borrow(&msg)),
            Frame::Reply {
                call: 3,
                result: Ok(Cow::Borrowed(b"pong")),
            },
            Frame::Reply {
                call: 4,
                result: Err(WireCallError::NoHandler("x".into())),
            },
            Frame::Peers(vec![PeerAddr {
                node: "b".into(),
                addr: "[::1]:7000".parse().unwrap(),
            }]),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&f.encode());
        }
        let mut r = FrameReader::new(&wire[..], 1024);
        for f in &frames {
            assert_eq!(&r.next().await.unwrap(), f);
        }
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
        let Frame::Event(w) = &frames[0] else {
            unreachable!()
        };
        assert_eq!(w.clone().into_message("a"), msg);
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors() {
        let mut wire = Vec::new();
        let over = (MAX_SYNC_FRAME + FRAME_OVERHEAD + 1) as u32;
        wire.extend_from_slice(&over.to_le_bytes());
        let mut r = FrameReader::new(&wire[..], 10);
        assert!(matches!(r.next().await, Err(FrameError::TooLarge(..))));
        let mut wire = Vec::new();
        wire.extend_from_slice(&3u32.to_le_bytes());
        wire.extend_from_slice(&[200, 200, 200]);
        let mut r = FrameReader::new(&wire[..], 10);
        assert!(matches!(r.next().await, Err(FrameError::Decode(_))));
    }

    #[tokio::test]
    async fn a_length_prefix_alone_allocates_nothing_like_it() {
        // A peer announces a frame just under the limit, sends 1 KiB of it
        // and stops: an error, and the buffer never grew towards the
        // announced size.
        let mut wire = Vec::new();
        wire.extend_from_slice(&(MAX_SYNC_FRAME as u32).to_le_bytes());
        wire.extend_from_slice(&[0u8; 1024]);
        let mut r = FrameReader::new(&wire[..], 10);
        assert!(matches!(r.next().await, Err(FrameError::Io(_))));
        assert!(r.buf.capacity() < 64 * 1024, "{}", r.buf.capacity());
    }
}
