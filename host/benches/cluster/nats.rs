//! The NATS side of the comparison: Debian's `nats-server` on loopback,
//! two `async-nats` clients in this process (requester and responder, or
//! publisher and subscriber), the same payloads and counts as Covey's run.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;

use super::{pct, sample, us};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server() -> Result<(Server, String)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nats-server not found (apt-get install nats-server)")?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, format!("nats://127.0.0.1:{port}")))
}

/// Returns the request/reply p50.
pub async fn bench(calls: usize, events: u64) -> Result<Duration> {
    let (_server, url) = start_server()?;
    let version = Command::new("nats-server")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("-- NATS: {version}, async-nats client, loopback --");

    let responder = async_nats::connect(&url).await?;
    let requester = async_nats::connect(&url).await?;
    let mut sub = responder.subscribe("echo").await?;
    responder.flush().await?;
    // `flush` only writes the client's buffer: the server may not have
    // the subscription yet when the first request arrives on the other
    // connection (a "no responders" answer). Wait until it answers.
    let answering = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    let payload = bytes::Bytes::from(vec![b'x'; 64]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = requester.request("echo", payload.clone()).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the responder never answered: {e}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rtt = sample(calls, async |_| {
        let reply = requester.request("echo", payload.clone()).await?;
        anyhow::ensure!(reply.payload.len() == 64, "short reply");
        Ok(())
    })
    .await?;
    answering.abort();
    let p50 = pct(&mut rtt, 50);
    println!(
        "request/reply round trip ({calls} requests, 64-byte payload): p50 {:.0} us, p99 {:.0} us",
        us(p50),
        us(pct(&mut rtt, 99))
    );

    // Pub/sub, at most 8,000 in flight like Covey's run.
    let subscriber = async_nats::connect(&url).await?;
    let publisher = async_nats::connect(&url).await?;
    let mut sub = subscriber.subscribe("bench").await?;
    subscriber.flush().await?;
    // As above: published before the server has the subscription, the
    // first messages would be lost. A request on the subject returns once
    // the server routes it to the subscriber (which ignores it).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = publisher.request("bench", payload.clone());
        match tokio::time::timeout(Duration::from_millis(50), probe).await {
            Ok(Err(e)) if matches!(e.kind(), async_nats::RequestErrorKind::NoResponders) => {}
            // Timed out waiting for a reply the subscriber never sends:
            // the server routed the request, so the subscription is live.
            Err(_) => break,
            Ok(r) => anyhow::bail!("unexpected answer to the readiness probe: {r:?}"),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the subscriber never became ready"
        );
    }
    // The probe that got through is not part of the count.
    (tokio::time::timeout(Duration::from_secs(5), sub.next()).await)
        .context("the readiness probe never arrived")?;
    let seen = Arc::new(AtomicU64::new(0));
    let counting = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let run = |count: u64| {
        let (publisher, seen, payload) = (publisher.clone(), seen.clone(), payload.clone());
        async move {
            let base = seen.load(Ordering::Relaxed);
            let started = Instant::now();
            let mut sent = 0u64;
            while sent < count {
                let seen = || seen.load(Ordering::Relaxed) - base;
                crate::support::wait_for_room(|| sent.saturating_sub(seen()), 8000).await;
                publisher.publish("bench", payload.clone()).await.unwrap();
                sent += 1;
            }
            publisher.flush().await.unwrap();
            // NATS drops for slow consumers: stop waiting 2 s after the
            // last message arrived and report what was lost.
            let mut last = (seen.load(Ordering::Relaxed), Instant::now());
            while seen.load(Ordering::Relaxed) - base < count {
                tokio::time::sleep(Duration::from_micros(100)).await;
                let now = seen.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
            let got = seen.load(Ordering::Relaxed) - base;
            (
                got,
                last.1.duration_since(started).max(Duration::from_micros(1)),
            )
        }
    };
    run(events / 10).await;
    let (got, elapsed) = run(events).await;
    counting.abort();
    println!(
        "pub/sub ({events} messages, 64-byte payload): {:.0} messages/s delivered, {} lost",
        got as f64 / elapsed.as_secs_f64(),
        events - got
    );
    Ok(p50)
}
