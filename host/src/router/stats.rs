//! The router's counters: deliveries, and what became of every event,
//! command and call sent from this node (`covey status`, `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::bindings::{CallError, SendError};

/// Counters visible in `covey status`, the metrics and the benchmarks.
#[derive(Default, Debug)]
pub struct RouterStats {
    /// Deliveries dropped because a script's mailbox was full.
    pub dropped: AtomicU64,
    /// Deliveries queued into mailboxes.
    pub delivered: AtomicU64,
    /// Deliveries taken out of mailboxes and handled (or skipped as stale).
    pub handled: AtomicU64,
    /// Events emitted from this node, by outcome.
    pub events: Outcomes,
    /// Commands sent from this node, by outcome.
    pub commands: Outcomes,
    /// Calls made from this node, by outcome.
    pub calls: Outcomes,
}

/// How a send or call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NoHandler,
    Timeout,
    UnknownNode,
    NodeDown,
    HandlerFailed,
    NoReply,
    PayloadTooLarge,
    InvalidTarget,
    ReservedName,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Ok,
        Outcome::NoHandler,
        Outcome::Timeout,
        Outcome::UnknownNode,
        Outcome::NodeDown,
        Outcome::HandlerFailed,
        Outcome::NoReply,
        Outcome::PayloadTooLarge,
        Outcome::InvalidTarget,
        Outcome::ReservedName,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NoHandler => "no_handler",
            Outcome::Timeout => "timeout",
            Outcome::UnknownNode => "unknown_node",
            Outcome::NodeDown => "node_down",
            Outcome::HandlerFailed => "handler_failed",
            Outcome::NoReply => "no_reply",
            Outcome::PayloadTooLarge => "payload_too_large",
            Outcome::InvalidTarget => "invalid_target",
            Outcome::ReservedName => "reserved_name",
        }
    }

    pub fn of_call<T>(r: &Result<T, CallError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Ok,
            Err(CallError::NoHandler(_)) => Outcome::NoHandler,
            Err(CallError::Timeout) => Outcome::Timeout,
            Err(CallError::UnknownNode(_)) => Outcome::UnknownNode,
            Err(CallError::NodeDown(_)) => Outcome::NodeDown,
            Err(CallError::HandlerFailed(_)) => Outcome::HandlerFailed,
            Err(CallError::NoReply) => Outcome::NoReply,
            Err(CallError::PayloadTooLarge(_)) => Outcome::PayloadTooLarge,
            Err(CallError::InvalidTarget(_)) => Outcome::InvalidTarget,
        }
    }

    pub fn of_send<T>(r: &Result<T, SendError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Ok,
            Err(SendError::UnknownNode(_)) => Outcome::UnknownNode,
            Err(SendError::NodeDown(_)) => Outcome::NodeDown,
            Err(SendError::PayloadTooLarge(_)) => Outcome::PayloadTooLarge,
            Err(SendError::ReservedName(_)) => Outcome::ReservedName,
        }
    }
}

/// One counter per [`Outcome`], lock-free.
#[derive(Default, Debug)]
pub struct Outcomes([AtomicU64; Outcome::ALL.len()]);

impl Outcomes {
    pub fn count(&self, outcome: Outcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, outcome: Outcome) -> u64 {
        self.0[outcome as usize].load(Ordering::Relaxed)
    }
}
