//! The `covey` command: a thin main over the library.

use anyhow::Result;
use clap::Parser;
use covey::cluster::credentials::ClusterToken;
use covey::config::{Cli, ClusterCommand, Command, HttpCommand, NodeConfig};
use tracing_subscriber::filter::Targets;

fn main() -> Result<()> {
    // With backtraces on, every wasm exception (a Lua error, a coroutine
    // yield) captures a host backtrace: ~14x slower. Set it before any
    // thread exists, unless the user asked for something explicitly.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: single-threaded at this point; nothing reads the
        // environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let cfg = NodeConfig::resolve(&args)?;
            init_logging(&cfg.log);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(cfg))
        }
        Command::Exec(args) => {
            init_logging("warn");
            let opts = args.options()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            if let Err(err) = rt.block_on(covey::exec::exec(&args.file, opts)) {
                eprintln!("covey exec: {err:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Cluster(cmd) => cluster(cmd),
        Command::Device(cmd) => covey::devices::cli::run(cmd),
        Command::Operator(cmd) => std::process::exit(covey::control::cli::run(cmd)?),
        Command::Http(HttpCommand::Token(data)) => {
            println!("{}", covey::http::token_command(&data.dir())?);
            Ok(())
        }
        Command::Compile(args) => {
            init_logging("warn");
            covey::compile::compile(&args)
        }
        Command::Status(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = rt.block_on(covey::control::fetch_status(&args.data.dir()))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", covey::control::render(&report));
            }
            Ok(())
        }
    }
}

fn cluster(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Init(data) => {
            let dir = data.dir();
            if let Some(existing) = ClusterToken::load(&dir)? {
                anyhow::bail!(
                    "this node already has a cluster token (cluster {}) in {}; \
                     `covey cluster token` prints it",
                    existing.fingerprint(),
                    dir.display()
                );
            }
            let token = ClusterToken::generate();
            let path = token.save(&dir)?;
            println!(
                "New cluster {} (token saved in {}).",
                token.fingerprint(),
                path.display()
            );
            println!();
            println!("On every other node, run once:");
            println!("    covey cluster join {}", token.encode());
            println!();
            println!("Keep the token secret: whoever has it can join the cluster.");
            Ok(())
        }
        ClusterCommand::Join { token, data } => {
            let token = ClusterToken::parse(&token)?;
            let dir = data.dir();
            if let Some(existing) = ClusterToken::load(&dir)?
                && existing.fingerprint() != token.fingerprint()
            {
                eprintln!(
                    "note: replacing the token of cluster {} with cluster {}",
                    existing.fingerprint(),
                    token.fingerprint()
                );
            }
            let path = token.save(&dir)?;
            println!(
                "Joined cluster {} (token saved in {}); (re)start `covey run`.",
                token.fingerprint(),
                path.display()
            );
            Ok(())
        }
        ClusterCommand::Token(data) => {
            let dir = data.dir();
            match ClusterToken::load(&dir)? {
                Some(t) => {
                    println!("{}", t.encode());
                    Ok(())
                }
                None => anyhow::bail!(
                    "no cluster token in {} (run `covey cluster init` or `covey cluster join`)",
                    dir.display()
                ),
            }
        }
    }
}

async fn run(cfg: NodeConfig) -> Result<()> {
    // Listen for SIGTERM/SIGINT before starting, so a signal during start
    // (scripts loading, peers linking) still ends in a clean shutdown.
    let stop = covey::shutdown::signal();
    let node = covey::Node::start(cfg).await?;
    stop.await;
    tracing::info!("shutting down");
    node.shutdown().await
}

fn init_logging(filter: &str) {
    // `LEVEL` or `TARGET=LEVEL,...` (e.g. `covey=debug,script=trace`).
    let filter = log_targets(filter).unwrap_or_else(|e| {
        eprintln!("covey: bad log filter {filter:?} ({e}); using `info`");
        log_targets("info").expect("a valid filter")
    });
    // The terminal, and the ring `covey logs` reads (same filter).
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .with(covey::logring::RingLayer)
        .init();
}

/// The filter `spec` asks for, with Automerge held to warnings unless it
/// is named: its loader opens an info-level span whose fields include the
/// document's whole change graph, so at `info` every merged sync message
/// formatted the entire history into the log machinery — seconds per
/// message after an hour of writes, found by the soak.
fn log_targets(spec: &str) -> Result<Targets, tracing_subscriber::filter::ParseError> {
    let targets: Targets = spec.parse()?;
    if targets
        .iter()
        .any(|(target, _)| target.starts_with("automerge"))
    {
        return Ok(targets);
    }
    Ok(targets.with_target("automerge", tracing::Level::WARN))
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    #[test]
    fn automerge_stays_at_warnings_unless_named() {
        let t = super::log_targets("info").unwrap();
        assert!(t.would_enable("covey::node", &Level::INFO));
        assert!(!t.would_enable("automerge::storage::load", &Level::INFO));
        assert!(t.would_enable("automerge::storage::load", &Level::WARN));
        let t = super::log_targets("covey=debug,automerge=debug").unwrap();
        assert!(t.would_enable("automerge::sync", &Level::DEBUG));
        assert!(super::log_targets("covey=loud").is_err());
    }
}
