//! The soak: three `covey run` processes in three namespaces under steady
//! load for an hour — events, cross-node calls, key-value writes over a
//! bounded key space, a counter — and a script reload on every node every
//! minute. Every minute each node's resident memory, open file
//! descriptors, data directory size and a sample of call latencies are
//! printed as a row; at the end the test asserts what must hold whatever
//! the load's history: no node exited, every minute some call answered
//! (failed calls are counted and printed with their time), descriptors
//! flat. Growth of memory and files is reported (per hour, for each third
//! of the run and second half vs first) for the reader to judge — see
//! docs/reliability.md.
//!
//! Run (as root, not in CI): `cargo test -p covey --test chaos --
//! --ignored --nocapture soak`; `COVEY_SOAK_MINS` (default 60) sets the
//! duration, `COVEY_SOAK_LOG` the nodes' log filter (default `info`).
//! (The test build's `covey`: its dependencies are optimised,
//! Covey's own code is not — latencies are a little above a release
//! build's.)

use std::path::Path;
use std::time::{Duration, Instant};

use covey::cluster::credentials::ClusterToken;
use covey::control::proto::{Request, exchange};

use crate::bench_support::{pct, us};
use crate::lan::{Lan, write_file};

const NODES: usize = 3;

/// Every 100 ms: a key of 200 written in turn (the key space stays
/// bounded; its history does not), the shared counter, an event every
/// node counts. Answers `soak.echo` (the latency probe) and `soak.seen`.
const LOAD: &str = r#"
-- version VERSION
local me = covey.node()
local n, seen = 0, 0
covey.on("*", "soak.tick", function() seen = seen + 1 end)
covey.handle("*", "soak.echo", function(msg) return msg.payload end)
covey.handle("*", "soak.seen", function() return tostring(seen) end)
covey.every(100, function()
  n = n + 1
  covey.kv.set("soak/" .. me .. "/" .. (n % 200), string.rep("x", 64))
  covey.kv.incr("soak/counter", 1)
  covey.emit("soak.tick", me .. ":" .. n)
  return true
end)
"#;

/// One minute's sample of a node.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    /// Anonymous memory (heap, stacks): what a leak grows. The rest of RSS
    /// is mostly the binary's code pages (~35 MiB of a debug build),
    /// resident or not as other work presses the page cache.
    anon_kib: u64,
    /// The heap's live allocations, as the node reports them: anonymous
    /// memory less what the allocator holds free for reuse.
    heap_kib: u64,
    fds: usize,
    data_kib: u64,
}

async fn sample(lan: &Lan, i: usize) -> Sample {
    let pid = lan.pid(i).expect("node running");
    let heap = lan.status(i).await.and_then(|s| s.heap);
    Sample {
        rss_kib: lan.rss_kib(i).unwrap_or(0),
        anon_kib: lan.memory_kib(i, "RssAnon").unwrap_or(0),
        heap_kib: heap.map_or(0, |h| h.in_use / 1024),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        data_kib: dir_size(&lan.data(i)) / 1024,
    }
}

/// Bytes under `dir`, the scripts directory included.
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    (entries.flatten())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0, // gone meanwhile (a temporary file renamed)
        })
        .sum()
}

/// `calls` calls from node `from` (through its control socket) to the
/// `soak.echo` handler on node `to`: the round trips of those answered,
/// and the failures (printed with the time, to find in the nodes' logs).
async fn call_latencies(lan: &Lan, from: usize, to: usize, calls: usize) -> (Vec<Duration>, usize) {
    let payload = [b'p'; 64];
    let (mut answered, mut failed) = (Vec::with_capacity(calls), 0);
    for _ in 0..calls {
        let req = Request::Call {
            target: format!("n{to}"),
            name: "soak.echo".into(),
            len: payload.len() as u64,
            timeout_ms: 5000,
        };
        let t = Instant::now();
        let reply = exchange(&lan.data(from), &req, &payload).await;
        let took = t.elapsed();
        let failure = match reply {
            Ok(r) if r.bytes == payload => None,
            Ok(r) => Some(format!("{:?}", r.answer)),
            Err(e) => Some(format!("{e:#}")),
        };
        match failure {
            None => answered.push(took),
            Some(why) => {
                failed += 1;
                let at = covey::clock::now_ms();
                println!("call n{from} → n{to} failed after {took:?} (unix ms {at}): {why}");
            }
        }
        if took > Duration::from_millis(500) {
            let at = covey::clock::now_ms();
            println!("slow call n{from} → n{to}: {took:?}, ended at unix ms {at}");
        }
    }
    (answered, failed)
}

fn mean(s: &[u64]) -> f64 {
    s.iter().sum::<u64>() as f64 / s.len().max(1) as f64
}

/// Per hour, from the first half's mean to the second half's.
fn growth_per_hour(values: &[u64], minutes: usize) -> (f64, f64) {
    let half = values.len() / 2;
    let (a, b) = (mean(&values[..half]), mean(&values[half..]));
    let per_hour = 60.0 / (minutes as f64 / 2.0).max(1.0);
    ((b - a) * per_hour, a)
}

/// Per third of the run, the growth rate of `values` in KiB an hour: from
/// the mean of the third's first quarter to the mean of its last, which
/// the reload saw-tooth averages out of.
fn growth_per_third(values: &[u64]) -> Vec<f64> {
    let n = values.len() / 3;
    if n < 4 {
        return Vec::new();
    }
    (0..3)
        .map(|t| {
            let part = &values[t * n..(t + 1) * n];
            let q = n / 4;
            let minutes = (n - q) as f64;
            (mean(&part[n - q..]) - mean(&part[..q])) * 60.0 / minutes
        })
        .collect()
}

#[ignore = "an hour long; a documented command, see docs/reliability.md"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let minutes: usize = std::env::var("COVEY_SOAK_MINS")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(60);
    let Some(mut lan) = Lan::new_or_skip(NODES, "k", "soak") else {
        return;
    };
    // Info only: an hour of debug lines is not what is being measured.
    lan.log = match std::env::var("COVEY_SOAK_LOG") {
        Ok(filter) => filter.leak(),
        Err(_) => "info",
    };
    let token = ClusterToken::generate();
    for i in 1..=NODES {
        lan.run(i, &token);
    }
    crate::all_linked_n(&lan, NODES, "links up").await;
    let load = |version: usize| LOAD.replace("VERSION", &version.to_string());
    write_file(&lan.scripts(1).join("load.lua"), &load(0));

    let started = Instant::now();
    let mut rows: Vec<[Sample; NODES]> = Vec::new();
    let mut all_calls = Vec::new();
    let mut failed = 0;
    println!(
        "minute | per node: RSS KiB (anonymous, heap in use KiB), fds, data KiB | call n1→n2, n2→n3 p50/p99 µs"
    );
    for minute in 1..=minutes {
        tokio::time::sleep_until((started + Duration::from_secs(60 * minute as u64)).into()).await;
        for i in 1..=NODES {
            assert!(lan.alive(i), "n{i} exited at minute {minute}");
        }
        let (mut lat, failed_12) = call_latencies(&lan, 1, 2, 50).await;
        let (more, failed_23) = call_latencies(&lan, 2, 3, 50).await;
        lat.extend(more);
        failed += failed_12 + failed_23;
        assert!(!lat.is_empty(), "no call answered at minute {minute}");
        let mut row = [Sample::default(); NODES];
        for (k, s) in row.iter_mut().enumerate() {
            *s = sample(&lan, k + 1).await;
        }
        let cells: Vec<String> = (row.iter())
            .map(|s| {
                let (rss, anon, heap) = (s.rss_kib, s.anon_kib, s.heap_kib);
                format!("{rss} ({anon}, {heap}) {} {}", s.fds, s.data_kib)
            })
            .collect();
        println!(
            "{minute:>6} | {} | {:.0}/{:.0}",
            cells.join(" | "),
            us(pct(&mut lat, 50)),
            us(pct(&mut lat, 99))
        );
        all_calls.extend(lat);
        rows.push(row);
        // The reload: a new version of the load script, synced from n1
        // to every node and hot-reloaded there.
        write_file(&lan.scripts(1).join("load.lua"), &load(minute));
    }

    for i in 0..NODES {
        let col = |f: fn(&Sample) -> u64| rows.iter().map(|r| f(&r[i])).collect::<Vec<u64>>();
        let (rss, rss0) = growth_per_hour(&col(|s| s.rss_kib), minutes);
        let (data, data0) = growth_per_hour(&col(|s| s.data_kib), minutes);
        let fds = col(|s| s.fds as u64);
        // Levelling off shows as growth that falls from third to third.
        let thirds = |f: fn(&Sample) -> u64| -> String {
            let g: Vec<String> = (growth_per_third(&col(f)).iter())
                .map(|g| format!("{g:+.0}"))
                .collect();
            g.join(", ")
        };
        println!(
            "n{}: growth per third, KiB/h: RSS {}; anonymous {}; heap in use {}",
            i + 1,
            thirds(|s| s.rss_kib),
            thirds(|s| s.anon_kib),
            thirds(|s| s.heap_kib)
        );
        println!(
            "n{}: RSS {rss0:.0} KiB, {rss:+.0} KiB/h; data {data0:.0} KiB, {data:+.0} KiB/h; fds {}..{}",
            i + 1,
            fds.iter().min().unwrap(),
            fds.iter().max().unwrap()
        );
        // Descriptors: a leak grows with every minute's calls and reload.
        let settled = fds[fds.len() / 2..].iter().max().unwrap();
        assert!(
            *settled <= fds[..fds.len().div_ceil(2)].iter().max().unwrap() + 8,
            "n{}: file descriptors grew: {fds:?}",
            i + 1
        );
    }
    println!(
        "calls: {} answered, {failed} failed, p50 {:.0} µs, p99 {:.0} µs over the whole run",
        all_calls.len(),
        us(pct(&mut all_calls, 50)),
        us(pct(&mut all_calls, 99))
    );
}
