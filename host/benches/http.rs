//! HTTP API benchmark: `cargo bench -p covey --bench http`.
//!
//! A node in-process with the HTTP API on loopback and one Lua script;
//! keep-alive HTTP/1.1 clients (a minimal one written here: a request
//! out, the answer's head and `Content-Length` body in) in the same
//! process. Prints:
//! - `POST /v1/events/{name}` events/s into the Lua script, from 4
//!   connections, counted when the script has handled them all;
//! - `POST /v1/calls/{node}/{name}` round trip p50/p99, one connection,
//!   sequential (the Lua handler replies with the payload);
//! - the idle node's RSS with and without the HTTP API.
//!
//! `COVEY_BENCH_QUICK=1` runs smaller counts.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use covey::{Node, NodeConfig};

mod support;
use support::{pct, us};

const SCRIPT: &str = r#"
seen = 0
covey.on("*", "e", function() seen = seen + 1 end)
covey.handle("*", "count", function() return tostring(seen) end)
covey.handle("*", "echo", function(msg) return msg.payload end)
"#;

const CONNECTIONS: usize = 4;

fn main() {
    let quick = support::start("http");
    let rt = support::runtime();
    let (events, calls, rss) = rt.block_on(run(
        if quick { 20_000 } else { 200_000 },
        if quick { 2_000 } else { 20_000 },
    ));
    let mut calls = calls;
    println!();
    println!(
        "POST /v1/events → Lua script ({CONNECTIONS} keep-alive connections): {events:>9.0} events/s  (goal ≥ 50,000)"
    );
    println!(
        "POST /v1/calls round trip (1 connection):  p50 {:>6.0} µs  p99 {:>6.0} µs  (goal: p50 ≤ 200 µs)",
        us(pct(&mut calls, 50)),
        us(pct(&mut calls, 99))
    );
    println!(
        "idle RSS: node without the HTTP API {:.1} MiB, with it {:.1} MiB (+{:.1} MiB; goal ≤ +3 MiB)",
        rss.0,
        rss.1,
        rss.1 - rss.0
    );
}

async fn run(n_events: u64, n_calls: usize) -> (f64, Vec<Duration>, (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("bench.lua"), SCRIPT).unwrap();
    let base = NodeConfig::new("bench", scripts, dir.path().join("data"));

    let (rss_plain, rss_http) = tokio::task::spawn_blocking(idle_rss).await.unwrap();
    let mut cfg = base;
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    cfg.limits.mailbox = 65_536;
    let node = Node::start(cfg).await.unwrap();
    let addr = node.http_addr().unwrap();

    let started = Instant::now();
    let per = n_events / CONNECTIONS as u64;
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                for _ in 0..per {
                    let (status, _) = c.post("/v1/events/e", b"0123456789abcdef").await;
                    assert_eq!(status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let mut c = Client::connect(addr).await;
    let want = (per * CONNECTIONS as u64).to_string();
    while c.post("/v1/calls/bench/count", b"").await.1 != want.as_bytes() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let events = (per * CONNECTIONS as u64) as f64 / started.elapsed().as_secs_f64();

    let calls = support::sample(n_calls, async |_| {
        let (status, body) = c.post("/v1/calls/bench/echo", b"ping").await;
        anyhow::ensure!(status == 200 && body == b"ping", "call failed: {status}");
        Ok(())
    })
    .await
    .unwrap();
    node.shutdown().await.unwrap();
    (events, calls, (rss_plain, rss_http))
}

/// Idle RSS of a `covey run` process with the Lua script, without and
/// with the HTTP API (the dashboard page, status and metrics served once),
/// MiB; each the second start of its data directory (compiled code cached).
fn idle_rss() -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("bench.lua"), SCRIPT).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = vec![
        "--node".to_string(),
        "rss".into(),
        "--scripts".into(),
        scripts.display().to_string(),
        "--data".into(),
        dir.path().join("data").display().to_string(),
    ];
    let settle = Duration::from_secs(3);
    let mib = |(kib, _): (u64, u64)| kib as f64 / 1024.0;
    support::covey_run_memory(&args, settle, || {});
    let plain = mib(support::covey_run_memory(&args, settle, || {}));
    args.extend(["--http".to_string(), format!("127.0.0.1:{port}")]);
    let poke = || {
        for path in ["/", "/v1/status", "/metrics", "/v1/cluster/scripts"] {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "GET {path}: {answer}");
        }
    };
    let with_http = mib(support::covey_run_memory(&args, settle, poke));
    (plain, with_http)
}

/// A keep-alive HTTP/1.1 client, just enough for the node's answers.
struct Client {
    io: BufReader<TcpStream>,
    line: String,
    addr: SocketAddr,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            io: BufReader::new(s),
            line: String::new(),
            addr,
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.io.get_mut().write_all(&req).await.unwrap();
        self.line.clear();
        self.io.read_line(&mut self.line).await.unwrap();
        let status = self.line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut len = 0;
        loop {
            self.line.clear();
            self.io.read_line(&mut self.line).await.unwrap();
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut out = vec![0; len];
        self.io.read_exact(&mut out).await.unwrap();
        (status, out)
    }
}
