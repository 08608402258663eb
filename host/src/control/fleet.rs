//! The whole cluster from one node: how `covey scripts --all-nodes`,
//! `covey logs --all-nodes` and the dashboard see every node.
//!
//! Each node answers a few calls itself, before any script
//! ([`NodeSystem`], names under `covey.node.`): its scripts and its recent
//! log lines. [`ask`] sends one of them to the nodes an operator picked —
//! this node answers from memory, peers over the cluster link, all at
//! once, [`ASK_TIMEOUT`] each — and lists a node that does not answer with
//! its error, so one dead peer never hides the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::StatusSource;
use super::proto::{Failure, FailureKind};
use crate::clock::now_ms;
use crate::logring::{LOGS, LogLine, LogQuery};
use crate::router::{Router, SYSTEM_LOGS, SYSTEM_SCRIPTS, SystemCalls};
use crate::script::supervisor::ScriptSupervisor;

/// How long a peer has to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The nodes an operator's request is about.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Nodes {
    /// The node the operator talks to.
    #[default]
    Here,
    /// One node of the cluster, by name.
    One(String),
    /// This node and every peer that is up.
    All,
}

/// What `covey.node.logs` is asked (a JSON payload).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct LogsAsk {
    #[serde(default)]
    pub query: LogQuery,
    /// Only the newest N matching lines.
    #[serde(default)]
    pub tail: Option<u64>,
    /// Only lines after this position in the node's log (following).
    #[serde(default)]
    pub after_seq: Option<u64>,
}

/// What `covey.node.logs` answers.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct LogsAnswer {
    pub node: String,
    pub lines: Vec<LogLine>,
    /// More lines matched than fit in one reply (the payload limit): the
    /// newest were kept for a tail, the oldest when following (ask again).
    #[serde(default)]
    pub more: bool,
}

/// Ask `name` (with `payload`) of the nodes `nodes` picks; one JSON answer
/// per node, this node first, peers in name order. A node that cannot
/// answer is `{"node", "error": Failure}`.
pub async fn ask(source: &StatusSource, nodes: &Nodes, name: &str, payload: &[u8]) -> Vec<Value> {
    let asks =
        (pick(source, nodes).into_iter()).map(|node| ask_one(&source.router, node, name, payload));
    futures_util::future::join_all(asks).await
}

/// The names of the nodes `nodes` picks, this node first.
pub fn pick(source: &StatusSource, nodes: &Nodes) -> Vec<String> {
    let me = source.router.node_name().to_string();
    match nodes {
        Nodes::Here => vec![me],
        Nodes::One(node) => vec![node.clone()],
        Nodes::All => {
            let peers = (source.cluster.as_ref()).map(|c| c.peers());
            let up = (peers.unwrap_or_default().into_iter()).filter(|p| p.up);
            std::iter::once(me).chain(up.map(|p| p.name)).collect()
        }
    }
}

/// One node's answer to `name`, or `{"node", "error"}`.
pub async fn ask_one(router: &Arc<Router>, node: String, name: &str, payload: &[u8]) -> Value {
    let r = router
        .call(None, &node, name, payload.to_vec(), ASK_TIMEOUT)
        .await;
    let failure = match r.map(|b| serde_json::from_slice::<Value>(&b)) {
        Ok(Ok(v)) => return v,
        Ok(Err(e)) => Failure::new(FailureKind::Failed, format!("unreadable answer: {e}")),
        Err(e) => Failure::from(e),
    };
    json!({ "node": node, "error": failure })
}

/// The failure in a node's answer, if it is one.
pub fn failure_of(answer: &Value) -> Option<Failure> {
    serde_json::from_value(answer.get("error")?.clone()).ok()
}

type Answer = Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;

/// The node's own answers to `covey.node.*` calls. Holds the supervisor
/// weakly: the router it is registered in must not keep it alive.
pub struct NodeSystem {
    pub node: String,
    pub supervisor: Weak<ScriptSupervisor>,
    /// Longest answer (the cluster's payload limit).
    pub max_payload: usize,
}

impl SystemCalls for NodeSystem {
    fn answer(&self, name: &str, payload: &[u8]) -> Option<Answer> {
        let node = self.node.clone();
        match name {
            SYSTEM_SCRIPTS => {
                let supervisor = self.supervisor.upgrade()?;
                Some(Box::pin(async move {
                    let scripts = supervisor.list().await;
                    let answer = json!({ "node": node, "scripts": scripts });
                    serde_json::to_vec(&answer).unwrap_or_default()
                }))
            }
            SYSTEM_LOGS => {
                let answer = match serde_json::from_slice::<LogsAsk>(payload) {
                    Ok(ask) => serde_json::to_vec(&logs(node, &ask, self.max_payload)),
                    Err(e) => serde_json::to_vec(&json!({
                        "node": node,
                        "error": Failure::new(FailureKind::BadRequest, e.to_string()),
                    })),
                };
                Some(Box::pin(std::future::ready(answer.unwrap_or_default())))
            }
            _ => None,
        }
    }
}

/// This node's lines for `ask`, in at most `max_bytes` of JSON.
pub fn logs(node: String, ask: &LogsAsk, max_bytes: usize) -> LogsAnswer {
    let mut lines = LOGS.recent(&ask.query);
    // A position past this log's end: the node restarted since (its log
    // starts again at 1), so all it has is new to the asker.
    if let Some(after) = ask.after_seq.filter(|&a| a <= LOGS.last_seq()) {
        lines.retain(|l| l.seq > after);
    }
    if let Some(n) = ask.tail {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        lines.drain(..lines.len().saturating_sub(n));
    }
    // Fit the reply: a tail keeps the newest lines, a follower the oldest
    // (it asks again from the last one it got).
    let keep_newest = ask.after_seq.is_none();
    let room = max_bytes.saturating_sub(node.len() + 64);
    let mut used = 0;
    let mut fits = 0;
    let order: Box<dyn Iterator<Item = &LogLine>> = if keep_newest {
        Box::new(lines.iter().rev())
    } else {
        Box::new(lines.iter())
    };
    for l in order {
        // The line's JSON plus the comma and the node label added below.
        let size = serde_json::to_vec(l).map_or(usize::MAX, |b| b.len()) + node.len() + 12;
        if used + size > room {
            break;
        }
        used += size;
        fits += 1;
    }
    let more = fits < lines.len();
    if keep_newest {
        lines.drain(..lines.len() - fits);
    } else {
        lines.truncate(fits);
    }
    for l in &mut lines {
        l.node = Some(node.clone());
    }
    LogsAnswer { node, lines, more }
}

/// How often a follower of several nodes asks them for new lines.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// Log lines of several nodes, merged in time order: the kept ones (the
/// newest `tail` of them all), then, following, new ones, asked of every
/// node that is up each [`FOLLOW_EVERY`]. A node that does not answer is
/// told as one warning line, until it answers again.
pub struct FleetLogs<'a> {
    source: &'a StatusSource,
    nodes: Nodes,
    query: LogQuery,
    tail: Option<u64>,
    follow: bool,
    /// Per node: the position of the last line given (asked after).
    last: HashMap<String, u64>,
    failing: HashSet<String>,
    ready: VecDeque<LogLine>,
    /// When following began: a node first heard of later gives its lines
    /// from then on.
    started_ms: Option<u64>,
    /// A node had more lines than one answer holds: ask again at once.
    more: bool,
}

impl<'a> FleetLogs<'a> {
    pub fn new(
        source: &'a StatusSource,
        nodes: Nodes,
        query: LogQuery,
        tail: Option<u64>,
        follow: bool,
    ) -> Self {
        FleetLogs {
            source,
            nodes,
            query,
            tail,
            follow,
            last: HashMap::new(),
            failing: HashSet::new(),
            ready: VecDeque::new(),
            started_ms: None,
            more: false,
        }
    }

    pub async fn next(&mut self) -> Option<LogLine> {
        loop {
            if let Some(l) = self.ready.pop_front() {
                return Some(l);
            }
            if self.started_ms.is_some() {
                if !self.follow {
                    return None;
                }
                if !self.more {
                    tokio::time::sleep(FOLLOW_EVERY).await;
                }
            }
            self.round().await;
        }
    }

    /// Ask every picked node once; queue what they gave, in time order.
    async fn round(&mut self) {
        let first = self.started_ms.is_none();
        let now = now_ms();
        let asks = pick(self.source, &self.nodes).into_iter().map(|node| {
            let mut ask = LogsAsk {
                query: self.query.clone(),
                tail: if first { self.tail } else { None },
                after_seq: self.last.get(&node).copied(),
            };
            if let (Some(start), None) = (self.started_ms, ask.after_seq) {
                ask.query.since_ms = Some(ask.query.since_ms.unwrap_or(0).max(start));
            }
            let payload = serde_json::to_vec(&ask).unwrap_or_default();
            let router = &self.source.router;
            async move {
                (
                    node.clone(),
                    ask_one(router, node, SYSTEM_LOGS, &payload).await,
                )
            }
        });
        let answers = futures_util::future::join_all(asks).await;
        self.started_ms.get_or_insert(now);
        self.more = false;
        let mut lines = Vec::new();
        for (node, answer) in answers {
            let answer = match failure_of(&answer) {
                None => serde_json::from_value::<LogsAnswer>(answer).map_err(|e| e.to_string()),
                Some(f) => Err(f.message),
            };
            match answer {
                Ok(a) => {
                    self.failing.remove(&node);
                    self.more |= a.more && !first;
                    if let Some(l) = a.lines.last() {
                        self.last.insert(node, l.seq);
                    }
                    lines.extend(a.lines);
                }
                Err(why) if self.failing.insert(node.clone()) => {
                    let mut l = LogLine::about_logs(format!("node {node} did not answer: {why}"));
                    l.node = Some(node);
                    lines.push(l);
                }
                Err(_) => {}
            }
        }
        lines.sort_by_key(|l| l.time_ms);
        if let (true, Some(n)) = (first, self.tail) {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            lines.drain(..lines.len().saturating_sub(n));
        }
        self.ready.extend(lines);
    }
}
