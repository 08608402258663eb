//! Cluster benchmark, side by side with NATS:
//! `cargo bench -p covey --features bench-nats --bench cluster`.
//!
//! Two Covey nodes in this process, linked over QUIC on loopback; a
//! `nats-server` (Debian's) on loopback with two `async-nats` clients in
//! this process. Prints:
//! - call round trip p50/p99: a guest on A calling an `echo` guest on B,
//!   and the host of A calling it; NATS request/reply with a responder;
//! - events/s from A into a guest on B (64-byte payloads); NATS pub/sub
//!   with the same payloads;
//! - the link write strategy: one long-lived stream with batched writes
//!   versus a stream per message and datagrams, on raw QUIC.
//!
//! `COVEY_BENCH_QUICK=1` for a smoke run.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use covey::cluster::ClusterConfig;
use covey::cluster::credentials::ClusterToken;
use covey::router::PeerStatus;
use covey::{Node, NodeConfig};

#[path = "../../tests/support/guests.rs"]
mod guests;
use guests::guest;

#[path = "../support/mod.rs"]
mod support;

mod nats;
mod quic_strategies;

fn main() {
    let quick = support::start("cluster");
    let rt = support::runtime();
    let calls = if quick { 2_000 } else { 20_000 };
    let events = if quick { 50_000 } else { 1_000_000 };
    rt.block_on(async {
        let covey_rtt = covey_bench(calls, events).await;
        // The side-by-side figure is the point of this run: without its
        // peer the benchmark fails, it never skips.
        let nats_p50 = match nats::bench(calls, events).await {
            Ok(p50) => p50,
            Err(e) => panic!("NATS side of the comparison failed: {e:#}"),
        };
        println!(
            "ratio: covey guest-to-guest call p50 / NATS request p50 = {:.2}x",
            covey_rtt.as_secs_f64() / nats_p50.as_secs_f64()
        );
        quic_strategies::bench(if quick { 20_000 } else { 200_000 }).await;
    });
}

pub use support::{pct, sample, us};

async fn start(
    name: &str,
    token: &ClusterToken,
    seed: Option<SocketAddr>,
    scripts: &[(&str, &str)],
) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let scripts_dir = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts_dir).unwrap();
    for (g, file) in scripts {
        std::fs::copy(guest(g), scripts_dir.join(file)).unwrap();
    }
    let mut cfg = NodeConfig::new(name, scripts_dir, dir.path().join("data"));
    cfg.limits.mailbox = 8192;
    let mut c = ClusterConfig::new(token.clone());
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.mdns = false;
    c.peers = seed.iter().map(|a| a.to_string()).collect();
    cfg.cluster = Some(c);
    (Node::start(cfg).await.unwrap(), dir)
}

/// Returns the guest-to-guest call p50.
async fn covey_bench(calls: usize, events: u64) -> Duration {
    println!("-- Covey: two nodes, QUIC over loopback --");
    let token = ClusterToken::generate();
    let (a, _da) = start("a", &token, None, &[("testing/probe", "probe.wasm")]).await;
    let seed = a.cluster().unwrap().local_addr();
    let (b, _db) = start(
        "b",
        &token,
        Some(seed),
        &[("echo", "echo.wasm"), ("testing/sink", "sink.wasm")],
    )
    .await;
    while a.cluster().unwrap().status("b") != PeerStatus::Up {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ra = a.router().clone();

    // Guest on A → guest on B: the probe guest's `probe.call` makes one
    // `events.call` to B's echo per invocation (64-byte payload).
    let payload = "x".repeat(64);
    let arg = format!("b|echo|2000|{payload}");
    let mut g2g = sample(calls, async |_| {
        let r = ra
            .call(
                None,
                "a",
                "probe.call",
                arg.clone().into_bytes(),
                Duration::from_secs(5),
            )
            .await?;
        anyhow::ensure!(r.starts_with(b"ok:"), "{}", String::from_utf8_lossy(&r));
        Ok(())
    })
    .await
    .unwrap();
    // Host of A → guest on B.
    let mut h2g = sample(calls, async |_| {
        ra.call(
            None,
            "b",
            "echo",
            payload.clone().into_bytes(),
            Duration::from_secs(5),
        )
        .await?;
        Ok(())
    })
    .await
    .unwrap();
    let p50 = pct(&mut g2g, 50);
    println!(
        "call round trip, guest on A -> echo guest on B ({calls} calls): p50 {:.0} us, p99 {:.0} us",
        us(p50),
        us(pct(&mut g2g, 99))
    );
    println!(
        "call round trip, host of A -> echo guest on B ({calls} calls): p50 {:.0} us, p99 {:.0} us",
        us(pct(&mut h2g, 50)),
        us(pct(&mut h2g, 99))
    );

    // Events from A into the sink guest on B, at most 8,192 in flight (the
    // sink's mailbox), so nothing is dropped.
    let rb = b.router().clone();
    let run = |count: u64| {
        let (ra, rb) = (ra.clone(), rb.clone());
        async move {
            let base = rb.stats.handled.load(Ordering::Relaxed);
            let started = Instant::now();
            let mut sent = 0u64;
            // Shared, as the NATS half shares its payload: a clone is a count.
            let body = bytes::Bytes::from(vec![7u8; 64]);
            while sent < count {
                let handled = || rb.stats.handled.load(Ordering::Relaxed) - base;
                support::wait_for_room(|| sent.saturating_sub(handled()), 8000).await;
                ra.emit("bench", body.clone()).unwrap();
                sent += 1;
            }
            while rb.stats.handled.load(Ordering::Relaxed) - base < count {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            started.elapsed()
        }
    };
    run(events / 10).await;
    let elapsed = run(events).await;
    let seen = rb
        .call(None, "b", "count", vec![], Duration::from_secs(5))
        .await
        .unwrap();
    let seen: u64 = String::from_utf8(seen).unwrap().parse().unwrap();
    assert_eq!(seen, events + events / 10, "the guest on B saw every event");
    let dropped: u64 = a
        .cluster()
        .unwrap()
        .peers()
        .iter()
        .map(|p| p.frames_dropped)
        .sum::<u64>()
        + rb.stats.dropped.load(Ordering::Relaxed);
    println!(
        "events A -> sink guest on B ({events} events, 64-byte payload): {:.0} events/s, {dropped} dropped",
        events as f64 / elapsed.as_secs_f64()
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    p50
}
