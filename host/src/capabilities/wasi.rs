//! WASI for scripts, with nothing granted: no preopened directories, no
//! environment variables or arguments, no sockets or name lookups. Clocks
//! and random numbers are allowed (harmless, and Rust's std needs them).
//! stdout and stderr become log lines tagged with the script name.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::component::Linker;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::log::LogRate;
use super::{ScriptEnv, ScriptState};
use crate::router::ScriptId;

pub fn add_to_linker(linker: &mut Linker<ScriptState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)
}

pub fn sandboxed_ctx(env: &ScriptEnv) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    match &env.services.console {
        // `covey exec`: the user's terminal, and the arguments they gave.
        Some(console) => {
            b.inherit_stdout().inherit_stderr();
            b.arg(&*env.script).args(&console.args);
        }
        None => {
            b.stdout(LogStream::new(
                env.script.clone(),
                env.log_rate.clone(),
                false,
            ))
            .stderr(LogStream::new(
                env.script.clone(),
                env.log_rate.clone(),
                true,
            ));
        }
    }
    b.build()
}

/// A guest output stream that turns complete lines into log lines.
#[derive(Clone)]
struct LogStream {
    inner: Arc<Mutex<LineBuffer>>,
}

struct LineBuffer {
    script: ScriptId,
    rate: Arc<LogRate>,
    stderr: bool,
    pending: Vec<u8>,
}

/// A line longer than this is logged in pieces rather than buffered forever.
const MAX_LINE: usize = 8 * 1024;

impl LogStream {
    fn new(script: ScriptId, rate: Arc<LogRate>, stderr: bool) -> Self {
        LogStream {
            inner: Arc::new(Mutex::new(LineBuffer {
                script,
                rate,
                stderr,
                pending: Vec::new(),
            })),
        }
    }
}

impl LineBuffer {
    fn write(&mut self, mut buf: &[u8]) {
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&buf[..pos]);
            self.flush_line();
            buf = &buf[pos + 1..];
        }
        self.pending.extend_from_slice(buf);
        if self.pending.len() >= MAX_LINE {
            self.flush_line();
        }
    }

    fn flush_line(&mut self) {
        if !self.rate.admit(&self.script) {
            self.pending.clear();
            return;
        }
        let line = String::from_utf8_lossy(&self.pending);
        let line = line.trim_end_matches('\r');
        let script = &*self.script;
        if self.stderr {
            tracing::warn!(target: "script", script, "{line}");
        } else {
            tracing::info!(target: "script", script, "{line}");
        }
        self.pending.clear();
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.flush_line();
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.inner.lock().unwrap().write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What `f` logs, as text.
    fn logged(f: impl FnOnce()) -> String {
        let capture = Capture::default();
        let sink = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn output_becomes_log_lines_tagged_with_the_script() {
        let text = logged(|| {
            let rate = Arc::new(LogRate::new(0));
            let out = LogStream::new("dir/s.wasm".into(), rate.clone(), false);
            let err = LogStream::new("dir/s.wasm".into(), rate, true);
            let mut o = out.inner.lock().unwrap();
            o.write(b"first li");
            o.write(b"ne\r\nsecond\nunterminated");
            drop(o);
            err.inner.lock().unwrap().write(b"oops\n");
            drop(out); // flushes the unterminated tail
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].contains("INFO") && lines[0].contains("first line"),
            "{text}"
        );
        assert!(lines[0].contains("script=\"dir/s.wasm\""), "{text}");
        assert!(lines[1].contains("second"));
        assert!(
            lines[2].contains("WARN") && lines[2].contains("oops"),
            "{text}"
        );
        assert!(lines[3].contains("unterminated"));
    }

    #[test]
    fn a_flood_of_output_is_cut_to_the_rate_and_the_drop_reported() {
        let rate = Arc::new(LogRate::new(10));
        let text = logged(|| {
            let out = LogStream::new("flood.lua".into(), rate.clone(), false);
            for i in 0..1000 {
                out.inner
                    .lock()
                    .unwrap()
                    .write(format!("line {i}\n").as_bytes());
            }
        });
        let passed = text.lines().filter(|l| l.contains("line ")).count() as u64;
        // A burst of twice the rate passes (a few more if the machine
        // stalled mid-loop); everything else is dropped and counted.
        assert!((20..1000).contains(&passed), "{passed} passed");
        assert_eq!(passed + rate.dropped(), 1000);
    }
}
