//! `PeerLink`: one QUIC connection to one peer, after the hello.
//!
//! Outbound frames go through a bounded queue (`outbox`) to a writer task
//! that writes what has gathered at once onto this side's stream; a reader
//! task takes the peer's frames to the router. A slow or stuck peer fills
//! its own queue and loses messages (counted in `dropped`), and never
//! blocks local delivery or the other links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::oneshot;

use super::frame::{DocId, Frame, FrameError, FrameReader, Hello, MAX_SYNC_FRAME, WireMessage};
use super::outbox::Outbox;
use crate::bindings::CallError;
use crate::router::Message;

/// QUIC application close codes (the reason text goes with them).
pub mod close {
    pub const SHUTDOWN: u32 = 0;
    /// A second connection between the same two processes (both dialled at
    /// once): closed quietly, the other one stays.
    pub const DUPLICATE_LINK: u32 = 1;
    pub const DUPLICATE_NAME: u32 = 2;
    pub const PROTOCOL: u32 = 3;
    pub const WRONG_CLUSTER: u32 = 4;
    pub const BAD_FRAME: u32 = 5;
}

pub use super::outbox::{QUEUE_BYTES, QUEUE_FRAMES};

type PendingCall = oneshot::Sender<Result<Vec<u8>, CallError>>;

#[derive(Default, Debug)]
pub struct LinkStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Frames dropped because this link's queue was full.
    pub dropped: AtomicU64,
}

pub struct PeerLink {
    pub node: Arc<str>,
    pub hello: Hello,
    pub conn: Connection,
    /// Where the peer accepts links (its address + its listen port).
    pub addr: SocketAddr,
    /// Whether this node dialled the connection.
    pub dialed: bool,
    outbox: Outbox,
    calls: Mutex<HashMap<u64, PendingCall>>,
    next_call: AtomicU64,
    closed: AtomicBool,
    pub stats: LinkStats,
}

/// The most events a link's reader hands over at once.
const EVENT_RUN: usize = 1024;

/// What the link's tasks hand inbound frames to.
pub trait Inbound: Send + Sync + 'static {
    /// A frame off `link`. An event is added to `events`, to be handed
    /// over with the others of the same read (by [`Inbound::events`]);
    /// any other frame hands over the events before it first, so order
    /// holds.
    fn frame(self: &Arc<Self>, link: &Arc<PeerLink>, frame: Frame<'_>, events: &mut Vec<Message>);
    /// Deliver `events` (a run off one link, in order), leaving it empty.
    fn events(&self, events: &mut Vec<Message>);
    fn link_closed(&self, link: &Arc<PeerLink>, why: String);
    /// A blob (script file contents) by hash, for a peer that asks.
    fn blob(&self, hash: &[u8; 32]) -> Option<Vec<u8>>;
    /// A replicated document whole, for a peer that has to start over.
    fn snapshot(&self, doc: DocId) -> Option<Vec<u8>>;
    /// Whether this node's copy of a document holds every change `heads`
    /// name (and their history).
    fn holds(&self, doc: DocId, heads: &[[u8; 32]]) -> bool;
}

/// Requests on their own bidirectional stream, by first byte.
const REQ_PROBE: u8 = 1;
const REQ_BLOB: u8 = 2;
const REQ_SNAPSHOT: u8 = 3;
const REQ_HOLDS: u8 = 4;
/// Most heads a holds request may name.
pub const MAX_HOLDS: usize = 64;
/// Largest blob a peer may send: a script file (the scripts sync limit).
pub const MAX_BLOB: usize = 32 << 20;

impl PeerLink {
    /// Wrap a connection whose hello exchange is done; the caller starts
    /// it with [`PeerLink::run`] once membership accepted it.
    pub fn new(hello: Hello, conn: Connection, dialed: bool) -> Arc<PeerLink> {
        // The peer's listening port at the address it came from, with its
        // interface if link-local (`SocketAddr::new` would drop that).
        let mut addr = conn.remote_address();
        addr.set_port(hello.listen_port);
        Arc::new(PeerLink {
            node: hello.node.as_str().into(),
            hello,
            conn,
            addr,
            dialed,
            outbox: Outbox::default(),
            calls: Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            stats: LinkStats::default(),
        })
    }

    /// Start the writer and reader tasks.
    pub fn run<I: Inbound>(
        self: &Arc<Self>,
        send: SendStream,
        reader: FrameReader<RecvStream>,
        inbound: Arc<I>,
    ) {
        tokio::spawn(self.clone().write_loop(send));
        tokio::spawn(self.clone().answer_requests(inbound.clone()));
        let link = self.clone();
        tokio::spawn(async move {
            let why = link.read_loop(reader, &inbound).await;
            link.fail_calls(&why);
            inbound.link_closed(&link, why);
        });
    }

    /// Queue an encoded frame; false (and counted) if the queue is full.
    /// A frame larger than the whole byte budget (a big sync message) is
    /// taken when the queue is empty, so it can always go eventually.
    pub fn offer(&self, frame: Bytes) -> bool {
        self.counted(self.outbox.push_bytes(frame))
    }

    /// [`PeerLink::offer`] of a frame encoded in the caller's buffer: a
    /// small one is copied into the queue, costing no allocation (an event
    /// broadcast to every link is encoded once).
    pub fn offer_slice(&self, frame: &[u8]) -> bool {
        self.counted(self.outbox.push(frame))
    }

    fn counted(&self, queued: bool) -> bool {
        if !queued {
            self.count_drop();
        }
        queued
    }

    fn count_drop(&self) {
        let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(peer = %self.node, dropped_total = n, "link queue full, message dropped");
        }
    }

    /// Send a call and wait for its reply (or the timeout, or the link
    /// going down).
    pub async fn call(&self, msg: &Message, timeout: Duration) -> Result<Vec<u8>, CallError> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.calls.lock().unwrap().insert(id, tx);
        // Registered before the closed check, so `fail_calls` cannot miss it.
        if self.closed.load(Ordering::Acquire) {
            self.calls.lock().unwrap().remove(&id);
            return Err(CallError::NodeDown(self.node.to_string()));
        }
        let frame = Frame::Call {
            call: id,
            timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
            msg: WireMessage::borrow(msg),
        };
        if !self.offer(frame.encode()) {
            self.calls.lock().unwrap().remove(&id);
            return Err(CallError::HandlerFailed(format!(
                "the queue to node `{}` is full",
                self.node
            )));
        }
        let result = tokio::time::timeout(timeout, rx).await;
        self.calls.lock().unwrap().remove(&id);
        match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(CallError::NodeDown(self.node.to_string())),
            Err(_) => Err(CallError::Timeout),
        }
    }

    /// A reply from the peer to one of our calls.
    pub fn complete_call(&self, id: u64, result: Result<Vec<u8>, CallError>) {
        if let Some(tx) = self.calls.lock().unwrap().remove(&id) {
            let _ = tx.send(result);
        }
    }

    fn fail_calls(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        let calls = std::mem::take(&mut *self.calls.lock().unwrap());
        for (_, tx) in calls {
            let _ = tx.send(Err(CallError::NodeDown(format!("{}: {why}", self.node))));
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.conn.close_reason().is_some()
    }

    pub fn close(&self, code: u32, reason: &str) {
        self.conn.close(code.into(), reason.as_bytes());
    }

    async fn write_loop(self: Arc<Self>, mut send: SendStream) {
        while let Some(mut batch) = self.outbox.take().await {
            if let Err(e) = send.write_all_chunks(&mut batch.chunks).await {
                tracing::debug!(peer = %self.node, "link write failed: {e}");
                break;
            }
            self.outbox.written(batch.bytes);
            (self.stats.sent).fetch_add(batch.frames as u64, Ordering::Relaxed);
        }
        self.outbox.close();
    }

    async fn read_loop<I: Inbound>(
        self: &Arc<Self>,
        mut reader: FrameReader<RecvStream>,
        inbound: &Arc<I>,
    ) -> String {
        let mut events = Vec::new();
        loop {
            // Events go on once the read they came in is decoded, before
            // the loop may wait for the next.
            if !events.is_empty() && (!reader.has_frame() || events.len() >= EVENT_RUN) {
                inbound.events(&mut events);
            }
            let next = reader.next().await;
            if next.is_err() {
                inbound.events(&mut events);
            }
            match next {
                Ok(frame) => {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    inbound.frame(self, frame, &mut events);
                }
                Err(FrameError::Closed) => return closed_reason(&self.conn),
                Err(FrameError::Io(e)) => {
                    return match self.conn.close_reason() {
                        Some(_) => closed_reason(&self.conn),
                        None => e.to_string(),
                    };
                }
                Err(e) => {
                    let why = e.to_string();
                    tracing::warn!(peer = %self.node, "closing link: {why}");
                    self.close(close::BAD_FRAME, &why);
                    return why;
                }
            }
        }
    }

    /// Answer requests made on their own streams: liveness probes (see
    /// [`probe`]) and blob fetches (see [`fetch_blob`]), which would
    /// otherwise hold up events behind a large file.
    async fn answer_requests<I: Inbound>(self: Arc<Self>, inbound: Arc<I>) {
        while let Ok((mut send, mut recv)) = self.conn.accept_bi().await {
            let inbound = inbound.clone();
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if recv.read_exact(&mut kind).await.is_err() {
                    return;
                }
                match kind[0] {
                    REQ_PROBE => {
                        let _ = send.write_all(&kind).await;
                    }
                    REQ_BLOB => {
                        let mut hash = [0u8; 32];
                        if recv.read_exact(&mut hash).await.is_err() {
                            return;
                        }
                        let blob = tokio::task::spawn_blocking(move || inbound.blob(&hash))
                            .await
                            .ok()
                            .flatten();
                        let _ = reply_optional(&mut send, blob).await;
                    }
                    REQ_HOLDS => {
                        let mut head = [0u8; 2];
                        if recv.read_exact(&mut head).await.is_err() {
                            return;
                        }
                        let (Some(doc), n) = (DocId::from_byte(head[0]), head[1] as usize) else {
                            return;
                        };
                        if n > MAX_HOLDS {
                            return;
                        }
                        let mut heads = vec![[0u8; 32]; n];
                        for h in &mut heads {
                            if recv.read_exact(h).await.is_err() {
                                return;
                            }
                        }
                        let yes = tokio::task::spawn_blocking(move || inbound.holds(doc, &heads))
                            .await
                            .unwrap_or(false);
                        let _ = send.write_all(&[yes as u8]).await;
                    }
                    REQ_SNAPSHOT => {
                        let mut doc = [0u8; 1];
                        if recv.read_exact(&mut doc).await.is_err() {
                            return;
                        }
                        let Some(doc) = DocId::from_byte(doc[0]) else {
                            return;
                        };
                        let snapshot = tokio::task::spawn_blocking(move || inbound.snapshot(doc))
                            .await
                            .ok()
                            .flatten();
                        let _ = reply_optional(&mut send, snapshot).await;
                    }
                    _ => return,
                }
                let _ = send.finish();
                let _ = send.stopped().await;
            });
        }
    }
}

/// Fetch a blob from the peer at the other end of `conn`: none if it does
/// not have it.
pub async fn fetch_blob(conn: &Connection, hash: &[u8; 32]) -> anyhow::Result<Option<Vec<u8>>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut req = vec![REQ_BLOB];
    req.extend_from_slice(hash);
    send.write_all(&req).await?;
    send.finish()?;
    read_optional(&mut recv, MAX_BLOB, "blob").await
}

/// Fetch a replicated document whole from the peer at the other end of
/// `conn`: none if it does not replicate it. At most a sync frame's size.
pub async fn fetch_snapshot(conn: &Connection, doc: DocId) -> anyhow::Result<Option<Vec<u8>>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[REQ_SNAPSHOT, doc.to_byte()]).await?;
    send.finish()?;
    read_optional(&mut recv, MAX_SYNC_FRAME, "snapshot").await
}

/// Does the peer at the other end of `conn` hold every change `heads` name?
pub async fn ask_holds(conn: &Connection, doc: DocId, heads: &[[u8; 32]]) -> anyhow::Result<bool> {
    anyhow::ensure!(heads.len() <= MAX_HOLDS, "too many heads");
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut req = vec![REQ_HOLDS, doc.to_byte(), heads.len() as u8];
    heads.iter().for_each(|h| req.extend_from_slice(h));
    send.write_all(&req).await?;
    send.finish()?;
    let mut answer = [0u8; 1];
    recv.read_exact(&mut answer).await?;
    Ok(answer[0] == 1)
}

/// Answer a request whose answer may be absent: `1` and the bytes, or `0`.
async fn reply_optional(
    send: &mut SendStream,
    answer: Option<Vec<u8>>,
) -> Result<(), quinn::WriteError> {
    match answer {
        Some(b) => {
            let mut chunks = [Bytes::from_static(&[1]), b.into()];
            send.write_all_chunks(&mut chunks).await
        }
        None => send.write_all(&[0]).await,
    }
}

/// Read what [`reply_optional`] wrote, at most `max` bytes of answer.
async fn read_optional(
    recv: &mut RecvStream,
    max: usize,
    what: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let reply = recv.read_to_end(max + 1).await?;
    match reply.split_first() {
        Some((1, body)) => Ok(Some(body.to_vec())),
        Some((0, _)) => Ok(None),
        _ => anyhow::bail!("malformed {what} reply"),
    }
}

/// Is the process behind `conn` alive? Used when a node with a known name
/// connects again from another process: a restart (replace the old link)
/// or a second node with the same name (refuse the new one).
pub async fn probe(conn: &Connection, timeout: Duration) -> bool {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&[REQ_PROBE]).await.ok()?;
        send.finish().ok()?;
        let mut b = [0u8; 1];
        recv.read_exact(&mut b).await.ok()?;
        Some(())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(())))
}

/// A readable reason for a closed connection.
pub fn closed_reason(conn: &Connection) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            let text = String::from_utf8_lossy(&c.reason).into_owned();
            if text.is_empty() {
                "closed by peer".into()
            } else {
                text
            }
        }
        Some(quinn::ConnectionError::TimedOut) => "no answer (timed out)".into(),
        Some(quinn::ConnectionError::LocallyClosed) => "closed".into(),
        Some(e) => e.to_string(),
        None => "stream ended".into(),
    }
}

/// Exchange hellos on a fresh connection: each side opens its one
/// outbound stream and writes its hello first.
pub async fn exchange_hello(
    conn: &Connection,
    mine: &Hello,
    max_payload: usize,
) -> anyhow::Result<(Hello, SendStream, FrameReader<RecvStream>)> {
    let mut send = conn.open_uni().await?;
    send.write_all(&Frame::Hello(mine.clone()).encode()).await?;
    let recv = conn.accept_uni().await?;
    let mut reader = FrameReader::new(recv, max_payload);
    let hello = match reader.next().await {
        Ok(Frame::Hello(h)) => h,
        Ok(other) => anyhow::bail!("peer sent {other:?} before its hello"),
        Err(e) => anyhow::bail!("reading the peer's hello: {e}"),
    };
    // The reader goes on to the link: it may hold frames sent right
    // after the hello.
    Ok((hello, send, reader))
}
