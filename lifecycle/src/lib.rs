//! System events: what a Covey node tells scripts about nodes, scripts,
//! devices and merge conflicts, through the normal bus. Shared by the host
//! (which emits them) and the guest SDK (whose scripts read them).
//!
//! Every name starts with [`PREFIX`], which scripts, devices, the CLI and
//! the HTTP API may not emit (the router refuses it with `reserved-name`):
//! a script reacting to `covey.node.down` can trust that a node said so.
//! Payloads are JSON objects, one struct per kind below; their fields are
//! the contract documented in the README ("System events") and mirrored by
//! the guest SDK's `system` module.
//!
//! Two scopes. *Local* events are this node's own observations and are
//! never sent to peers: `covey.node.*` (each node judges its own links)
//! and the `*.conflict` events (each node sees a conflict when it merges
//! the other side's write). *Cluster* events are facts about something on
//! this node, broadcast to every peer that is up: `covey.script.*` and
//! `covey.device.*`; those are the only reserved names a peer may send.

use serde::{Deserialize, Serialize};

/// Names under this prefix are the node's alone.
pub const PREFIX: &str = "covey.";

pub const NODE_UP: &str = "covey.node.up";
pub const NODE_DOWN: &str = "covey.node.down";
pub const SCRIPT_STARTED: &str = "covey.script.started";
pub const SCRIPT_STOPPED: &str = "covey.script.stopped";
pub const SCRIPT_FAILED: &str = "covey.script.failed";
pub const DEVICE_ATTACHED: &str = "covey.device.attached";
pub const DEVICE_DETACHED: &str = "covey.device.detached";
pub const KV_CONFLICT: &str = "covey.kv.conflict";
pub const SCRIPTS_CONFLICT: &str = "covey.scripts.conflict";

/// May only the node itself emit `name`?
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(PREFIX)
}

mod refusal;
pub use refusal::reserved_refusal;

/// Where a system event goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// This node's scripts only.
    Local,
    /// This node's scripts and every peer that is up.
    Cluster,
}

/// The scope of a system event by its name; none for a name that is not
/// one of the system events (nothing may emit it).
pub fn scope(name: &str) -> Option<Scope> {
    match name {
        NODE_UP | NODE_DOWN | KV_CONFLICT | SCRIPTS_CONFLICT => Some(Scope::Local),
        SCRIPT_STARTED | SCRIPT_STOPPED | SCRIPT_FAILED | DEVICE_ATTACHED | DEVICE_DETACHED => {
            Some(Scope::Cluster)
        }
        _ => None,
    }
}

/// May `peer` send an event named `name` with `payload`? Plain names, and
/// the system events a node broadcasts about its own scripts and devices
/// (their `node` must be the peer's name).
pub fn peer_may_send(peer: &str, name: &str, payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct About<'a> {
        #[serde(borrow)]
        node: std::borrow::Cow<'a, str>,
    }
    if !is_reserved(name) {
        return true;
    }
    scope(name) == Some(Scope::Cluster)
        && serde_json::from_slice::<About>(payload).is_ok_and(|a| a.node == peer)
}

/// Why a node is seen down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownReason {
    /// The node said it was stopping.
    Shutdown,
    /// No answer within the peer timeout (crashed, powered off, network
    /// gone).
    Timeout,
    /// One side closed the link with an error (protocol, cluster, name).
    Refused,
    /// The node came back as a new process before its old link timed out:
    /// it restarted (its scripts and timers started over).
    Restarted,
    /// The connection ended otherwise (reset, closed here).
    Lost,
}

/// `covey.node.up` / `covey.node.down`: another node, as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    pub node: String,
    /// The address of its link (`IP:port`).
    pub address: String,
    /// When it went up or down, ms since the Unix epoch.
    pub since_ms: u64,
    /// For `down`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DownReason>,
    /// Drops of its link that came back within the flap window and were
    /// not reported, since the last event about it.
    #[serde(default)]
    pub flaps: u32,
    /// True for the `up` events a script gets when it subscribes, about
    /// nodes that were up already.
    #[serde(default)]
    pub replay: bool,
}

/// What made a `covey.script.started`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// First start on this node (node start, or a new file).
    Loaded,
    /// A new version replaced a running one (hot reload).
    Reloaded,
    /// Back after a failure.
    Restarted,
}

/// `covey.script.*`: a script on `node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptEvent {
    pub node: String,
    /// Its path in the scripts directory (`sensors/temp.lua`).
    pub script: String,
    /// Hash (BLAKE3, hex) of the version concerned.
    pub version: String,
    /// Times it was restarted after a failure, on this node.
    pub restarts: u64,
    /// For `started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartKind>,
    /// For `failed`: the export that failed (`init`, `on-event`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
    /// For `failed`: the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `failed`: when it will be started again (ms from now); none
    /// when the previous version keeps running (a reload that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

/// `covey.device.*`: a microcontroller on `node`'s firmware bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub node: String,
    pub device: String,
    pub since_ms: u64,
}

/// `covey.kv.conflict` / `covey.scripts.conflict`: a merge found
/// concurrent writes of one key or file and kept one (the winner).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictEvent {
    /// The key (`kv`) or the path in the scripts directory (`scripts`).
    pub key: String,
    /// The node whose write won (shown to every reader now).
    pub winner: String,
    /// The nodes whose concurrent writes lost.
    pub losers: Vec<String>,
    /// For `scripts`: where the losing version was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

/// The JSON payload of a system event.
pub fn payload(event: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(event).expect("system events serialize")
}

/// A system event, read back with its payload typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SystemEvent {
    NodeUp(NodeEvent),
    NodeDown(NodeEvent),
    ScriptStarted(ScriptEvent),
    ScriptStopped(ScriptEvent),
    ScriptFailed(ScriptEvent),
    DeviceAttached(DeviceEvent),
    DeviceDetached(DeviceEvent),
    KvConflict(ConflictEvent),
    ScriptsConflict(ConflictEvent),
}

impl SystemEvent {
    /// The event named `name` with `payload`; none if it is not a system
    /// event or its payload does not parse.
    pub fn parse(name: &str, payload: &[u8]) -> Option<SystemEvent> {
        fn json<T: for<'de> Deserialize<'de>>(p: &[u8]) -> Option<T> {
            serde_json::from_slice(p).ok()
        }
        Some(match name {
            NODE_UP => SystemEvent::NodeUp(json(payload)?),
            NODE_DOWN => SystemEvent::NodeDown(json(payload)?),
            SCRIPT_STARTED => SystemEvent::ScriptStarted(json(payload)?),
            SCRIPT_STOPPED => SystemEvent::ScriptStopped(json(payload)?),
            SCRIPT_FAILED => SystemEvent::ScriptFailed(json(payload)?),
            DEVICE_ATTACHED => SystemEvent::DeviceAttached(json(payload)?),
            DEVICE_DETACHED => SystemEvent::DeviceDetached(json(payload)?),
            KV_CONFLICT => SystemEvent::KvConflict(json(payload)?),
            SCRIPTS_CONFLICT => SystemEvent::ScriptsConflict(json(payload)?),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_and_what_peers_may_send() {
        assert!(is_reserved("covey.node.up"));
        assert!(is_reserved("covey.anything"));
        assert!(!is_reserved("coveyx.node.up"));
        assert!(!is_reserved("temp"));
        let about_b = br#"{"node": "b", "script": "x.lua"}"#;
        assert!(peer_may_send("b", "temp", b"anything"));
        assert!(peer_may_send("b", SCRIPT_FAILED, about_b));
        assert!(peer_may_send(
            "b",
            DEVICE_ATTACHED,
            br#"{"node":"b","device":"d"}"#
        ));
        assert!(
            !peer_may_send("c", SCRIPT_FAILED, about_b),
            "about another node"
        );
        assert!(!peer_may_send("b", SCRIPT_FAILED, b"not json"));
        assert!(!peer_may_send("b", NODE_DOWN, about_b));
        assert!(!peer_may_send("b", KV_CONFLICT, about_b));
        assert!(!peer_may_send("b", "covey.script.bogus", about_b));
    }

    #[test]
    fn node_event_json_is_the_documented_shape() {
        let e = NodeEvent {
            node: "b".into(),
            address: "10.0.0.2:7466".into(),
            since_ms: 5,
            reason: Some(DownReason::Timeout),
            flaps: 2,
            replay: false,
        };
        let v: serde_json::Value = serde_json::from_slice(&payload(&e)).unwrap();
        assert_eq!(
            SystemEvent::parse(NODE_DOWN, &payload(&e)),
            Some(SystemEvent::NodeDown(e.clone()))
        );
        assert_eq!(SystemEvent::parse("temp", b"{}"), None);
        assert_eq!(
            v,
            serde_json::json!({"node": "b", "address": "10.0.0.2:7466", "since_ms": 5,
                "reason": "timeout", "flaps": 2, "replay": false})
        );
    }
}
