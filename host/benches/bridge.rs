//! Firmware bridge benchmark: `cargo bench -p covey --bench bridge`.
//!
//! The device is the C simulator (`firmware-bridge/c`, the library a
//! microcontroller runs) in its own process; the node runs on one core (a
//! current-thread runtime: UDP, bridge, router and Lua share it). Prints,
//! side by side in one run:
//! - device → Lua script events/s over UDP loopback (QoS 0);
//! - device → script → device round trip p50/p99 (an event, and the
//!   command the script sends back);
//! - mosquitto QoS 0 publish → subscribe round trip p50/p99 (one client
//!   subscribed to the topic it publishes, through the broker).
//!
//! Needs `make`, a C compiler and Debian's `mosquitto`: it fails, loudly,
//! without them. `COVEY_BENCH_QUICK=1` runs smaller counts.

use std::process::Stdio;
use std::time::{Duration, Instant};

use covey::{Node, NodeConfig};

#[path = "../tests/support/device.rs"]
#[allow(dead_code)]
mod device;

#[path = "../tests/support/mosquitto.rs"]
mod mosquitto;

mod support;
use support::{pct, us};

/// Counts events; answers `ping` with the command `pong` to its sender.
const SCRIPT: &str = r#"
seen = 0
covey.on("*", "e", function(msg) seen = seen + 1 end)
covey.handle("*", "count", function() return tostring(seen) end)
covey.on("*", "ping", function(msg) covey.command(msg.from, "pong", msg.payload) end)
"#;

fn main() {
    let quick = support::start("bridge");
    let sim = device::simulator();
    let one_core = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (events, rtt) = one_core.block_on(device_side(
        &sim,
        if quick { 50_000 } else { 500_000 },
        if quick { 500 } else { 5_000 },
    ));
    let rt = support::runtime();
    let mut mq = rt.block_on(mosquitto_rtt(if quick { 500 } else { 5_000 }));
    println!();
    println!(
        "device → Lua script (UDP, QoS 0, node on 1 core): {:>9.0} events/s  (goal ≥ 50,000)",
        events
    );
    println!(
        "round trip device → script → device:  p50 {:>6.0} µs  p99 {:>6.0} µs  (goal: p50 ≤ 300 µs and ≤ mosquitto's)",
        rtt.0, rtt.1
    );
    println!(
        "mosquitto QoS 0 publish → subscribe:  p50 {:>6.0} µs  p99 {:>6.0} µs",
        us(pct(&mut mq, 50)),
        us(pct(&mut mq, 99))
    );
}

async fn device_side(sim: &std::path::Path, n: u64, rtt_n: u64) -> (f64, (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("bench.lua"), SCRIPT).unwrap();
    let mut cfg = NodeConfig::new("bench", scripts, dir.path().join("data"));
    cfg.limits.mailbox = 65_536;
    cfg.bridge.udp = Some("127.0.0.1:0".parse().unwrap());
    // The per-device rate limit (10,000 frames/s by default) would cap the
    // figure: this measures the path, not the limiter.
    cfg.bridge.rate = Some(100_000_000);
    let node = Node::start(cfg).await.unwrap();
    let key = covey::files::hex(&node.devices().registry.add("bench").unwrap());
    let udp = node.devices().udp.unwrap().to_string();

    let count = |node: &Node| {
        let router = node.router().clone();
        async move {
            let r = router
                .call(None, "bench", "count", vec![], Duration::from_secs(10))
                .await
                .unwrap();
            String::from_utf8(r).unwrap().parse::<u64>().unwrap()
        }
    };
    let mut child = tokio::process::Command::new(sim)
        .args(["--udp", &udp, "--name", "bench", "--count", &n.to_string()])
        .args(["emit", "e", "x"])
        .env("COVEY_DEVICE_KEY", &key)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // From the first counted event to the last: the rate the script took.
    let (mut first, mut last) = (None, (Instant::now(), 0u64));
    let mut exited = false;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = count(&node).await;
        let now = Instant::now();
        if c > 0 && first.is_none() {
            first = Some((now, c));
        }
        if c != last.1 {
            last = (now, c);
        }
        exited = exited || child.try_wait().unwrap().is_some();
        if (exited && now - last.0 > Duration::from_millis(300)) || c >= n {
            break;
        }
    }
    let (t0, c0) = first.expect("no event reached the script");
    let rate = (last.1 - c0) as f64 / (last.0 - t0).as_secs_f64();
    println!(
        "events: {n} sent by the device, {} counted by the script ({:.2}% lost on the way)",
        last.1,
        100.0 * (n - last.1.min(n)) as f64 / n as f64
    );

    // Round trips, sealed (the default) and tagged in clear (a device
    // added with --no-seal), alternated in the same run.
    let open_key = covey::files::hex(
        &node
            .devices()
            .registry
            .add_with("bench-open", false)
            .unwrap(),
    );
    let (mut sealed, mut tagged) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        sealed.push(rtt(sim, &udp, "bench", &key, "1", rtt_n).await);
        tagged.push(rtt(sim, &udp, "bench-open", &open_key, "0", rtt_n).await);
    }
    node.shutdown().await.unwrap();
    let show = |v: &[(f64, f64)]| {
        let p50: Vec<String> = v.iter().map(|r| format!("{:.0}", r.0)).collect();
        let p99: Vec<String> = v.iter().map(|r| format!("{:.0}", r.1)).collect();
        format!("p50 {} µs, p99 {} µs", p50.join("/"), p99.join("/"))
    };
    println!("round trip sealed (ChaCha20-Poly1305): {}", show(&sealed));
    println!("round trip tagged (HMAC, in clear):    {}", show(&tagged));
    let median = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (s50, t50) = (median(&sealed, |r| r.0), median(&tagged, |r| r.0));
    println!(
        "sealed − tagged p50 (medians of 3 runs): {:+.0} µs  (goal: ≤ +20 µs)",
        s50 - t50
    );
    (rate, (s50, median(&sealed, |r| r.1)))
}

/// `rtt_n` round trips of device `name` (`seal`: "1" or "0"): p50, p99 µs.
async fn rtt(
    sim: &std::path::Path,
    udp: &str,
    name: &str,
    key: &str,
    seal: &str,
    rtt_n: u64,
) -> (f64, f64) {
    let out = tokio::process::Command::new(sim)
        .args(["--udp", udp, "--name", name, "--seal", seal])
        .args(["--count", &rtt_n.to_string(), "rtt"])
        .env("COVEY_DEVICE_KEY", key)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "rtt run failed: {text}");
    assert!(
        text.contains(if seal == "1" {
            "mode sealed"
        } else {
            "mode tagged"
        }),
        "{text}"
    );
    let field = |k: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {text}"))
            .parse()
            .unwrap()
    };
    (field("p50_us="), field("p99_us="))
}

async fn mosquitto_rtt(n: usize) -> Vec<Duration> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir().unwrap();
    let broker = mosquitto::Broker::start(dir.path(), None).await;
    let port = broker.port;
    let mut opts = MqttOptions::new("bench", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    // Connected and subscribed before the first sample (or fail loudly).
    let deadline = Instant::now() + Duration::from_secs(10);
    client.subscribe("bench/rt", QoS::AtMostOnce).await.unwrap();
    loop {
        assert!(Instant::now() < deadline, "mosquitto did not come up");
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let mut times = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let t = Instant::now();
        client
            .publish("bench/rt", QoS::AtMostOnce, false, b"x".to_vec())
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::Publish(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
        if i >= n / 10 {
            times.push(t.elapsed());
        }
    }
    times
}
