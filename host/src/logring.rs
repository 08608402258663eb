//! The node's recent log lines, kept in memory for `covey logs`.
//!
//! A `tracing` layer beside the terminal output copies every line that
//! passes the node's log filter into a bounded ring (the newest
//! [`CAPACITY`] lines, each cut at [`MAX_LINE`] bytes) and to followers
//! (`covey logs -f`). Lines of scripts carry the script's name (the
//! `script` field their lines are logged with), so one script's lines can
//! be picked out. The ring is per process: nodes sharing one process (the
//! in-process tests) share it.

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::{LazyLock, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

use crate::clock::now_ms;

/// Lines kept.
pub const CAPACITY: usize = 4096;
/// Longest line kept, in bytes (longer ones are cut, marked with `…`).
pub const MAX_LINE: usize = 2048;

/// One log line.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LogLine {
    /// Position in the process's log (set by [`LogRing::push`]).
    #[serde(default)]
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub level: String,
    /// The module that logged it (`script` for scripts' own lines).
    pub target: String,
    /// The script it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// The message and the other fields, as the terminal shows them.
    pub message: String,
    /// The node it comes from, when lines of several nodes are shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl LogLine {
    /// A warning from the log machinery itself (a reader fell behind, a
    /// node did not answer).
    pub fn about_logs(message: String) -> LogLine {
        LogLine {
            seq: 0,
            time_ms: now_ms(),
            level: "WARN".into(),
            target: "covey::logs".into(),
            script: None,
            message,
            node: None,
        }
    }
}

/// Which lines `covey logs` wants.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct LogQuery {
    /// Only lines about this script.
    #[serde(default)]
    pub script: Option<String>,
    /// Only lines at or after this time (ms since the Unix epoch).
    #[serde(default)]
    pub since_ms: Option<u64>,
}

impl LogQuery {
    pub fn matches(&self, line: &LogLine) -> bool {
        self.since_ms.is_none_or(|t| line.time_ms >= t)
            && (self.script.as_deref()).is_none_or(|s| line.script.as_deref() == Some(s))
    }
}

pub struct LogRing {
    lines: Mutex<Lines>,
    follow: broadcast::Sender<LogLine>,
}

struct Lines {
    kept: VecDeque<LogLine>,
    next_seq: u64,
}

/// The process's ring.
pub static LOGS: LazyLock<LogRing> = LazyLock::new(|| LogRing {
    lines: Mutex::new(Lines {
        kept: VecDeque::with_capacity(CAPACITY),
        next_seq: 1,
    }),
    follow: broadcast::channel(1024).0,
});

impl LogRing {
    pub fn push(&self, mut line: LogLine) {
        let mut lines = self.lines.lock().unwrap();
        line.seq = lines.next_seq;
        lines.next_seq += 1;
        // Sent under the lock, so followers see lines in `seq` order; one
        // that falls behind by more than the channel holds is told how
        // many lines it missed (RecvError::Lagged).
        let _ = self.follow.send(line.clone());
        if lines.kept.len() == CAPACITY {
            lines.kept.pop_front();
        }
        lines.kept.push_back(line);
    }

    /// The kept lines that match, oldest first.
    pub fn recent(&self, query: &LogQuery) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap();
        (lines.kept.iter())
            .filter(|l| query.matches(l))
            .cloned()
            .collect()
    }

    /// The position of the newest line (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lines.lock().unwrap().next_seq - 1
    }

    /// Lines from now on (subscribe before reading [`LogRing::recent`], so
    /// nothing falls between the two, and skip lines up to the last `seq`
    /// it gave).
    pub fn follow(&self) -> broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }
}

/// The `tracing` layer that feeds [`LOGS`].
pub struct RingLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut message = fields.message;
        if !fields.rest.is_empty() {
            if !message.is_empty() {
                message.push(' ');
            }
            message.push_str(&fields.rest);
        }
        if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        LOGS.push(LogLine {
            seq: 0,
            time_ms: now_ms(),
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            script: fields.script,
            message,
            node: None,
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    script: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "script" => self.script = Some(value.to_string()),
            "message" => self.message.push_str(value),
            name => self.push(name, format_args!("{value:?}")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            // A script name logged through Debug (e.g. an `Arc<str>`).
            "script" => self.script = Some(format!("{value:?}").trim_matches('"').to_string()),
            name => self.push(name, format_args!("{value:?}")),
        }
    }
}

impl Fields {
    fn push(&mut self, name: &str, value: std::fmt::Arguments<'_>) {
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        let _ = write!(self.rest, "{name}={value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn lines_are_kept_with_their_script_and_bounded() {
        let subscriber = tracing_subscriber::registry().with(RingLayer);
        let start = now_ms();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "script", script = "a.lua", "hello {}", 1);
            tracing::warn!(peer = "pi", "link down");
            tracing::info!(target: "script", script = "b.lua", "{}", "x".repeat(3 * MAX_LINE));
        });
        let a = LOGS.recent(&LogQuery {
            script: Some("a.lua".into()),
            since_ms: Some(start),
        });
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].message, "hello 1");
        assert_eq!(a[0].level, "INFO");
        let all = LOGS.recent(&LogQuery {
            since_ms: Some(start),
            ..Default::default()
        });
        assert!(
            all.iter()
                .any(|l| l.message == "link down peer=\"pi\"" && l.script.is_none())
        );
        let long = all
            .iter()
            .find(|l| l.script.as_deref() == Some("b.lua"))
            .unwrap();
        assert!(long.message.len() <= MAX_LINE + '…'.len_utf8());
        for i in 0..CAPACITY + 10 {
            LOGS.push(LogLine {
                seq: 0,
                time_ms: 0,
                level: "INFO".into(),
                target: "t".into(),
                script: None,
                message: i.to_string(),
                node: None,
            });
        }
        let kept = LOGS.recent(&LogQuery::default());
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept.last().unwrap().message, (CAPACITY + 9).to_string());
    }
}
