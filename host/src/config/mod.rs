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
use serde::Deserialize;

use crate::cluster::ClusterConfig;
use crate::cluster::credentials::ClusterToken;
use crate::engine::{Precompiled, Target};
use crate::grants::Grants;
use crate::kvdoc::KvLimits;
use crate::services::ScriptLimits;

mod args;
pub use args::*;

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
    /// Changes in the key-value store's history past which it is compacted.
    pub kv_compact_after: Option<usize>,
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
    pub flap_window_ms: Option<u64>,
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
    /// `mqtts://`: the broker's CA instead of the system's roots, and a
    /// client certificate and key (PEM files).
    pub mqtt_ca: Option<PathBuf>,
    pub mqtt_cert: Option<PathBuf>,
    pub mqtt_key: Option<PathBuf>,
    /// The HTTP API's address (off when absent).
    pub http: Option<std::net::SocketAddr>,
    /// Names the HTTP API answers to besides its own addresses (a reverse
    /// proxy's, e.g. `covey.lan`).
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// Capabilities granted to scripts by path pattern (see `grants`).
    #[serde(default)]
    pub grants: serde_json::Value,
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
    /// The HTTP API's address (off by default).
    pub http: Option<std::net::SocketAddr>,
    /// Other names the HTTP API answers to (`Host`); none by default.
    pub http_hosts: Vec<crate::http::HostName>,
    /// Capabilities granted to scripts (none by default).
    pub grants: Grants,
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
            http: None,
            http_hosts: Vec::new(),
            grants: Grants::default(),
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
            mqtt_tls: covey_firmware_bridge::mqtt::TlsFiles {
                ca: file.mqtt_ca.map(in_file),
                cert: file.mqtt_cert.map(in_file),
                key: file.mqtt_key.map(in_file),
            },
        };
        let file_cluster = FileCluster {
            token: file.cluster_token,
            port: file.port,
            listen: file.listen,
            peers: file.peers,
            discovery: file.discovery,
            iface: file.iface,
            peer_timeout_ms: file.peer_timeout_ms,
            flap_window_ms: file.flap_window_ms,
        };
        let mut cfg = NodeConfig::new(&name, scripts_dir, data_dir);
        cfg.limits = limits;
        cfg.max_scripts = file.max_scripts.unwrap_or(cfg.max_scripts).max(1);
        cfg.max_payload = file.max_payload.unwrap_or(cfg.max_payload);
        cfg.kv.quota_keys = file.kv_quota_keys.unwrap_or(cfg.kv.quota_keys);
        cfg.kv.quota_bytes = file.kv_quota_bytes.unwrap_or(cfg.kv.quota_bytes);
        cfg.kv.compact_after = file.kv_compact_after.unwrap_or(cfg.kv.compact_after);
        cfg.extras = file.extras;
        cfg.log = args.log.clone().or(file.log).unwrap_or(cfg.log);
        cfg.cluster = resolve_cluster(args, file_cluster, &cfg.data_dir)?;
        if args.trust_precompiled || file.trust_precompiled == Some(true) {
            cfg.precompiled = Precompiled::Trust;
        }
        cfg.bridge = crate::devices::BridgeSettings::resolve(args, file_bridge)?;
        cfg.http = args.http.or(file.http);
        cfg.http_hosts = (file.http_hosts.iter())
            .map(|h| crate::http::HostName::parse(h))
            .collect::<Result<_>>()?;
        cfg.grants = Grants::parse(&file.grants, crate::capabilities::check_grant)?;
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
    flap_window_ms: Option<u64>,
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
    if let Some(ms) = args.flap_window_ms.or(file.flap_window_ms) {
        if ms > 600_000 {
            bail!("flap_window_ms must be at most 600000, got {ms}");
        }
        c.flap_window = Duration::from_millis(ms);
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
    fn grants_are_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |text: &str| {
            let args = RunArgs {
                config: Some(write(dir.path(), text)),
                ..Default::default()
            };
            NodeConfig::resolve(&args).map_err(|e| format!("{e:#}"))
        };
        let c = resolve("grants:\n  sensors/*.lua: { http: [\"api.example.com\"] }\n").unwrap();
        assert_eq!(
            c.grants.describe("sensors/t.lua"),
            ["http [\"api.example.com\"]"]
        );
        assert!(c.grants.describe("t.lua").is_empty());
        let c = resolve("http_hosts: [covey.lan, \"pi.lan:8080\"]\n").unwrap();
        assert_eq!(c.http_hosts.len(), 2);
        let err = resolve("http_hosts: [\"http://covey.lan\"]\n").unwrap_err();
        assert!(err.contains("http_hosts: `http://covey.lan`"), "{err}");
        let err = resolve("grants:\n  \"*\": { shell: true }\n").unwrap_err();
        assert!(
            err.contains("*: shell: unknown capability `shell`") && err.contains("http"),
            "{err}"
        );
        let err = resolve("grants:\n  a.lua: { http: [\"https://x/api\"] }\n").unwrap_err();
        assert!(err.contains("a.lua: http: host"), "{err}");
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
