//! `covey emit|send|call|kv|nodes|logs`: the operator's verbs, run
//! against the node on this machine through its control socket.
//!
//! Payloads come from the argument or, with `-`, from standard input;
//! replies and values go to standard output as they are (bytes, not
//! text), so `covey call pi read-sensor > reading.bin` works. `--json`
//! prints JSON instead. A failed request exits with its own code (see
//! [`FailureKind::exit_code`]): scripts can tell a timeout from a missing
//! handler.

use std::io::{IsTerminal, Read, Write};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::fleet::Nodes;
use super::proto::{self, Bytes, EventItem, Failure, KvChange, Request};
use crate::config::DataArg;
use crate::logring::{LogLine, LogQuery};
use crate::script::supervisor::ScriptInfo;

/// Longest payload read from standard input (the node has its own,
/// smaller, limit: `max_payload`).
const MAX_STDIN: u64 = 64 << 20;

#[derive(Subcommand, Debug)]
pub enum OperatorCommand {
    /// Emit an event from this node to every script in the cluster.
    Emit {
        name: String,
        /// The payload; `-` reads it from standard input [default: empty]
        payload: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Send a command to a node (`*`: every node; `NODE/DEVICE`: a
    /// microcontroller). Every matching handler there gets it.
    Send {
        target: String,
        name: String,
        /// The payload; `-` reads it from standard input [default: empty]
        payload: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Call a node's (or device's) handler and print its reply. Exit codes:
    /// 3 no handler, 4 timeout, 5 node down, 6 unknown node, 7 payload too
    /// large, 8 handler failed.
    Call {
        target: String,
        name: String,
        /// The payload; `-` reads it from standard input [default: empty]
        payload: Option<String>,
        /// How long to wait for the reply
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[command(flatten)]
        out: Out,
    },
    /// The replicated key-value store.
    #[command(subcommand)]
    Kv(KvCommand),
    /// The cluster's members as this node sees them.
    Nodes {
        /// Stop counting NODE as a member of the key-value store (a node
        /// removed for good: compaction waits for every member). It must
        /// be down; it becomes a member again if it ever comes back.
        #[arg(long, value_name = "NODE")]
        forget: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Scripts: state, version, restarts, last error, memory, time in
    /// callbacks, messages handled and dropped (this node's, or with
    /// --node / --all-nodes other nodes', asked over the cluster links).
    Scripts {
        #[command(flatten)]
        nodes: NodesArg,
        #[command(flatten)]
        out: Out,
    },
    /// The node's recent log lines (its own and its scripts').
    Logs(LogsArgs),
    /// Print events as they happen (names matching PATTERN, `*` wildcards).
    Events {
        #[arg(default_value = "*")]
        pattern: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Print a key's value (exit code 9 when there is no such key).
    Get {
        key: String,
        #[command(flatten)]
        out: Out,
    },
    /// Set a key (`-`: the value from standard input).
    Set {
        key: String,
        value: String,
        #[command(flatten)]
        out: Out,
    },
    /// Delete a key.
    Del {
        key: String,
        #[command(flatten)]
        out: Out,
    },
    /// List keys (under PREFIX).
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        out: Out,
    },
    /// Print changes under PREFIX as they happen, on any node.
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep printing new lines as they come
    #[arg(short, long)]
    pub follow: bool,
    /// Only this script's lines (its path in the scripts directory)
    #[arg(long)]
    pub script: Option<String>,
    /// Only lines newer than this: `30s`, `10m`, `2h`, `1d`
    #[arg(long)]
    pub since: Option<String>,
    /// Only the last N lines
    #[arg(short = 'n', long)]
    pub tail: Option<u64>,
    #[command(flatten)]
    pub nodes: NodesArg,
    #[command(flatten)]
    pub out: Out,
}

/// Which nodes to ask (default: the node on this machine).
#[derive(Args, Debug)]
pub struct NodesArg {
    /// Ask this node of the cluster (over the cluster link)
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Ask this node and every peer that is up
    #[arg(long, conflicts_with = "node")]
    pub all_nodes: bool,
}

impl NodesArg {
    pub fn nodes(&self) -> Nodes {
        match (&self.node, self.all_nodes) {
            (_, true) => Nodes::All,
            (Some(n), false) => Nodes::One(n.clone()),
            (None, false) => Nodes::Here,
        }
    }
}

/// Where the node is and how to print.
#[derive(Args, Debug)]
pub struct Out {
    #[command(flatten)]
    pub data: DataArg,
    /// Print JSON (one object per line for streams)
    #[arg(long)]
    pub json: bool,
}

/// Run one verb; the process's exit code.
pub fn run(cmd: OperatorCommand) -> Result<i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run_async(cmd))
}

async fn run_async(cmd: OperatorCommand) -> Result<i32> {
    use OperatorCommand as C;
    match cmd {
        C::Emit { name, payload, out } => {
            let payload = payload_arg(payload.as_deref())?;
            let len = payload.len() as u64;
            once(&out, Request::Emit { name, len }, &payload, Print::Quiet).await
        }
        C::Send {
            target,
            name,
            payload,
            out,
        } => {
            let payload = payload_arg(payload.as_deref())?;
            let len = payload.len() as u64;
            let req = Request::Send { target, name, len };
            once(&out, req, &payload, Print::Quiet).await
        }
        C::Call {
            target,
            name,
            payload,
            timeout_ms,
            out,
        } => {
            let payload = payload_arg(payload.as_deref())?;
            let len = payload.len() as u64;
            let req = Request::Call {
                target,
                name,
                len,
                timeout_ms,
            };
            once(&out, req, &payload, Print::Bytes("reply")).await
        }
        C::Kv(kv) => run_kv(kv).await,
        C::Nodes {
            forget: Some(node),
            out,
        } => once(&out, Request::ForgetNode { node }, &[], Print::Quiet).await,
        C::Nodes { forget: None, out } => once(&out, Request::Nodes, &[], Print::Nodes).await,
        C::Scripts { nodes, out } => {
            let req = Request::Scripts {
                nodes: nodes.nodes(),
            };
            once(&out, req, &[], Print::Scripts).await
        }
        C::Logs(args) => logs(args).await,
        C::Events { pattern, out } => stream(&out, Request::Events { pattern }, print_event).await,
    }
}

async fn run_kv(cmd: KvCommand) -> Result<i32> {
    match cmd {
        KvCommand::Get { key, out } => {
            once(&out, Request::KvGet { key }, &[], Print::Bytes("value")).await
        }
        KvCommand::Set { key, value, out } => {
            let value = payload_arg(Some(&value))?;
            let len = value.len() as u64;
            once(&out, Request::KvSet { key, len }, &value, Print::Quiet).await
        }
        KvCommand::Del { key, out } => once(&out, Request::KvDel { key }, &[], Print::Quiet).await,
        KvCommand::Ls { prefix, out } => {
            once(&out, Request::KvLs { prefix }, &[], Print::Keys).await
        }
        KvCommand::Watch { prefix, out } => {
            stream(&out, Request::KvWatch { prefix }, print_change).await
        }
    }
}

/// What a successful one-shot answer prints (without `--json`).
enum Print {
    Quiet,
    /// The answer's bytes, raw; named so in `--json`.
    Bytes(&'static str),
    Keys,
    Nodes,
    Scripts,
}

async fn once(out: &Out, req: Request, payload: &[u8], print: Print) -> Result<i32> {
    let reply = proto::exchange(&out.data.dir(), &req, payload).await?;
    if let Some(f) = reply.answer.error {
        if out.json {
            println!("{}", json!({ "error": f }));
        } else {
            eprintln!("covey: {}", f.message);
        }
        return Ok(f.kind.exit_code());
    }
    let mut value = reply.answer.value;
    let mut stdout = std::io::stdout().lock();
    match print {
        _ if out.json => {
            if let Print::Bytes(name) = print {
                value[name] = serde_json::to_value(Bytes::new(&reply.bytes))?;
            }
            writeln!(stdout, "{value}")?;
        }
        Print::Quiet => {}
        Print::Bytes(_) => {
            stdout.write_all(&reply.bytes)?;
            if std::io::stdout().is_terminal() && !reply.bytes.ends_with(b"\n") {
                writeln!(stdout)?;
            }
        }
        Print::Keys => {
            for k in value["keys"].as_array().into_iter().flatten() {
                writeln!(stdout, "{}", k.as_str().unwrap_or_default())?;
            }
        }
        Print::Nodes => print_nodes(&mut stdout, &value)?,
        Print::Scripts => return print_scripts(&mut stdout, value),
    }
    Ok(0)
}

fn print_nodes(out: &mut impl Write, value: &serde_json::Value) -> Result<()> {
    let now = crate::clock::now_ms();
    writeln!(
        out,
        "{:<24} {:<5} {:>9} {:>9}  {:<28} VERSION",
        "NODE", "STATE", "SINCE", "RTT", "ADDRESS"
    )?;
    for n in value.as_array().into_iter().flatten() {
        let text = |k: &str| n[k].as_str().unwrap_or("-").to_string();
        let mut name = text("name");
        if n["this_node"] == true {
            name.push_str(" (this)");
        }
        let since = (n["since_ms"].as_u64())
            .map(|t| super::human_duration(now.saturating_sub(t)))
            .unwrap_or_else(|| "-".into());
        let rtt = super::rtt_text(n["rtt_us"].as_u64());
        let state = if n["up"] == true { "up" } else { "down" };
        let (addr, version) = (text("addr"), text("version"));
        writeln!(
            out,
            "{name:<24} {state:<5} {since:>9} {rtt:>9}  {addr:<28} {version}"
        )?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct ScriptsAnswer {
    node: String,
    #[serde(default)]
    scripts: Vec<ScriptInfo>,
    #[serde(default)]
    error: Option<Failure>,
}

/// One node's scripts (an object) or several nodes' (a list); a node that
/// did not answer is said on stderr and makes the exit code 1.
fn print_scripts(out: &mut impl Write, value: serde_json::Value) -> Result<i32> {
    let answers: Vec<ScriptsAnswer> = match value {
        serde_json::Value::Array(_) => serde_json::from_value(value)?,
        one => vec![serde_json::from_value(one)?],
    };
    let now = crate::clock::now_ms();
    writeln!(
        out,
        "{:<28} {:<8} {:<7} {:<16} {:>8} {:>8} {:>9} {:>9} {:>10} {:>8}",
        "SCRIPT",
        "NODE",
        "STATE",
        "VERSION",
        "UP",
        "RESTARTS",
        "MEMORY",
        "BUSY",
        "HANDLED",
        "DROPPED"
    )?;
    let mut code = 0;
    for answer in &answers {
        if let Some(f) = &answer.error {
            eprintln!("covey: node {}: {}", answer.node, f.message);
            code = 1;
        }
        for s in &answer.scripts {
            print_script(out, &answer.node, s, now)?;
        }
    }
    Ok(code)
}

fn print_script(out: &mut impl Write, node: &str, s: &ScriptInfo, now: u64) -> Result<()> {
    let up = match s.state.as_str() {
        "running" => super::human_duration(now.saturating_sub(s.started_ms)),
        _ => "-".into(),
    };
    writeln!(
        out,
        "{:<28} {:<8} {:<7} {:<16} {:>8} {:>8} {:>6} KiB {:>7.1} s {:>10} {:>8}",
        s.script,
        node,
        s.state,
        s.version,
        up,
        s.restarts,
        s.memory_bytes / 1024,
        s.busy_ms as f64 / 1000.0,
        s.handled,
        s.dropped
    )?;
    for g in &s.grants {
        writeln!(out, "  granted: {g}")?;
    }
    if let Some(e) = &s.last_error {
        writeln!(out, "  last error: {e}")?;
    }
    Ok(())
}

/// A streaming request: items until the node goes away (or Ctrl-C).
async fn stream<T: serde::de::DeserializeOwned + serde::Serialize>(
    out: &Out,
    req: Request,
    print: fn(&T) -> String,
) -> Result<i32> {
    let mut reply = proto::exchange(&out.data.dir(), &req, &[]).await?;
    if let Some(f) = reply.answer.error {
        eprintln!("covey: {}", f.message);
        return Ok(f.kind.exit_code());
    }
    let mut line = String::new();
    loop {
        line.clear();
        if reply.rest.read_line(&mut line).await? == 0 {
            return Ok(0);
        }
        let item: T = serde_json::from_str(&line)
            .with_context(|| format!("unexpected line from the node: {line}"))?;
        let text = if out.json {
            serde_json::to_string(&item)?
        } else {
            print(&item)
        };
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the stream quietly.
        if writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(0);
        }
    }
}

fn print_change(c: &KvChange) -> String {
    match &c.value {
        Some(v) => format!("{} = {}", c.key, v.display()),
        None => format!("{} deleted", c.key),
    }
}

fn print_event(e: &EventItem) -> String {
    format!("{} {} {}", e.from, e.name, e.payload.display())
}

fn print_log(l: &LogLine) -> String {
    let script = l
        .script
        .as_deref()
        .map(|s| format!(" [{s}]"))
        .unwrap_or_default();
    let node = l
        .node
        .as_deref()
        .map(|n| format!("{n} "))
        .unwrap_or_default();
    format!(
        "{} {:>5} {node}{}{script}: {}",
        format_time(l.time_ms),
        l.level,
        l.target,
        l.message
    )
}

async fn logs(args: LogsArgs) -> Result<i32> {
    let since_ms = match &args.since {
        Some(s) => Some(crate::clock::now_ms().saturating_sub(parse_age(s)?)),
        None => None,
    };
    let req = Request::Logs {
        query: LogQuery {
            script: args.script,
            since_ms,
        },
        follow: args.follow,
        tail: args.tail,
        nodes: args.nodes.nodes(),
    };
    stream(&args.out, req, print_log).await
}

/// `30s`, `10m`, `2h`, `1d` (or plain seconds) → milliseconds.
pub(crate) fn parse_age(text: &str) -> Result<u64> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = digits
        .parse()
        .with_context(|| format!("--since {text:?}: expected e.g. 30s, 10m, 2h, 1d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("--since {text:?}: the unit must be s, m, h or d"),
    };
    Ok(n.saturating_mul(secs * 1000))
}

/// UTC `HH:MM:SS.mmm` of a Unix time in ms (a log line's time of day).
fn format_time(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}Z",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

/// A payload argument: the text itself, `-` for standard input, or none.
fn payload_arg(arg: Option<&str>) -> Result<Vec<u8>> {
    match arg {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .take(MAX_STDIN + 1)
                .read_to_end(&mut bytes)
                .context("reading the payload from standard input")?;
            if bytes.len() as u64 > MAX_STDIN {
                bail!("the payload on standard input is over {MAX_STDIN} bytes");
            }
            Ok(bytes)
        }
        Some(text) => Ok(text.as_bytes().to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::proto::FailureKind;

    #[test]
    fn ages_parse() {
        assert_eq!(parse_age("30s").unwrap(), 30_000);
        assert_eq!(parse_age("10m").unwrap(), 600_000);
        assert_eq!(parse_age("2h").unwrap(), 7_200_000);
        assert_eq!(parse_age("1d").unwrap(), 86_400_000);
        assert_eq!(parse_age("5").unwrap(), 5_000);
        assert!(parse_age("m").is_err());
        assert!(parse_age("10w").is_err());
        assert_eq!(format_time(3_723_004), "01:02:03.004Z");
    }

    #[test]
    fn exit_codes_are_distinct() {
        let kinds = [
            FailureKind::Failed,
            FailureKind::BadRequest,
            FailureKind::NoHandler,
            FailureKind::Timeout,
            FailureKind::NodeDown,
            FailureKind::UnknownNode,
            FailureKind::PayloadTooLarge,
            FailureKind::HandlerFailed,
            FailureKind::NotFound,
        ];
        let mut codes: Vec<i32> = kinds.iter().map(|k| k.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&0));
    }
}
