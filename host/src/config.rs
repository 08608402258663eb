//! Command line, environment and config file, merged into one `NodeConfig`.
//!
//! Precedence, highest first: command-line flags, `COVEY_*` environment
//! variables, the YAML config file, built-in defaults. The file accepts
//! esc's keys (`node`, `port`, `discovery`, `scripts`, `iface`, `extras`) so
//! existing esc configs work, plus Covey's own; unknown keys are an error
//! (a typo should not silently fall back to a default).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::cluster::ClusterConfig;
use crate::cluster::credentials::ClusterToken;
use crate::engine::{Precompiled, Target};
use crate::kvdoc::KvLimits;
use crate::services::ScriptLimits;

#[derive(Parser, Debug)]
#[command(
    name = "covey",
    version,
    about = "Covey: run sandboxed WebAssembly scripts on every machine of a small fleet",
    long_about = "Covey runs WebAssembly components dropped into a scripts directory, each \
        in its own sandbox (memory and CPU limits, no file system, network or environment \
        access), hot-reloads them when the file changes, and lets them talk through events, \
        commands, calls, timers and a replicated key-value store."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: load every script in the scripts directory and watch it.
    Run(Box<RunArgs>),
    /// Run one script once, in the same sandbox, with its output on this
    /// terminal: a `.lua` file runs top to bottom (plain Lua programs work),
    /// a `.wasm` component runs its `init`. Exits non-zero on failure.
    Exec(ExecArgs),
    /// Create or join a cluster (the token every node needs).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Show the running node on this machine: peers, their state and
    /// round-trip time, and the scripts it runs.
    Status(StatusArgs),
    /// Precompile a component for a (slower) machine, e.g. a Pi Zero:
    /// writes NAME.<target>.cwasm beside it, which nodes of that target
    /// with `trust_precompiled: true` load instead of compiling.
    Compile(crate::compile::CompileArgs),
    /// Microcontrollers on the bus (firmware bridge): register, list, remove.
    #[command(subcommand)]
    Device(crate::devices::cli::DeviceCommand),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Create a new cluster: make a secret token, save it in this node's
    /// data directory and print it for the other nodes.
    Init(DataArg),
    /// Join a cluster: save the token printed by `covey cluster init` in
    /// this node's data directory. Restart `covey run` afterwards.
    Join {
        /// The token (`covey1-…`)
        token: String,
        #[command(flatten)]
        data: DataArg,
    },
    /// Print the token saved in this node's data directory.
    Token(DataArg),
}

#[derive(Args, Debug, Clone)]
pub struct DataArg {
    /// Data directory [default: the platform data directory]
    #[arg(long, env = "COVEY_DATA")]
    pub data: Option<PathBuf>,
}

impl DataArg {
    pub fn dir(&self) -> PathBuf {
        self.data.clone().unwrap_or_else(default_data_dir)
    }
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub data: DataArg,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// The script: a `.lua` file or a `.wasm` component
    pub file: PathBuf,
    /// Arguments for the script (Lua's `arg` table and `...`)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Node name the script sees [default: the host name]
    #[arg(long, env = "COVEY_NODE")]
    pub node: Option<String>,
    /// CPU budget for the run in milliseconds
    #[arg(long, default_value_t = 60_000)]
    pub cpu_ms: u64,
    /// Memory cap in MiB
    #[arg(long, default_value_t = 64)]
    pub memory_mb: u64,
    /// Data directory, for the compiled-code cache [default: the platform data directory]
    #[arg(long, env = "COVEY_DATA")]
    pub data: Option<PathBuf>,
}

impl ExecArgs {
    pub fn options(&self) -> Result<crate::exec::ExecOptions> {
        let node = match &self.node {
            Some(n) => n.clone(),
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        validate_node_name(&node)?;
        if self.memory_mb == 0 || self.memory_mb > 4096 || self.cpu_ms == 0 {
            bail!("--memory-mb must be 1..=4096 and --cpu-ms at least 1");
        }
        let limits = ScriptLimits {
            memory_bytes: self.memory_mb << 20,
            cpu_budget: Duration::from_millis(self.cpu_ms),
            ..ScriptLimits::default()
        };
        let data = self.data.clone().unwrap_or_else(default_data_dir);
        Ok(crate::exec::ExecOptions {
            node,
            limits,
            cache_dir: Some(data.join("cache")),
            args: self.args.clone(),
        })
    }
}

#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// This node's name, unique in the cluster [default: the host name]
    #[arg(long, env = "COVEY_NODE")]
    pub node: Option<String>,
    /// Directory of scripts (`*.wasm`, `*.lua`), watched recursively [default: ./scripts]
    #[arg(long, env = "COVEY_SCRIPTS")]
    pub scripts: Option<PathBuf>,
    /// Directory for the key-value store and the compiled-code cache
    /// [default: the platform data directory, e.g. ~/.local/share/covey]
    #[arg(long, env = "COVEY_DATA")]
    pub data: Option<PathBuf>,
    /// YAML config file (keys: node, port, discovery, scripts, iface, extras,
    /// data, memory_mb, cpu_ms, max_scripts, max_payload, mailbox, log,
    /// log_rate, kv_quota_keys, kv_quota_bytes, cluster_token, listen, peers,
    /// peer_timeout_ms, trust_precompiled, bridge_udp, bridge_serial,
    /// bridge_rate, mqtt, mqtt_username, mqtt_password, mqtt_prefix)
    #[arg(long, env = "COVEY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Memory cap per script in MiB [default: 64]
    #[arg(long, env = "COVEY_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// CPU budget per script callback in milliseconds (init gets 10x) [default:
    /// 100; 1000 on 32-bit machines, which interpret scripts]
    #[arg(long, env = "COVEY_CPU_MS")]
    pub cpu_ms: Option<u64>,
    /// Log filter, e.g. `info` or `covey=debug,script=trace` [default: info]
    #[arg(long, env = "COVEY_LOG")]
    pub log: Option<String>,
    /// Cluster token from `covey cluster init` [default: the one saved by
    /// `covey cluster join` in the data directory; none: a single node]
    #[arg(long, env = "COVEY_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// UDP port for cluster links [default: 7466]
    #[arg(long, env = "COVEY_PORT")]
    pub port: Option<u16>,
    /// Address to accept cluster links on [default: `::`, all IPv4 and IPv6]
    #[arg(long, env = "COVEY_LISTEN")]
    pub listen: Option<IpAddr>,
    /// A peer to link to, `host:port` (repeatable; for networks without
    /// multicast). Re-dialled while down; peers share their peers.
    #[arg(long = "peer", env = "COVEY_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Peer discovery: `mdns` or `off` [default: mdns]
    #[arg(long, env = "COVEY_DISCOVERY")]
    pub discovery: Option<String>,
    /// Network interface for mDNS (repeatable) [default: all]
    #[arg(long, env = "COVEY_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// A peer silent for this long is marked down [default: 3000]
    #[arg(long, env = "COVEY_PEER_TIMEOUT_MS")]
    pub peer_timeout_ms: Option<u64>,
    /// Load `NAME.<target>.cwasm` artifacts (from `covey compile`) found
    /// beside components instead of compiling: only where every node that
    /// can write the scripts directory is trusted with native code
    #[arg(long, env = "COVEY_TRUST_PRECOMPILED")]
    pub trust_precompiled: bool,
    /// Accept microcontrollers (firmware bridge) on this UDP address, e.g.
    /// `0.0.0.0:7468` [default: off]
    #[arg(long, env = "COVEY_BRIDGE_UDP")]
    pub bridge_udp: Option<std::net::SocketAddr>,
    /// A serial port with a microcontroller, `DEVICE@BAUD` (repeatable)
    #[arg(
        long = "bridge-serial",
        env = "COVEY_BRIDGE_SERIAL",
        value_delimiter = ','
    )]
    pub bridge_serial: Vec<String>,
    /// Bridge events to an MQTT broker, `mqtt://HOST[:PORT]`
    #[arg(long, env = "COVEY_MQTT")]
    pub mqtt: Option<String>,
}

/// The YAML config file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node: Option<String>,
    /// Cluster port (used by clustering).
    pub port: Option<u16>,
    /// Peer discovery setting (used by clustering).
    pub discovery: Option<serde_json::Value>,
    pub scripts: Option<PathBuf>,
    /// Network interface(s) for clustering.
    pub iface: Option<serde_json::Value>,
    /// Free-form settings scripts read with `config.get`.
    #[serde(default)]
    pub extras: serde_json::Map<String, serde_json::Value>,
    pub data: Option<PathBuf>,
    pub memory_mb: Option<u64>,
    pub cpu_ms: Option<u64>,
    pub max_scripts: Option<u32>,
    /// Maximum message payload in bytes.
    pub max_payload: Option<usize>,
    /// Mailbox capacity per script (messages).
    pub mailbox: Option<usize>,
    /// Log lines per second per script (0: no limit).
    pub log_rate: Option<u32>,
    /// Keys one script may hold in the key-value store.
    pub kv_quota_keys: Option<u64>,
    /// Bytes (keys + values) one script may hold in the key-value store.
    pub kv_quota_bytes: Option<u64>,
    pub log: Option<String>,
    /// Cluster token (prefer `covey cluster join`, which keeps it in the
    /// data directory with owner-only permissions).
    pub cluster_token: Option<String>,
    /// Address to accept cluster links on.
    pub listen: Option<IpAddr>,
    /// Static peers, `host:port`.
    #[serde(default)]
    pub peers: Vec<String>,
    pub peer_timeout_ms: Option<u64>,
    /// Load precompiled artifacts beside components (see `RunArgs`).
    pub trust_precompiled: Option<bool>,
    /// Firmware bridge: UDP address, serial ports, frames/s per device.
    pub bridge_udp: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub bridge_serial: Vec<String>,
    pub bridge_rate: Option<u32>,
    /// MQTT broker (`mqtt://HOST[:PORT]`), credentials, topic prefix.
    pub mqtt: Option<String>,
    pub mqtt_username: Option<String>,
    pub mqtt_password: Option<String>,
    pub mqtt_prefix: Option<String>,
}

/// Everything a node needs to start, resolved.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub name: String,
    pub scripts_dir: PathBuf,
    pub data_dir: PathBuf,
    pub limits: ScriptLimits,
    pub max_scripts: u32,
    pub max_payload: usize,
    /// Key-value limits and per-script quotas.
    pub kv: KvLimits,
    pub extras: serde_json::Map<String, serde_json::Value>,
    pub log: String,
    /// Watch the scripts directory for changes (tests may turn it off).
    pub watch: bool,
    /// Clustering, when this node has a cluster token; none: single node.
    pub cluster: Option<ClusterConfig>,
    /// Use `covey compile` artifacts found beside components.
    pub precompiled: Precompiled,
    /// What the engine compiles for: this machine, except in tests that
    /// run scripts on the Pulley interpreter (`Target::for_machine("pulley64")`).
    pub engine_target: Target,
    /// The firmware bridge's transports (all off by default).
    pub bridge: crate::devices::BridgeSettings,
}

impl NodeConfig {
    /// Defaults for a node called `name` with the given directories.
    pub fn new(name: &str, scripts_dir: PathBuf, data_dir: PathBuf) -> Self {
        NodeConfig {
            name: name.to_string(),
            scripts_dir,
            data_dir,
            limits: ScriptLimits::default(),
            max_scripts: 64,
            max_payload: 1 << 20,
            kv: KvLimits::default(),
            extras: Default::default(),
            log: "info".into(),
            watch: true,
            cluster: None,
            precompiled: Precompiled::Ignore,
            engine_target: Target::Host,
            bridge: Default::default(),
        }
    }

    /// Merge flags/env (`args`) over the config file over defaults.
    pub fn resolve(args: &RunArgs) -> Result<Self> {
        let (file, base) = match &args.config {
            Some(path) => (
                read_file_config(path)?,
                path.parent().map(Path::to_path_buf),
            ),
            None => (FileConfig::default(), None),
        };
        let in_file = |p: PathBuf| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let name = match args.node.clone().or(file.node) {
            Some(n) => n,
            None => gethostname::gethostname().to_string_lossy().into_owned(),
        };
        validate_node_name(&name)?;
        let scripts_dir = args
            .scripts
            .clone()
            .or(file.scripts.map(in_file))
            .unwrap_or_else(|| PathBuf::from("scripts"));
        let data_dir = match args.data.clone().or(file.data.map(in_file)) {
            Some(d) => d,
            None => default_data_dir(),
        };
        let mut limits = ScriptLimits::default();
        if let Some(mb) = args.memory_mb.or(file.memory_mb) {
            if mb == 0 || mb > 4096 {
                bail!("memory_mb must be between 1 and 4096, got {mb}");
            }
            limits.memory_bytes = mb << 20;
        }
        if let Some(ms) = args.cpu_ms.or(file.cpu_ms) {
            if ms == 0 {
                bail!("cpu_ms must be at least 1");
            }
            limits.cpu_budget = Duration::from_millis(ms);
        }
        if let Some(m) = file.mailbox {
            limits.mailbox = m.max(1);
        }
        limits.log_rate = file.log_rate.unwrap_or(limits.log_rate);
        let file_bridge = crate::devices::FileBridge {
            udp: file.bridge_udp,
            serial: file.bridge_serial,
            rate: file.bridge_rate,
            mqtt: file.mqtt,
            mqtt_username: file.mqtt_username,
            mqtt_password: file.mqtt_password,
            mqtt_prefix: file.mqtt_prefix,
        };
        let file_cluster = FileCluster {
            token: file.cluster_token,
            port: file.port,
            listen: file.listen,
            peers: file.peers,
            discovery: file.discovery,
            iface: file.iface,
            peer_timeout_ms: file.peer_timeout_ms,
        };
        let mut cfg = NodeConfig::new(&name, scripts_dir, data_dir);
        cfg.limits = limits;
        cfg.max_scripts = file.max_scripts.unwrap_or(cfg.max_scripts).max(1);
        cfg.max_payload = file.max_payload.unwrap_or(cfg.max_payload);
        cfg.kv.quota_keys = file.kv_quota_keys.unwrap_or(cfg.kv.quota_keys);
        cfg.kv.quota_bytes = file.kv_quota_bytes.unwrap_or(cfg.kv.quota_bytes);
        cfg.extras = file.extras;
        cfg.log = args.log.clone().or(file.log).unwrap_or(cfg.log);
        cfg.cluster = resolve_cluster(args, file_cluster, &cfg.data_dir)?;
        if args.trust_precompiled || file.trust_precompiled == Some(true) {
            cfg.precompiled = Precompiled::Trust;
        }
        cfg.bridge = crate::devices::BridgeSettings::resolve(args, file_bridge)?;
        Ok(cfg)
    }
}

/// The config file's cluster keys.
struct FileCluster {
    token: Option<String>,
    port: Option<u16>,
    listen: Option<IpAddr>,
    peers: Vec<String>,
    discovery: Option<serde_json::Value>,
    iface: Option<serde_json::Value>,
    peer_timeout_ms: Option<u64>,
}

fn resolve_cluster(
    args: &RunArgs,
    file: FileCluster,
    data_dir: &Path,
) -> Result<Option<ClusterConfig>> {
    let token = match args.cluster_token.clone().or(file.token) {
        Some(t) => Some(ClusterToken::parse(&t).context("in the cluster token")?),
        None => ClusterToken::load(data_dir)?,
    };
    let peers = if args.peers.is_empty() {
        file.peers
    } else {
        args.peers.clone()
    };
    let mdns = match args.discovery.clone() {
        Some(d) => parse_discovery(&serde_json::Value::String(d))?,
        None => match &file.discovery {
            Some(v) => parse_discovery(v)?,
            None => None,
        },
    };
    let ifaces = if args.iface.is_empty() {
        match file.iface {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::String(s)) => vec![s],
            Some(serde_json::Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    serde_json::Value::String(s) => Ok(s),
                    other => bail!("iface: expected interface names, got {other}"),
                })
                .collect::<Result<_>>()?,
            Some(other) => bail!("iface: expected a name or a list of names, got {other}"),
        }
    } else {
        args.iface.clone()
    };
    let port = args.port.or(file.port);
    let Some(token) = token else {
        if !peers.is_empty() || port.is_some() || mdns == Some(true) || !ifaces.is_empty() {
            bail!(
                "cluster settings are given but this node has no cluster token: run \
                 `covey cluster init` on one node and `covey cluster join TOKEN` on the \
                 others (or pass --cluster-token)"
            );
        }
        return Ok(None);
    };
    for p in &peers {
        if !p.contains(':') {
            bail!("peer {p:?}: expected host:port");
        }
    }
    // Defaults (bind address, port, mDNS on) are `ClusterConfig::new`'s.
    let mut c = ClusterConfig::new(token);
    if let Some(ip) = args.listen.or(file.listen) {
        c.bind.set_ip(ip);
    }
    if let Some(port) = port {
        c.bind.set_port(port);
    }
    if let Some(on) = mdns {
        c.mdns = on;
    }
    c.peers = peers;
    c.ifaces = ifaces;
    if let Some(ms) = args.peer_timeout_ms.or(file.peer_timeout_ms) {
        if !(300..=600_000).contains(&ms) {
            bail!("peer_timeout_ms must be between 300 and 600000, got {ms}");
        }
        c.peer_timeout = Duration::from_millis(ms);
    }
    Ok(Some(c))
}

/// esc's `discovery` key: true/false, or `mdns`/`off`.
fn parse_discovery(v: &serde_json::Value) -> Result<Option<bool>> {
    Ok(match v {
        serde_json::Value::Null => None,
        serde_json::Value::Bool(b) => Some(*b),
        serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "mdns" | "on" | "true" | "auto" => Some(true),
            "off" | "none" | "false" | "static" => Some(false),
            _ => bail!("discovery: expected `mdns` or `off`, got {s:?}"),
        },
        other => bail!("discovery: expected `mdns` or `off`, got {other}"),
    })
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml_ng::from_str(&text).with_context(|| format!("in config file {}", path.display()))
}

pub fn default_data_dir() -> PathBuf {
    directories::ProjectDirs::from("", "", "covey")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("covey-data"))
}

/// Node names appear in patterns, targets and certificates: keep them plain.
pub fn validate_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        bail!(
            "invalid node name {name:?}: use 1-63 letters, digits, '-', '_' or '.' (not first) \
             (set it with --node or COVEY_NODE)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("covey.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn cli_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write(
            dir.path(),
            "node: from-file\nscripts: s\ncpu_ms: 50\nextras:\n  greeting: hi\n  n: 3\n",
        );
        let args = RunArgs {
            node: Some("from-cli".into()),
            config: Some(cfg),
            ..Default::default()
        };
        let c = NodeConfig::resolve(&args).unwrap();
        assert_eq!(c.name, "from-cli");
        assert_eq!(c.scripts_dir, dir.path().join("s"));
        assert_eq!(c.limits.cpu_budget, Duration::from_millis(50));
        assert_eq!(c.limits.memory_bytes, 64 << 20);
        assert_eq!(c.extras["greeting"], "hi");
        assert_eq!(c.extras["n"], 3);
    }

    #[test]
    fn esc_keys_are_accepted_and_typos_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let token = ClusterToken::generate().encode();
        let ok = write(
            dir.path(),
            &format!("node: a\nport: 7000\ndiscovery: true\niface: eth0\ncluster_token: {token}\n"),
        );
        let args = RunArgs {
            config: Some(ok),
            ..Default::default()
        };
        let c = NodeConfig::resolve(&args).unwrap().cluster.unwrap();
        assert_eq!(c.bind.port(), 7000);
        assert!(c.mdns);
        assert_eq!(c.ifaces, ["eth0"]);
        // Cluster settings without a token are an error, not ignored.
        let no_token = write(dir.path(), "node: a\nport: 7000\ndata: d\n");
        let args = RunArgs {
            config: Some(no_token),
            ..Default::default()
        };
        let err = format!("{:#}", NodeConfig::resolve(&args).unwrap_err());
        assert!(err.contains("covey cluster init"), "{err}");
        let bad = write(dir.path(), "node: a\nscirpts: x\n");
        let args = RunArgs {
            config: Some(bad),
            ..Default::default()
        };
        let err = format!("{:#}", NodeConfig::resolve(&args).unwrap_err());
        assert!(err.contains("scirpts"), "{err}");
    }

    #[test]
    fn config_help_lists_every_file_key() {
        use clap::CommandFactory;
        let err = serde_yaml_ng::from_str::<FileConfig>("nope: 1")
            .unwrap_err()
            .to_string();
        let keys = err
            .split("expected one of ")
            .nth(1)
            .expect("serde lists the keys");
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let config = run
            .get_arguments()
            .find(|a| a.get_id() == "config")
            .unwrap();
        let help = config.get_help().unwrap().to_string();
        for key in keys
            .split(", ")
            .map(|k| k.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_'))
        {
            assert!(help.contains(key), "--config help misses `{key}`: {help}");
        }
    }

    #[test]
    fn bad_node_names_are_refused() {
        assert!(validate_node_name("pi-kitchen.1").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name("*").is_err());
        assert!(validate_node_name("a b").is_err());
        assert!(validate_node_name("..").is_err());
        assert!(validate_node_name("../x").is_err());
    }
}
