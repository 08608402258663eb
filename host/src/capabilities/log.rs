//! `covey:script/log`: structured log lines tagged with the script name.

use wasmtime::component::{HasSelf, Linker};

use super::{ScriptEnv, ScriptState};
use crate::bindings::covey::script::log::{self as wit, Level};
use crate::router::ScriptId;

pub struct LogCtx {
    script: ScriptId,
    /// `covey exec`: plain lines on stdout (stderr for warnings and errors).
    console: bool,
}

impl LogCtx {
    pub fn new(env: &ScriptEnv) -> Self {
        LogCtx {
            script: env.script.clone(),
            console: env.services.console.is_some(),
        }
    }
}

pub fn add_to_linker(linker: &mut Linker<ScriptState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<ScriptState, HasSelf<LogCtx>>(linker, |s| &mut s.log)
}

impl wit::Host for LogCtx {
    async fn log(&mut self, level: Level, message: String) {
        if self.console {
            match level {
                Level::Warn | Level::Error => eprintln!("{message}"),
                _ => println!("{message}"),
            }
            return;
        }
        let script = &*self.script;
        match level {
            Level::Trace => tracing::trace!(target: "script", script, "{message}"),
            Level::Debug => tracing::debug!(target: "script", script, "{message}"),
            Level::Info => tracing::info!(target: "script", script, "{message}"),
            Level::Warn => tracing::warn!(target: "script", script, "{message}"),
            Level::Error => tracing::error!(target: "script", script, "{message}"),
        }
    }
}
