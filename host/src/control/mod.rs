//! The local control socket: how `covey status` talks to a running node.
//!
//! A Unix socket in the data directory (`control.sock`): reachable only
//! from this machine, by users who can open the data directory, so there
//! is nothing to authenticate and no TCP port to expose. One request per
//! connection: a line of JSON (the operator's verbs, [`proto`], answered in
//! [`ops`]) or of text (`status`, `device add|remove|list [NAME]`).
//! `covey emit|send|call|kv|nodes|logs` are its clients ([`cli`]).
//!
//! Binding it is also the data directory's lock: a second node started on
//! the same directory finds the socket answering and stops before it
//! touches the store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use covey_firmware_bridge::{Bridge, BridgeStatus};

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::cluster::members::PeerReport;
use crate::devices::registry::{AttachedDevice, DeviceRegistry};
use crate::kvdoc::KvDoc;
use crate::router::Router;
use crate::script::supervisor::ScriptSupervisor;
use crate::scriptsync::ScriptsSync;

pub mod cli;
pub mod fleet;
pub(crate) mod ops;
pub mod proto;
mod render;

pub use render::{human_duration, render, rtt_text};

pub const SOCKET_FILE: &str = "control.sock";

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StatusReport {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub cluster: Option<ClusterReport>,
    /// Scripts running on this node (paths in the scripts directory).
    pub scripts: Vec<String>,
    pub messages_delivered: u64,
    pub messages_handled: u64,
    pub messages_dropped: u64,
    /// Fingerprint of the key-value document's heads: equal on two nodes
    /// means the same contents.
    pub kv_heads: String,
    /// The same for the scripts manifest (clustered nodes only).
    pub scripts_heads: Option<String>,
    /// Scripts manifest entries refused (path against the rule, bad or
    /// oversized entry), by reason: distinct entries since start.
    #[serde(default)]
    pub scripts_refused: BTreeMap<String, u64>,
    /// The firmware bridge's UDP address, when it listens on UDP.
    #[serde(default)]
    pub bridge_udp: Option<String>,
    /// Microcontrollers attached to this node, and refused frames.
    #[serde(default)]
    pub devices: BridgeStatus,
    /// Devices attached to the other nodes, as each last reported them
    /// (through the replicated registry).
    #[serde(default)]
    pub other_devices: BTreeMap<String, Vec<AttachedDevice>>,
    /// The process heap, where the allocator reports it (glibc).
    #[serde(default)]
    pub heap: Option<crate::memory::Heap>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClusterReport {
    pub fingerprint: String,
    pub listen: String,
    pub peers: Vec<PeerReport>,
}

/// Where the status comes from.
pub struct StatusSource {
    pub router: Arc<Router>,
    pub supervisor: Arc<ScriptSupervisor>,
    pub kv: Arc<KvDoc>,
    pub scripts_sync: Option<Arc<ScriptsSync>>,
    pub cluster: Option<Cluster>,
    pub devices: Option<DevicesView>,
    pub started_ms: u64,
    /// Sync bytes per replicated document (clustered nodes only).
    pub sync_counters: Vec<(&'static str, Arc<crate::docsync::SyncCounters>)>,
}

/// The device registry and bridge, as the control socket needs them.
pub struct DevicesView {
    pub registry: Arc<DeviceRegistry>,
    pub bridge: Bridge,
    pub udp: Option<std::net::SocketAddr>,
}

impl StatusSource {
    pub fn report(&self) -> StatusReport {
        let stats = &self.router.stats;
        StatusReport {
            node: self.router.node_name().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime_ms: now_ms().saturating_sub(self.started_ms),
            cluster: self.cluster.as_ref().map(|c| ClusterReport {
                fingerprint: c.fingerprint().to_string(),
                listen: c.local_addr().to_string(),
                peers: c.peers(),
            }),
            scripts: self
                .router
                .scripts()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            messages_delivered: stats.delivered.load(Ordering::Relaxed),
            messages_handled: stats.handled.load(Ordering::Relaxed),
            messages_dropped: stats.dropped.load(Ordering::Relaxed),
            kv_heads: heads_fingerprint(&self.kv.heads()),
            scripts_heads: self
                .scripts_sync
                .as_ref()
                .map(|s| heads_fingerprint(&s.heads())),
            scripts_refused: self
                .scripts_sync
                .as_ref()
                .map(|s| {
                    s.refused()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                })
                .unwrap_or_default(),
            bridge_udp: (self.devices.as_ref())
                .and_then(|d| d.udp)
                .map(|a| a.to_string()),
            devices: (self.devices.as_ref())
                .map(|d| d.bridge.status())
                .unwrap_or_default(),
            other_devices: (self.devices.as_ref())
                .map(|d| {
                    let mut all = d.registry.attached();
                    all.remove(self.router.node_name());
                    all.retain(|_, list| !list.is_empty());
                    all
                })
                .unwrap_or_default(),
            heap: crate::memory::heap(),
        }
    }

    /// `device add|remove|list [NAME]`: the answer as JSON.
    async fn device(&self, args: &str) -> Result<serde_json::Value> {
        let Some(d) = &self.devices else {
            bail!("this node has no device registry");
        };
        let (verb, name) = args.split_once(' ').unwrap_or((args, ""));
        crate::devices::cli::answer(&d.registry, verb, name.trim()).await
    }
}

fn heads_fingerprint(heads: &[automerge::ChangeHash]) -> String {
    let mut sorted: Vec<_> = heads.iter().map(|h| h.0).collect();
    sorted.sort();
    let mut hasher = blake3::Hasher::new();
    for h in &sorted {
        hasher.update(h);
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// A bound control socket, not yet answering.
pub struct ControlBinding {
    listener: UnixListener,
    path: PathBuf,
}

/// An answering control socket; removed when dropped.
pub struct ControlSocket {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl ControlSocket {
    pub fn bind(data_dir: &Path) -> Result<ControlBinding> {
        let path = data_dir.join(SOCKET_FILE);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                bail!(
                    "another covey node is running with data directory {} \
                     (each node needs its own --data)",
                    data_dir.display()
                );
            }
            // Left by a node that did not exit cleanly.
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        // Owner-only, like everything in the data directory.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} owner-only", path.display()))?;
        Ok(ControlBinding { listener, path })
    }
}

impl ControlBinding {
    pub fn serve(self, source: Arc<StatusSource>) -> ControlSocket {
        let listener = self.listener;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let source = source.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &source).await {
                        tracing::debug!("control request failed: {e:#}");
                    }
                });
            }
        });
        ControlSocket {
            task,
            path: self.path,
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn answer(stream: UnixStream, source: &StatusSource) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let line = proto::read_line(&mut read).await?.unwrap_or_default();
    if line.starts_with('{') {
        let req = match serde_json::from_str::<proto::Request>(&line) {
            Ok(req) => req,
            Err(e) => {
                let failure = proto::Failure::new(
                    proto::FailureKind::BadRequest,
                    format!("malformed request: {e}"),
                );
                let answer = proto::Answer {
                    error: Some(failure),
                    ..Default::default()
                };
                write.write_all(&proto::line(&answer)?).await?;
                return Ok(());
            }
        };
        ops::handle(source, req, &mut read, &mut write).await?;
        write.shutdown().await?;
        return Ok(());
    }
    let reply = match line.trim() {
        "status" => serde_json::to_string(&source.report())?,
        other if other.starts_with("device ") => {
            let answer = match source.device(&other["device ".len()..]).await {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            };
            serde_json::to_string(&answer)?
        }
        other => serde_json::to_string(&serde_json::json!({
            "error": format!("unknown request {other:?}")
        }))?,
    };
    write.write_all(reply.as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Ask the node running on `data_dir` for its status.
pub async fn fetch_status(data_dir: &Path) -> Result<StatusReport> {
    let text = request(data_dir, "status").await?;
    serde_json::from_str(&text).with_context(|| format!("unexpected answer from the node: {text}"))
}

/// One request to the node running on `data_dir`; its JSON answer.
pub async fn request(data_dir: &Path, line: &str) -> Result<String> {
    let mut stream = proto::connect(data_dir).await?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}
