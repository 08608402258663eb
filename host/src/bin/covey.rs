//! The `covey` command: a thin main over the library.

use anyhow::Result;
use clap::Parser;
use covey::config::{Cli, Command, NodeConfig};
use tracing_subscriber::EnvFilter;

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
    }
}

async fn run(cfg: NodeConfig) -> Result<()> {
    let node = covey::Node::start(cfg).await?;
    covey::shutdown::signal().await;
    tracing::info!("shutting down");
    node.shutdown().await
}

fn init_logging(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("covey: bad log filter {filter:?} ({e}); using `info`");
        EnvFilter::new("info")
    });
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
