//! `covey:script/log`: structured log lines tagged with the script name.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::covey::script::log::{self as wit, Level};
use crate::router::ScriptId;

/// How many lines a script may log: a token bucket of `per_sec` lines a
/// second with bursts of twice that, shared by its `log` calls and its
/// stdout/stderr, and kept across its restarts and reloads (its instance
/// task holds it). A script printing in a loop cannot flood the journal.
pub struct LogRate {
    per_sec: u32,
    bucket: Mutex<Bucket>,
    dropped_total: AtomicU64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Dropped since the last line that passed.
    dropped: u64,
}

impl LogRate {
    /// `per_sec` = 0: no limit.
    pub fn new(per_sec: u32) -> Self {
        LogRate {
            per_sec,
            bucket: Mutex::new(Bucket {
                tokens: 2.0 * f64::from(per_sec),
                last: Instant::now(),
                dropped: 0,
            }),
            dropped_total: AtomicU64::new(0),
        }
    }

    /// May `script` log one more line now? If not, the line is counted as
    /// dropped; the next line that passes is preceded by a warning saying
    /// how many were.
    pub fn admit(&self, script: &str) -> bool {
        if self.per_sec == 0 {
            return true;
        }
        let rate = f64::from(self.per_sec);
        let mut b = self.bucket.lock().unwrap();
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * rate;
        b.tokens = (b.tokens + refill).min(2.0 * rate);
        b.last = now;
        if b.tokens < 1.0 {
            b.dropped += 1;
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        b.tokens -= 1.0;
        if b.dropped > 0 {
            tracing::warn!(
                target: "script",
                script,
                "{} log lines dropped (over {}/s)",
                b.dropped,
                self.per_sec
            );
            b.dropped = 0;
        }
        true
    }

    /// Lines dropped since the script was first started.
    pub fn dropped(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

pub struct LogCtx {
    script: ScriptId,
    rate: std::sync::Arc<LogRate>,
    /// `covey exec`: plain lines on stdout (stderr for warnings and errors).
    console: bool,
}

impl Capability for LogCtx {
    fn new(env: &ScriptEnv) -> Self {
        LogCtx {
            script: env.script.clone(),
            rate: env.log_rate.clone(),
            console: env.services.console.is_some(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
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
        if !self.rate.admit(script) {
            return;
        }
        match level {
            Level::Trace => tracing::trace!(target: "script", script, "{message}"),
            Level::Debug => tracing::debug!(target: "script", script, "{message}"),
            Level::Info => tracing::info!(target: "script", script, "{message}"),
            Level::Warn => tracing::warn!(target: "script", script, "{message}"),
            Level::Error => tracing::error!(target: "script", script, "{message}"),
        }
    }
}
