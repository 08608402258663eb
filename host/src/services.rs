//! Node-wide services shared by every script instance.

use std::sync::Arc;
use std::time::Duration;

use crate::grants::Grants;
use crate::kvdoc::KvDoc;
use crate::router::Router;

/// Per-script resource limits applied to every instance.
/// Default CPU budget per callback, in milliseconds: 100 where scripts run
/// as native code; 1000 on 32-bit hosts, where they run in wasmtime's
/// interpreter (Pulley), an order of magnitude slower — the budget is there
/// to stop runaway loops, not to squeeze honest work on a Pi Zero.
pub const DEFAULT_CPU_MS: u64 = if cfg!(target_pointer_width = "32") {
    1000
} else {
    100
};

#[derive(Clone, Debug)]
pub struct ScriptLimits {
    /// Linear memory cap per instance (bytes).
    pub memory_bytes: u64,
    /// CPU budget of one export call.
    pub cpu_budget: Duration,
    /// Messages a script's mailbox holds before new ones are dropped.
    pub mailbox: usize,
    /// Log lines a script may write per second (bursts of twice that);
    /// 0: no limit.
    pub log_rate: u32,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            memory_bytes: 64 << 20,
            cpu_budget: Duration::from_millis(DEFAULT_CPU_MS),
            mailbox: 4096,
            log_rate: 100,
        }
    }
}

pub struct Services {
    pub router: Arc<Router>,
    pub kv: Arc<KvDoc>,
    /// The `extras` map of the node config, for `covey:script/config`.
    pub extras: serde_json::Map<String, serde_json::Value>,
    /// Capabilities the operator granted to scripts, by path pattern.
    pub grants: Grants,
    pub limits: ScriptLimits,
    /// When this node started (ms since the Unix epoch).
    pub started_ms: u64,
    /// Set for `covey exec`: script output goes to this process's stdout
    /// and stderr as plain text, and the script gets these arguments.
    pub console: Option<Console>,
}

/// The terminal a one-shot `covey exec` run talks to.
#[derive(Clone, Debug, Default)]
pub struct Console {
    pub args: Vec<String>,
}
