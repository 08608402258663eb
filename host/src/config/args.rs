//! The command line: `covey`'s subcommands and their flags (clap). What a
//! node's flags mean once merged with the environment and the config file
//! is `NodeConfig`'s business (the parent module).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use super::{default_data_dir, validate_node_name};
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
    #[command(flatten)]
    Operator(crate::control::cli::OperatorCommand),
    /// The HTTP API's bearer token (needed when it listens on an address
    /// other than loopback).
    #[command(subcommand)]
    Http(HttpCommand),
}

#[derive(Subcommand, Debug)]
pub enum HttpCommand {
    /// Print the HTTP API's token, making one if there is none (a running
    /// node reads it when it starts).
    Token(DataArg),
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
    /// Grant the script outgoing HTTP to HOST (or HOST:PORT, `*.domain`);
    /// repeatable. Nothing is granted otherwise
    #[arg(long = "http", value_name = "HOST")]
    pub http: Vec<String>,
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
            grants: self.grants()?,
        })
    }

    /// `--http HOST...` as the grant of a node config (`"*": { http: [...] }`).
    fn grants(&self) -> Result<crate::grants::Grants> {
        if self.http.is_empty() {
            return Ok(Default::default());
        }
        let rules = serde_json::json!({ "*": { "http": self.http } });
        Ok(crate::grants::Grants::parse(
            &rules,
            crate::capabilities::check_grant,
        )?)
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
    /// log_rate, kv_quota_keys, kv_quota_bytes, kv_compact_after, cluster_token,
    /// listen, peers,
    /// peer_timeout_ms, flap_window_ms, trust_precompiled, bridge_udp, bridge_serial,
    /// bridge_rate, mqtt, mqtt_username, mqtt_password, mqtt_prefix, mqtt_ca,
    /// mqtt_cert, mqtt_key, http,
    /// http_hosts: other names the HTTP API answers to, grants: script path
    /// patterns to granted capabilities)
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
    /// A link that drops and returns within this long is not reported to
    /// scripts as `covey.node.down` (0: report every drop) [default: 5000]
    #[arg(long, env = "COVEY_FLAP_WINDOW_MS")]
    pub flap_window_ms: Option<u64>,
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
    /// Serve the HTTP API on this address, e.g. `127.0.0.1:7467` (any
    /// other than loopback needs `covey http token` first) [default: off]
    #[arg(long, env = "COVEY_HTTP")]
    pub http: Option<std::net::SocketAddr>,
}
