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

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::bindings::CallError;
use crate::router::Message;

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
    #[serde(borrow)]
    pub to: Cow<'a, str>,
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(borrow, with = "cow_bytes")]
    pub payload: Cow<'a, [u8]>,
    pub timestamp_ms: u64,
    /// The device of the sending node it came from, or empty.
    #[serde(borrow)]
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

    /// The message as the router carries it, from the peer `from`; its
    /// payload is copied out of the read buffer (one allocation, and no
    /// message a script holds on to keeps the buffer alive).
    pub fn to_message(&self, from: &str) -> Message {
        Message {
            id: self.id,
            from: if self.via.is_empty() {
                from.into()
            } else {
                smol_str::format_smolstr!("{from}/{}", self.via)
            },
            to: self.to.as_ref().into(),
            name: self.name.as_ref().into(),
            payload: Bytes::copy_from_slice(&self.payload),
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
    Event(#[serde(borrow)] WireMessage<'a>),
    /// A command for this node (sent to it by name or to `*`).
    Command(#[serde(borrow)] WireMessage<'a>),
    /// A call; answer with a `Reply` carrying the same `call` id.
    Call {
        call: u64,
        timeout_ms: u32,
        #[serde(borrow)]
        msg: WireMessage<'a>,
    },
    Reply {
        call: u64,
        #[serde(borrow, with = "reply_bytes")]
        result: Result<Cow<'a, [u8]>, WireCallError>,
    },
    /// The sender's live peers.
    Peers(Vec<PeerAddr>),
    /// A sync message of a replicated document (see [`DocId`]).
    Sync {
        doc: DocId,
        #[serde(borrow, with = "cow_bytes")]
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

/// Bytes written as one blob (not a sequence of numbers), read back
/// borrowed from the read buffer.
mod cow_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(b).serialize(s)
    }

    pub fn deserialize<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Cow<'a, [u8]>, D::Error> {
        Ok(Cow::Borrowed(<&serde_bytes::Bytes>::deserialize(d)?))
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
    enum In<'b> {
        Ok(#[serde(borrow)] &'b serde_bytes::Bytes),
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

    pub fn deserialize<'de: 'a, 'a, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Cow<'a, [u8]>, WireCallError>, D::Error> {
        Ok(match In::deserialize(d)? {
            In::Ok(b) => Ok(Cow::Borrowed(b)),
            In::Err(e) => Err(e),
        })
    }
}

impl Frame<'_> {
    /// Length prefix (u32, little endian) + postcard body.
    ///
    /// Serialized straight into a buffer sized for it (one allocation per
    /// frame: growing a vector from empty, then copying it behind the
    /// prefix, was a tenth of a node's CPU when it sent events at full
    /// rate).
    pub fn encode(&self) -> Bytes {
        let mut buf = Vec::new();
        self.encode_into(&mut buf);
        Bytes::from(buf)
    }

    /// [`Frame::encode`] into `buf` (cleared first), reusing its memory.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.clear();
        buf.reserve(4 + self.size_hint());
        buf.extend_from_slice(&[0; 4]);
        let taken = std::mem::take(buf);
        *buf = postcard::to_extend(self, taken).expect("frames always serialize");
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
    }

    /// About the size of the postcard body: a message's variable parts
    /// plus room for its integers and length prefixes.
    fn size_hint(&self) -> usize {
        match self {
            Frame::Event(m) | Frame::Command(m) | Frame::Call { msg: m, .. } => {
                m.to.len() + m.name.len() + m.payload.len() + m.via.len() + 40
            }
            Frame::Reply { result: Ok(r), .. } => r.len() + 16,
            Frame::Sync { msg, .. } => msg.len() + 16,
            Frame::Hello(_) | Frame::Peers(_) | Frame::Reply { .. } => 64,
        }
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
///
/// It reads whatever has arrived (up to [`READ_CHUNK`] at a time) and
/// decodes every whole frame in it before it waits again: at event rates
/// a read brings hundreds of frames, and reading each frame's prefix and
/// body with separate awaits cost more than decoding it. It may read past
/// the frame it returns, so one reader serves a stream for its whole life
/// (the hello, then everything after).
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Where the undecoded bytes in `buf` start.
    pos: usize,
    max: usize,
}

/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_payload: usize) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            max: max_payload.max(MAX_SYNC_FRAME) + FRAME_OVERHEAD,
        }
    }

    /// The next frame, borrowing its strings and bytes from the read
    /// buffer until the next call; `Closed` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Frame<'_>, FrameError> {
        loop {
            if let Some(body) = self.whole()? {
                return Ok(postcard::from_bytes(&self.buf[body])?);
            }
            self.fill().await?;
        }
    }

    /// Whether the next frame is already in the buffer, whole (or its
    /// length is refused): `next` then returns without reading.
    pub fn has_frame(&self) -> bool {
        self.next_len()
            .is_some_and(|len| len > self.max || self.buf.len() - self.pos >= 4 + len)
    }

    /// The next frame's length, once its prefix has arrived.
    fn next_len(&self) -> Option<usize> {
        let prefix = self.buf[self.pos..].first_chunk::<4>()?;
        Some(u32::from_le_bytes(*prefix) as usize)
    }

    /// Where the body of the next frame lies in the buffer, if all of it
    /// has arrived (and the frame is then counted as read).
    fn whole(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        let Some(len) = self.next_len() else {
            return Ok(None);
        };
        if len > self.max {
            return Err(FrameError::TooLarge(len, self.max));
        }
        if self.buf.len() - self.pos < 4 + len {
            return Ok(None);
        }
        let body = self.pos + 4..self.pos + 4 + len;
        self.pos = body.end;
        Ok(Some(body))
    }

    /// Read more of the stream into the buffer, after what is undecoded.
    async fn fill(&mut self) -> Result<(), FrameError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
            // A rare large frame (a sync after a partition) does not keep
            // its buffer for the life of the link.
            if self.buf.capacity() > KEEP_BUFFER && self.buf.len() < KEEP_BUFFER / 2 {
                self.buf.shrink_to(READ_CHUNK.max(self.buf.len()));
            }
        }
        // The length is the peer's word: memory grows with the bytes that
        // actually arrive, not with what the prefix promises.
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 16 {
            self.buf.reserve(READ_CHUNK);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = (&mut self.inner)
            .take(spare as u64)
            .read_buf(&mut self.buf)
            .await?;
        if n > 0 {
            return Ok(());
        }
        Err(if self.buf.is_empty() {
            FrameError::Closed
        } else {
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
        })
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
            payload: Bytes::from_static(b"21.5"),
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
        assert_eq!(w.to_message("a"), msg);
        let via = WireMessage {
            via: "esp".into(),
            ..w.clone()
        };
        assert_eq!(via.to_message("a").from, "a/esp");
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

    /// A stream that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_split_across_reads_or_packed_into_one_all_decode_in_order() {
        let msgs: Vec<Message> = (0..300)
            .map(|i| Message {
                id: i,
                from: "a".into(),
                to: "*".into(),
                name: format!("e{i}").into(),
                payload: vec![i as u8; (i as usize * 37) % 700].into(),
                timestamp_ms: i,
            })
            .collect();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&Frame::Event(WireMessage::borrow(m)).encode());
        }
        // A large frame between small ones, bigger than one read.
        let big = Frame::Sync {
            doc: DocId::Kv,
            msg: Cow::Owned(vec![5u8; 3 * READ_CHUNK + 11]),
        };
        wire.extend_from_slice(&big.encode());
        for step in [1, 7, 4096, usize::MAX] {
            let mut r = FrameReader::new(Trickle { data: &wire, step }, 1024);
            for m in &msgs {
                assert_eq!(
                    r.next().await.unwrap(),
                    Frame::Event(WireMessage::borrow(m))
                );
            }
            assert_eq!(r.next().await.unwrap(), big, "step {step}");
            assert!(matches!(r.next().await, Err(FrameError::Closed)));
        }
        // Cut inside a frame: an error, not a clean close.
        let cut = &wire[..wire.len() - 3];
        let mut r = FrameReader::new(
            Trickle {
                data: cut,
                step: 4096,
            },
            1024,
        );
        for _ in &msgs {
            r.next().await.unwrap();
        }
        assert!(matches!(r.next().await, Err(FrameError::Io(_))));
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
        assert!(r.buf.capacity() <= READ_CHUNK, "{}", r.buf.capacity());
    }
}
