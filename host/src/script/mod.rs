//! Running scripts: the supervisor (which scripts, which version) and the
//! instance task (one store, one mailbox, one callback at a time).

pub mod batch;
pub mod instance;
pub mod supervisor;

pub use instance::{LoadedScript, ScriptStatus};
pub use supervisor::{LoadOutcome, ScriptInfo, ScriptSupervisor};
