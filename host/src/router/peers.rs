//! The router's peers, as it sees them: the other nodes (`Remote`, the
//! cluster), this node's devices (`Devices`, the firmware bridge) and the
//! node's own answers (`SystemCalls`, `control::fleet`).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::Message;
use crate::bindings::{CallError, SendError};

/// How this node sees another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerStatus {
    /// Not a member this node has ever seen.
    Unknown,
    /// Known, but no link is up.
    Down,
    Up,
}

pub type CallFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, CallError>> + Send>>;

/// The other nodes, as the router needs them: implemented by the cluster.
pub trait Remote: Send + Sync {
    fn peer(&self, node: &str) -> PeerStatus;
    /// Send an event to every peer that is up.
    fn broadcast_event(&self, msg: &Message);
    /// Send a command to one peer, or to every peer that is up (`None`).
    fn send_command(&self, to: Option<&str>, msg: &Message);
    /// A call to the peer `node`, answered or failed within `timeout`.
    fn call(&self, node: &str, msg: Message, timeout: Duration) -> CallFuture;
    /// Every peer this node knows of (itself excluded).
    fn members(&self) -> Vec<crate::bindings::NodeInfo>;
    /// Hand `deliver` the payload of a `covey.node.up` for every node up
    /// now, with no transition reported meanwhile.
    fn replay_up(&self, deliver: &mut dyn FnMut(Vec<u8>));
}

/// The microcontrollers attached to this node (the firmware bridge), as
/// the router needs them. They are addressed as `NODE/DEVICE`.
pub trait Devices: Send + Sync {
    /// A command for `device`, queued without waiting.
    fn command(&self, device: &str, msg: &Message) -> Result<(), SendError>;
    /// A call to `device`, answered or failed within `timeout`.
    fn call(&self, device: &str, msg: Message, timeout: Duration) -> CallFuture;
}

/// Calls the node answers itself, before any script (names under
/// `covey.node.`): how one node's dashboard or CLI shows the whole cluster
/// (`control::fleet`).
pub trait SystemCalls: Send + Sync {
    /// The answer to the call `name` with `payload`, or none when it is
    /// not a system call.
    fn answer(
        &self,
        name: &str,
        payload: &[u8],
    ) -> Option<Pin<Box<dyn Future<Output = Vec<u8>> + Send>>>;
}

/// The system call that answers this node's scripts as JSON
/// (`{"node", "scripts"}`, as `GET /v1/scripts`).
pub const SYSTEM_SCRIPTS: &str = "covey.node.scripts";
/// The system call that answers this node's recent log lines as JSON
/// (`control::fleet::LogsAsk` in, `LogsAnswer` out).
pub const SYSTEM_LOGS: &str = "covey.node.logs";

/// `NODE/DEVICE` → (`NODE`, `Some(DEVICE)`); anything else → (it, `None`).
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once('/') {
        Some((node, device)) => (node, Some(device)),
        None => (target, None),
    }
}
