//! What every benchmark binary shares: start-up and the figures' units.

#![allow(dead_code)] // each bench uses a subset

use std::time::Duration;

/// Turn off wasm-exception backtraces (as the `covey` binary does), read
/// `COVEY_BENCH_QUICK`, print the header. Returns whether this is a quick run.
pub fn start(name: &str) -> bool {
    // SAFETY: called first in main, single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    let quick = std::env::var_os("COVEY_BENCH_QUICK").is_some();
    println!(
        "covey {name} benchmark ({} mode), {} cores",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    quick
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Time `one` over `n + n / 10` runs (given the run's index); the first
/// tenth only warms up and is not in the result.
pub async fn sample(
    n: usize,
    mut one: impl AsyncFnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    let warm = n / 10;
    let mut times = Vec::with_capacity(n);
    for i in 0..n + warm {
        let t = std::time::Instant::now();
        one(i).await?;
        if i >= warm {
            times.push(t.elapsed());
        }
    }
    Ok(times)
}

/// The `p`th percentile (sorts `v`).
pub fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() - 1) * p) / 100]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Idle memory of a real `covey run` process: started with `args` (plus
/// `--log warn`), given `settle` to finish starting, `poke`d once (e.g. a
/// request, so a lazily built part is built), given a moment more, read
/// from `/proc`, then stopped with SIGTERM. (VmRSS, VmSize) in KiB.
pub fn covey_run_memory(args: &[String], settle: Duration, poke: impl Fn()) -> (u64, u64) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--log", "warn"])
        .args(args)
        .spawn()
        .unwrap();
    std::thread::sleep(settle);
    poke();
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib = |key: &str| -> u64 {
        (status.lines())
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let memory = (kib("VmRSS:"), kib("VmSize:"));
    // SIGTERM, so the node shuts down cleanly.
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    unsafe { kill(child.id() as i32, 15) };
    let _ = child.wait();
    memory
}

/// Hold a sender to `window` messages in flight (`in_flight()` says how
/// many are), sleeping while the window is full. Both sides of a
/// side-by-side run pace through this. Why not `yield_now` in a loop: the
/// sender then spins, and on two cores its spinning took a sixth of the
/// CPU from the nodes (or the broker) it measured, and bounced the
/// receiver's counter between cores with every read. Sleeps are in timer
/// ticks (1 ms): far less than the window takes to drain, so the receiver
/// never runs dry.
pub async fn wait_for_room(in_flight: impl Fn() -> u64, window: u64) {
    while in_flight() >= window {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}
