//! The operator's requests, answered by the running node: the node side
//! of `covey emit|send|call|kv|nodes|logs` (see [`super::proto`]).
//!
//! Bus operations go through the router exactly as a script's would, from
//! this node (`from` = the node's name); key-value writes go to the store
//! with no script's quota. Streams (`kv watch`, `events`) are taps: a
//! mailbox registered in the router under `tap:N` — a name no script can
//! have — with one subscription, removed when the reader goes away.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::broadcast;

use super::StatusSource;
use super::fleet::{self, FleetLogs, Nodes};
use super::proto::{
    Answer, Bytes, EventItem, Failure, FailureKind, KvChange, Request, line, payload_too_large,
};
use crate::kvdoc::KvError;
use crate::logring::{LOGS, LogLine, LogQuery};
use crate::pattern::Pattern;
use crate::router::{
    Delivery, MailboxRx, PeerStatus, Router, SYSTEM_LOGS, SYSTEM_SCRIPTS, SubKind, mailbox,
};
use futures_util::{Stream, StreamExt};

/// Longest call timeout an operator may ask for.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Items a tap holds for a slow reader before the router drops them.
const TAP_MAILBOX: usize = 1024;
/// Longest event name.
const MAX_NAME: usize = 1024;

pub(crate) type Outcome = std::result::Result<(serde_json::Value, Vec<u8>), Failure>;

pub(super) async fn handle(
    source: &StatusSource,
    req: Request,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    let outcome = match req {
        Request::KvWatch { prefix } => {
            return tap(Tap::kv(source.router.clone(), prefix), read, write).await;
        }
        Request::Events { pattern } => {
            return tap(Tap::events(source.router.clone(), &pattern), read, write).await;
        }
        Request::Logs {
            query,
            follow,
            tail,
            nodes: Nodes::Here,
        } => return logs(query, follow, tail, read, write).await,
        Request::Logs {
            query,
            follow,
            tail,
            nodes,
        } => {
            let fleet = FleetLogs::new(source, nodes.clone(), query, tail, follow);
            return fleet_logs(source, &nodes, fleet, read, write).await;
        }
        Request::Emit { name, len } => match payload(source, read, len).await? {
            Ok(p) => emit(source, &name, p),
            Err(f) => Err(f),
        },
        Request::Send { target, name, len } => match payload(source, read, len).await? {
            Ok(p) => send(source, &target, &name, p),
            Err(f) => Err(f),
        },
        Request::Call {
            target,
            name,
            len,
            timeout_ms,
        } => match payload(source, read, len).await? {
            Ok(p) => call(source, &target, &name, p, timeout_ms).await,
            Err(f) => Err(f),
        },
        Request::Scripts { nodes: Nodes::Here } => {
            let list = source.supervisor.list().await;
            Ok((
                json!({ "node": source.router.node_name(), "scripts": list }),
                vec![],
            ))
        }
        Request::Scripts { nodes } => {
            let answers = fleet::ask(source, &nodes, SYSTEM_SCRIPTS, b"").await;
            match (&nodes, answers.first().and_then(fleet::failure_of)) {
                // One node asked, and it could not answer: the request failed.
                (Nodes::One(_), Some(f)) => Err(f),
                _ => Ok((serde_json::Value::Array(answers), vec![])),
            }
        }
        Request::KvSet { key, len } => match payload(source, read, len).await? {
            Ok(value) => (source
                .kv
                .set(&key, &value)
                .map(|()| (json!({ "key": key }), vec![])))
            .map_err(kv_failure),
            Err(f) => Err(f),
        },
        other => simple(source, other),
    };
    let (answer, bytes) = match outcome {
        Ok((value, bytes)) => (
            Answer {
                value,
                len: bytes.len() as u64,
                error: None,
            },
            bytes,
        ),
        Err(f) => (
            Answer {
                error: Some(f),
                ..Answer::default()
            },
            vec![],
        ),
    };
    write.write_all(&line(&answer)?).await?;
    write.write_all(&bytes).await?;
    Ok(())
}

/// The requests answered at once, without a payload.
pub(crate) fn simple(source: &StatusSource, req: Request) -> Outcome {
    match req {
        Request::Status => Ok((serde_json::to_value(source.report()).unwrap(), vec![])),
        Request::KvGet { key } => match source.kv.get(&key) {
            Some(v) => Ok((json!({ "key": key }), v)),
            None => Err(Failure::new(
                FailureKind::NotFound,
                format!("no key `{key}`"),
            )),
        },
        Request::KvDel { key } => match source.kv.delete(&key) {
            Ok(existed) => Ok((json!({ "key": key, "existed": existed }), vec![])),
            Err(e) => Err(kv_failure(e)),
        },
        Request::KvLs { prefix } => {
            let keys = source.kv.keys(&prefix);
            Ok((json!({ "keys": keys }), vec![]))
        }
        Request::Nodes => Ok((serde_json::to_value(nodes(source)).unwrap(), vec![])),
        Request::ForgetNode { node } => forget(source, &node),
        _ => Err(Failure::new(
            FailureKind::BadRequest,
            "not a simple request",
        )),
    }
}

/// Read a request's payload, unless it is over the limit (then it is
/// refused, and read only to be thrown away).
async fn payload(
    source: &StatusSource,
    read: &mut BufReader<OwnedReadHalf>,
    len: u64,
) -> Result<std::result::Result<Vec<u8>, Failure>> {
    let max = source.router.max_payload() as u64;
    if len > max {
        // Read and dropped, not kept: closing with unread bytes would reset
        // the connection before the client reads why. The sender is a
        // local user; still, give up after a while.
        let (mut rest, mut sink) = ((&mut *read).take(len), tokio::io::sink());
        let drain = tokio::io::copy(&mut rest, &mut sink);
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        return Ok(Err(payload_too_large(max)));
    }
    let mut bytes = vec![0; len as usize];
    read.read_exact(&mut bytes).await?;
    Ok(Ok(bytes))
}

fn check_name(name: &str) -> std::result::Result<(), Failure> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Failure::new(
            FailureKind::BadRequest,
            format!("a message name must be 1..={MAX_NAME} bytes"),
        ));
    }
    Ok(())
}

pub(crate) fn emit(source: &StatusSource, name: &str, payload: impl Into<bytes::Bytes>) -> Outcome {
    check_name(name)?;
    let n = source.router.emit(name, payload)?;
    Ok((json!({ "local_scripts": n }), vec![]))
}

pub(crate) fn send(source: &StatusSource, target: &str, name: &str, payload: Vec<u8>) -> Outcome {
    check_name(name)?;
    check_target(target)?;
    let n = source.router.send_command(target, name, payload)?;
    Ok((json!({ "local_scripts": n }), vec![]))
}

pub(crate) async fn call(
    source: &StatusSource,
    target: &str,
    name: &str,
    payload: Vec<u8>,
    timeout_ms: u64,
) -> Outcome {
    check_name(name)?;
    check_target(target)?;
    let timeout = Duration::from_millis(timeout_ms).min(MAX_CALL_TIMEOUT);
    let reply = (source.router)
        .call(None, target, name, payload, timeout)
        .await?;
    Ok((json!({}), reply))
}

fn check_target(target: &str) -> std::result::Result<(), Failure> {
    let (node, device) = crate::router::split_target(target);
    let bad =
        |why: &str| Failure::new(FailureKind::BadRequest, format!("target {target:?}: {why}"));
    if node.is_empty() || device.is_some_and(str::is_empty) {
        return Err(bad("expected NODE, NODE/DEVICE or *"));
    }
    if node != "*" && crate::config::validate_node_name(node).is_err() {
        return Err(bad("not a node name"));
    }
    Ok(())
}

pub(crate) fn kv_failure(e: KvError) -> Failure {
    let kind = match e {
        KvError::InvalidKey(_) => FailureKind::BadRequest,
        KvError::ValueTooLarge(_) => FailureKind::PayloadTooLarge,
        _ => FailureKind::Failed,
    };
    Failure::new(kind, e.to_string())
}

/// One member, for `covey nodes`.
#[derive(Serialize)]
pub(crate) struct NodeRow {
    name: String,
    this_node: bool,
    up: bool,
    since_ms: Option<u64>,
    addr: Option<String>,
    rtt_us: Option<u64>,
    version: String,
}

/// Stop counting `node` as a member of the key-value store.
fn forget(source: &StatusSource, node: &str) -> Outcome {
    let bad = |m: String| Err(Failure::new(FailureKind::BadRequest, m));
    if node == source.router.node_name() {
        return bad("this node cannot forget itself".into());
    }
    if (source.cluster.as_ref()).is_some_and(|c| c.status(node) == PeerStatus::Up) {
        return bad(format!("node `{node}` is up: stop it first"));
    }
    match source.kv.forget_member(node) {
        Ok(true) => Ok((json!({ "node": node, "forgotten": true }), vec![])),
        Ok(false) => Err(Failure::new(
            FailureKind::NotFound,
            format!("`{node}` is not a member of the key-value store"),
        )),
        Err(e) => Err(kv_failure(e)),
    }
}

pub(crate) fn nodes(source: &StatusSource) -> Vec<NodeRow> {
    let me = NodeRow {
        name: source.router.node_name().to_string(),
        this_node: true,
        up: true,
        since_ms: Some(source.started_ms),
        addr: source.cluster.as_ref().map(|c| c.local_addr().to_string()),
        rtt_us: None,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let peers = source
        .cluster
        .as_ref()
        .map(|c| c.peers())
        .unwrap_or_default();
    std::iter::once(me)
        .chain(peers.into_iter().map(|p| NodeRow {
            name: p.name,
            this_node: false,
            up: p.up,
            since_ms: Some(p.since_ms),
            addr: p.addr.map(|a| a.to_string()),
            rtt_us: p.rtt_us,
            version: p.version,
        }))
        .collect()
}

/// A mailbox in the router under a name no script can have, with one
/// subscription; removed from the router when dropped.
pub(crate) struct Tap {
    router: Arc<Router>,
    name: Arc<str>,
    rx: MailboxRx,
}

/// What a tap yields.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum TapItem {
    Kv(KvChange),
    Event(EventItem),
}

impl Tap {
    pub(crate) fn open(router: Arc<Router>, kind: SubKind) -> Tap {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mailbox(TAP_MAILBOX);
        let name: Arc<str> = format!("tap:{}", NEXT.fetch_add(1, Ordering::Relaxed)).into();
        router.register(name.clone(), tx);
        router.subscribe(&name, 0, kind);
        Tap { router, name, rx }
    }

    /// Key-value changes under `prefix`.
    pub(crate) fn kv(router: Arc<Router>, prefix: String) -> Tap {
        Tap::open(router, SubKind::Watch { prefix })
    }

    /// Events from anywhere whose name matches `pattern`.
    pub(crate) fn events(router: Arc<Router>, pattern: &str) -> Tap {
        let kind = SubKind::Event {
            from: Pattern::new("*"),
            name: Pattern::new(pattern),
        };
        Tap::open(router, kind)
    }

    /// The items as a stream (ends when the router drops the tap).
    pub(crate) fn into_stream(self) -> impl Stream<Item = TapItem> + Send {
        futures_util::stream::unfold(self, |mut tap| async move {
            tap.next().await.map(|item| (item, tap))
        })
    }

    pub(crate) async fn next(&mut self) -> Option<TapItem> {
        loop {
            return Some(match self.rx.recv().await? {
                Delivery::KvChange { key, value, .. } => TapItem::Kv(KvChange {
                    key: key.to_string(),
                    value: value.map(|v| Bytes::new(&v)),
                }),
                Delivery::Event { msg, .. } => TapItem::Event(EventItem {
                    from: msg.from.to_string(),
                    name: msg.name.to_string(),
                    timestamp_ms: msg.timestamp_ms,
                    payload: Bytes::new(&msg.payload),
                }),
                _ => continue,
            });
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.router.unregister(&self.name);
    }
}

/// Stream a tap until the reader goes away.
async fn tap(
    tap: Tap,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    write.write_all(&line(&Answer::default())?).await?;
    until_gone(tap.into_stream(), read, write).await
}

/// Write `items`, one JSON line each, until they end or the reader goes
/// away (anything it sends, or the end of its side, means it is gone).
async fn until_gone<T: Serialize>(
    items: impl Stream<Item = T>,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    let mut items = std::pin::pin!(items);
    let mut sink = [0u8; 64];
    loop {
        let item = tokio::select! {
            item = items.next() => item,
            _ = read.read(&mut sink) => return Ok(()),
        };
        let Some(item) = item else { return Ok(()) };
        write.write_all(&line(&item)?).await?;
    }
}

/// Log lines for `covey logs`: the kept ones, then new ones.
pub(crate) struct LogFollow {
    new: broadcast::Receiver<LogLine>,
    last_kept: u64,
    query: LogQuery,
}

impl LogFollow {
    /// The kept lines that match (the last `tail` of them) and a follower
    /// for the lines after them.
    pub(crate) fn start(query: LogQuery, tail: Option<u64>) -> (Vec<LogLine>, LogFollow) {
        // Subscribed before reading the ring: nothing falls in between.
        let new = LOGS.follow();
        let mut kept = LOGS.recent(&query);
        if let Some(n) = tail {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            kept.drain(..kept.len().saturating_sub(n));
        }
        let last_kept = kept.last().map_or(0, |l| l.seq);
        let follow = LogFollow {
            new,
            last_kept,
            query,
        };
        (kept, follow)
    }

    /// The new lines as a stream.
    pub(crate) fn into_stream(self) -> impl Stream<Item = LogLine> + Send {
        futures_util::stream::unfold(self, |mut f| async move { f.next().await.map(|l| (l, f)) })
    }

    pub(crate) async fn next(&mut self) -> Option<LogLine> {
        loop {
            return Some(match self.new.recv().await {
                Ok(l) if l.seq <= self.last_kept || !self.query.matches(&l) => continue,
                Ok(l) => l,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    LogLine::about_logs(format!("{n} log lines skipped: this reader fell behind"))
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            });
        }
    }
}

/// The kept lines (the last `tail` of them), then new ones if `follow`.
async fn logs(
    query: LogQuery,
    follow: bool,
    tail: Option<u64>,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    let (kept, new) = LogFollow::start(query, tail);
    write.write_all(&line(&Answer::default())?).await?;
    for l in &kept {
        write.write_all(&line(l)?).await?;
    }
    if !follow {
        return Ok(());
    }
    until_gone(new.into_stream(), read, write).await
}

/// Lines of other nodes (or all): one node asked that cannot answer fails
/// the request; of all nodes, one that does not answer is a warning line.
async fn fleet_logs(
    source: &StatusSource,
    nodes: &Nodes,
    fleet: FleetLogs<'_>,
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    if let Nodes::One(node) = nodes {
        let probe = serde_json::to_vec(&fleet::LogsAsk {
            tail: Some(0),
            ..Default::default()
        })?;
        let answer = fleet::ask_one(&source.router, node.clone(), SYSTEM_LOGS, &probe).await;
        if let Some(f) = fleet::failure_of(&answer) {
            let answer = Answer {
                error: Some(f),
                ..Answer::default()
            };
            return Ok(write.write_all(&line(&answer)?).await?);
        }
    }
    write.write_all(&line(&Answer::default())?).await?;
    let items =
        futures_util::stream::unfold(fleet, |mut f| async move { f.next().await.map(|l| (l, f)) });
    until_gone(items, read, write).await
}
