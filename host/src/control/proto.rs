//! What goes over the control socket.
//!
//! A request is one line of JSON ([`Request`], tagged by `op`), followed by
//! `len` raw bytes when it carries a payload. The answer is one line of
//! JSON ([`Answer`]): an error, or a value, followed by `len` raw bytes
//! (a call's reply, a key's value). Streams (`kv_watch`, `events`, `logs`
//! with `follow`) go on with one JSON line per item until either side
//! closes. Two plain-text requests from before remain: `status` and
//! `device VERB [NAME]`.
//!
//! Payloads travel raw, not inside the JSON, so binary payloads need no
//! encoding and a large one is refused (`payload_too_large`) before it is
//! read.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::fleet::Nodes;
use crate::bindings::{CallError, SendError};
use crate::logring::LogQuery;

/// Longest request or answer line, in bytes.
pub const MAX_LINE: u64 = 64 * 1024;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// An event from this node to every script of the cluster.
    Emit {
        name: String,
        len: u64,
    },
    /// A command to a node, `*` or `NODE/DEVICE`.
    Send {
        target: String,
        name: String,
        len: u64,
    },
    /// A call: the reply comes back as the answer's bytes.
    Call {
        target: String,
        name: String,
        len: u64,
        timeout_ms: u64,
    },
    KvGet {
        key: String,
    },
    KvSet {
        key: String,
        len: u64,
    },
    KvDel {
        key: String,
    },
    KvLs {
        prefix: String,
    },
    /// Stream of changes under `prefix` ([`KvChange`]).
    KvWatch {
        prefix: String,
    },
    /// Stream of events whose name matches `pattern` ([`EventItem`]).
    Events {
        pattern: String,
    },
    /// The cluster's members as this node sees them.
    Nodes,
    /// No longer count a node that is gone as a member of the store.
    ForgetNode {
        node: String,
    },
    /// Scripts ([`crate::script::supervisor::ScriptInfo`]): this node's
    /// as `{"node", "scripts"}`; of other nodes, a list of those (or of
    /// `{"node", "error"}`).
    Scripts {
        #[serde(default)]
        nodes: Nodes,
    },
    /// Recent log lines (the last `tail`), then (`follow`) new ones as
    /// they come ([`crate::logring::LogLine`]); of other nodes, merged in
    /// time order and labelled with their node.
    Logs {
        query: LogQuery,
        follow: bool,
        tail: Option<u64>,
        #[serde(default)]
        nodes: Nodes,
    },
}

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub value: serde_json::Value,
    /// Raw bytes following the line.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub len: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// Why a request failed; each has its own exit code in the CLI.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Anything else (exit code 1).
    Failed,
    /// Malformed request, bad target or key (2).
    BadRequest,
    /// No script handles the call (3).
    NoHandler,
    /// No reply within the timeout (4).
    Timeout,
    /// The target node is known but unreachable (5).
    NodeDown,
    /// No such node in the cluster (6).
    UnknownNode,
    /// Over the cluster's payload limit (7).
    PayloadTooLarge,
    /// The handler failed or returned no reply (8).
    HandlerFailed,
    /// No such key (9).
    NotFound,
}

impl FailureKind {
    pub fn exit_code(self) -> i32 {
        match self {
            FailureKind::Failed => 1,
            FailureKind::BadRequest => 2,
            FailureKind::NoHandler => 3,
            FailureKind::Timeout => 4,
            FailureKind::NodeDown => 5,
            FailureKind::UnknownNode => 6,
            FailureKind::PayloadTooLarge => 7,
            FailureKind::HandlerFailed => 8,
            FailureKind::NotFound => 9,
        }
    }
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl From<CallError> for Failure {
    fn from(e: CallError) -> Self {
        use FailureKind as K;
        match e {
            CallError::NoHandler(m) => Failure::new(K::NoHandler, m),
            CallError::Timeout => Failure::new(K::Timeout, "no reply within the timeout"),
            CallError::UnknownNode(n) => {
                Failure::new(K::UnknownNode, format!("unknown node `{n}`"))
            }
            CallError::NodeDown(n) => Failure::new(K::NodeDown, format!("node `{n}` is down")),
            CallError::HandlerFailed(m) => Failure::new(K::HandlerFailed, m),
            CallError::NoReply => Failure::new(K::HandlerFailed, "the handler returned no reply"),
            CallError::PayloadTooLarge(max) => payload_too_large(max),
            CallError::InvalidTarget(m) => Failure::new(K::BadRequest, m),
        }
    }
}

impl From<SendError> for Failure {
    fn from(e: SendError) -> Self {
        use FailureKind as K;
        match e {
            SendError::UnknownNode(n) => {
                Failure::new(K::UnknownNode, format!("unknown node `{n}`"))
            }
            SendError::NodeDown(n) => Failure::new(K::NodeDown, format!("node `{n}` is down")),
            SendError::PayloadTooLarge(max) => payload_too_large(max),
            SendError::ReservedName(n) => {
                Failure::new(K::BadRequest, crate::lifecycle::reserved_refusal(&n))
            }
        }
    }
}

pub fn payload_too_large(max: u64) -> Failure {
    Failure::new(
        FailureKind::PayloadTooLarge,
        format!("payload over the cluster's limit of {max} bytes (max_payload)"),
    )
}

/// A key-value change in a `kv_watch` stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KvChange {
    pub key: String,
    /// The new value (none: deleted).
    pub value: Option<Bytes>,
}

/// An event in an `events` stream.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EventItem {
    pub from: String,
    pub name: String,
    pub timestamp_ms: u64,
    pub payload: Bytes,
}

/// Bytes in JSON: a string when they are UTF-8 text, else `{"hex": ...}`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Bytes {
    Text(String),
    Hex { hex: String },
}

impl Bytes {
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Bytes::Text(s.to_string()),
            Err(_) => Bytes::Hex {
                hex: crate::files::hex(bytes),
            },
        }
    }

    /// For a terminal: the text, or `0x…`.
    pub fn display(&self) -> String {
        match self {
            Bytes::Text(s) => s.clone(),
            Bytes::Hex { hex } => format!("0x{hex}"),
        }
    }
}

/// An answer line, ready to send.
pub fn line<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec(value)?;
    out.push(b'\n');
    Ok(out)
}

/// Read one line of at most [`MAX_LINE`] bytes (none at end of stream).
pub async fn read_line<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> Result<Option<String>> {
    let mut text = String::new();
    let n = (&mut *reader).take(MAX_LINE).read_line(&mut text).await?;
    if n == 0 {
        return Ok(None);
    }
    if !text.ends_with('\n') && n as u64 == MAX_LINE {
        bail!("line longer than {MAX_LINE} bytes");
    }
    Ok(Some(text))
}

/// A connection to the node running on `data_dir`.
pub async fn connect(data_dir: &Path) -> Result<UnixStream> {
    let path = data_dir.join(super::SOCKET_FILE);
    match UnixStream::connect(&path).await {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            bail!(
                "no covey node is running with data directory {} (start one with `covey run`, \
                 or pass the node's --data)",
                data_dir.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {}", path.display())),
    }
}

/// The answer to one request, its bytes, and the rest of the stream.
pub struct Reply {
    pub answer: Answer,
    pub bytes: Vec<u8>,
    pub rest: BufReader<OwnedReadHalf>,
    /// Kept open: the node takes its closing as the reader being gone.
    _write: OwnedWriteHalf,
}

/// Send `req` (and `payload`) to the node on `data_dir`; read its answer.
pub async fn exchange(data_dir: &Path, req: &Request, payload: &[u8]) -> Result<Reply> {
    let (read, mut write) = connect(data_dir).await?.into_split();
    // A write the node cut short (it refused the request early) still
    // leaves its answer to read.
    let sent = match write.write_all(&line(req)?).await {
        Ok(()) => write.write_all(payload).await,
        Err(e) => Err(e),
    };
    let mut rest = BufReader::new(read);
    let Some(text) = read_line(&mut rest).await.ok().flatten() else {
        sent.context("sending the request to the node")?;
        bail!("the node closed the connection without answering");
    };
    let answer: Answer = serde_json::from_str(&text)
        .with_context(|| format!("unexpected answer from the node: {text}"))?;
    let mut bytes = vec![0; usize::try_from(answer.len)?];
    rest.read_exact(&mut bytes)
        .await
        .context("the node's answer ended early")?;
    Ok(Reply {
        answer,
        bytes,
        rest,
        _write: write,
    })
}
