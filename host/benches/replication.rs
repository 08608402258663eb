//! Replication benchmark: `cargo bench -p covey --bench replication`.
//!
//! In-process nodes linked over QUIC on loopback. Prints:
//! - `set` on node A → a `watch` on node B firing (p50/p99);
//! - convergence of two nodes that each wrote 10,000 keys apart, from the
//!   moment they link;
//! - a new node receiving 100 script files totalling 10 MB;
//! - memory and disk for 100,000 keys;
//! - the cost of merging one peer's write as the document's history grows
//!   (what a long-running node pays per replicated write).
//!
//! `COVEY_BENCH_QUICK=1` for a smoke run; `COVEY_BENCH_ONLY=merge` (or `keys`)
//! for that figure alone.

use std::path::Path;
use std::time::{Duration, Instant};

use covey::cluster::ClusterConfig;
use covey::cluster::credentials::ClusterToken;
use covey::router::{Delivery, PeerStatus, SubKind};
use covey::{Node, NodeConfig};

mod support;
use support::{ms, pct, sample, us};

fn main() {
    let quick = support::start("replication");
    match std::env::var("COVEY_BENCH_ONLY").as_deref() {
        Ok("merge") => return merge_cost(quick),
        Ok("keys") => return keys_footprint(if quick { 10_000 } else { 100_000 }),
        _ => {}
    }
    let rt = support::runtime();
    rt.block_on(async {
        set_to_watch(if quick { 200 } else { 2_000 }).await;
        heal_convergence(if quick { 1_000 } else { 10_000 }).await;
        late_joiner_scripts(if quick { 20 } else { 100 }, 100 * 1024).await;
    });
    keys_footprint(if quick { 10_000 } else { 100_000 });
    merge_cost(quick);
}

async fn node(name: &str, token: &ClusterToken, seed: Option<String>, dir: &Path) -> Node {
    let scripts = dir.join(name).join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    let mut cfg = NodeConfig::new(name, scripts, dir.join(name).join("data"));
    let mut c = ClusterConfig::new(token.clone());
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.mdns = false;
    c.peers = seed.into_iter().collect();
    cfg.cluster = Some(c);
    Node::start(cfg).await.unwrap()
}

async fn linked(a: &Node, b: &Node) {
    let bn = b.router().node_name().to_string();
    while a.cluster().unwrap().status(&bn) != PeerStatus::Up {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn set_to_watch(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let token = ClusterToken::generate();
    let a = node("a", &token, None, dir.path()).await;
    let seed = a.cluster().unwrap().local_addr().to_string();
    let b = node("b", &token, Some(seed), dir.path()).await;
    linked(&a, &b).await;
    // A watcher on B, registered like a script's: the figure stops where a
    // script's `on-kv-change` would be called.
    let (tx, mut rx) = covey::router::mailbox(1024);
    b.router().register("bench-watch".into(), tx);
    b.router().subscribe(
        "bench-watch",
        1,
        SubKind::Watch {
            prefix: "lat/".into(),
        },
    );
    let mut lat = sample(rounds, async |i| {
        let key = format!("lat/{i}");
        a.kv().set(&key, b"0123456789abcdef")?;
        a.kv().durable().await?;
        loop {
            match rx.recv().await.unwrap() {
                Delivery::KvChange { key: k, .. } if *k == *key => return Ok(()),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    println!(
        "set on A (acknowledged, fsynced) -> watch firing on B ({rounds} sets): p50 {:.2} ms, p99 {:.2} ms",
        ms(pct(&mut lat, 50)),
        ms(pct(&mut lat, 99))
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

async fn heal_convergence(keys: usize) {
    let dir = tempfile::tempdir().unwrap();
    let token = ClusterToken::generate();
    // Two nodes of one cluster that have not met: as after a partition.
    let a = node("a", &token, None, dir.path()).await;
    let b = node("b", &token, None, dir.path()).await;
    for i in 0..keys {
        a.kv().set(&format!("a/{i}"), b"value from a").unwrap();
        b.kv().set(&format!("b/{i}"), b"value from b").unwrap();
    }
    a.kv().durable().await.unwrap();
    b.kv().durable().await.unwrap();
    let t = Instant::now();
    b.cluster()
        .unwrap()
        .add_peer(&a.cluster().unwrap().local_addr().to_string());
    linked(&a, &b).await;
    let link = t.elapsed();
    while a.kv().heads() != b.kv().heads() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let total = t.elapsed();
    assert_eq!(a.kv().keys("").len(), 2 * keys);
    println!(
        "heal: two nodes with {keys} divergent keys each converge {:.0} ms after they link \
         ({:.0} ms from the first dial, {:.0} ms of it the QUIC handshake and hello)",
        ms(total - link),
        ms(total),
        ms(link)
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

async fn late_joiner_scripts(files: usize, size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let token = ClusterToken::generate();
    let a = node("a", &token, None, dir.path()).await;
    let scripts = dir.path().join("a/scripts/bulk");
    std::fs::create_dir_all(&scripts).unwrap();
    let mut expected = Vec::new();
    for i in 0..files {
        // Lua files that are mostly a long comment: valid scripts, and
        // incompressible enough (random-ish text) to be a fair size.
        let mut text = format!("-- file {i}\n--[[\n");
        let mut x: u64 = 0x9e3779b97f4a7c15 ^ i as u64;
        while text.len() < size - 16 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push(char::from(b'a' + (x % 26) as u8));
        }
        text.push_str("\n]]\n");
        let name = format!("s{i:03}.lua");
        std::fs::write(scripts.join(&name), &text).unwrap();
        expected.push((name, text.len()));
    }
    // Wait until A recorded them all.
    let sync = a.scripts_sync().unwrap().clone();
    sync.rescan().await.unwrap();
    let total: usize = expected.iter().map(|(_, n)| n).sum();
    let t = Instant::now();
    let seed = a.cluster().unwrap().local_addr().to_string();
    let b = node("b", &token, Some(seed), dir.path()).await;
    let started = t.elapsed();
    let dest = dir.path().join("b/scripts/bulk");
    loop {
        let done = expected.iter().all(|(name, len)| {
            std::fs::metadata(dest.join(name)).is_ok_and(|m| m.len() as usize == *len)
        });
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t.elapsed();
    println!(
        "new node receives {files} scripts ({:.1} MB): {:.0} ms from its start ({:.0} ms of it the node starting)",
        total as f64 / 1e6,
        ms(elapsed),
        ms(started)
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 100,000 keys written one by one, each its own Automerge change (as a
/// script writing one key at a time, each acknowledged before the next,
/// would make them), appended to the file every 1,000 writes as the
/// flusher would; then the same store reopened, as after a restart.
fn keys_footprint(keys: usize) {
    use covey::kvdoc::{KvDoc, KvLimits};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.automerge");
    let router = std::sync::Arc::new(covey::router::Router::new("bench", 1 << 20));
    let before = rss_kib();
    let kv = KvDoc::open(Some(path.clone()), KvLimits::default(), router).unwrap();
    let t = Instant::now();
    for i in 0..keys {
        kv.set(
            &format!("sensor/{i:06}/reading"),
            format!("{{\"t\":{i}}}").as_bytes(),
        )
        .unwrap();
        // Reading the heads closes the change: one change per write.
        kv.heads();
        if i % 1000 == 999 {
            kv.flush().unwrap();
        }
    }
    kv.flush().unwrap();
    let write = t.elapsed();
    let grown = rss_kib().saturating_sub(before);
    let disk = std::fs::metadata(&path).unwrap().len();
    drop(kv);
    let t = Instant::now();
    let router = std::sync::Arc::new(covey::router::Router::new("bench", 1 << 20));
    let kv = KvDoc::open(Some(path.clone()), KvLimits::default(), router).unwrap();
    let load = t.elapsed();
    let reopened = rss_kib().saturating_sub(before);
    assert_eq!(kv.len(), keys);
    println!(
        "{keys} keys (~25-byte keys, ~10-byte values, one change each): {:.1} MiB more RSS \
         after writing them, {:.1} MiB after reopening, {:.1} MiB on disk; {:.0} ms to write \
         them one by one, {:.0} ms to load",
        grown as f64 / 1024.0,
        reopened as f64 / 1024.0,
        disk as f64 / (1 << 20) as f64,
        ms(write),
        ms(load)
    );
    // The same history compacted (a single node: no one else to ask),
    // while a writer goes on writing as a script would: its longest write
    // is how long the compaction held the store.
    let t = Instant::now();
    let heads = kv.compaction_due().expect("compaction due");
    let done = std::sync::atomic::AtomicBool::new(false);
    let (stall, writes) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut longest, mut n) = (Duration::ZERO, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let w = Instant::now();
                kv.set(&format!("during/{}", n % 100), b"x").unwrap();
                longest = longest.max(w.elapsed());
                n += 1;
            }
            (longest, n)
        });
        kv.compact_at(&heads, &[]).unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    kv.flush().unwrap();
    let compact = t.elapsed();
    let compacted = rss_kib().saturating_sub(before);
    let disk = std::fs::metadata(&path).unwrap().len();
    drop(kv);
    let router = std::sync::Arc::new(covey::router::Router::new("bench", 1 << 20));
    let t = Instant::now();
    let kv = KvDoc::open(Some(path.clone()), KvLimits::default(), router).unwrap();
    let load = t.elapsed();
    let reopened = rss_kib().saturating_sub(before);
    assert_eq!(kv.len(), keys + 100.min(writes as usize));
    println!(
        "the same {keys} keys compacted ({} change(s)) while {writes} writes went on: the longest \
         write took {:.1} ms of the compaction's {:.0} ms",
        kv.history_len(),
        ms(stall),
        ms(compact)
    );
    println!(
        "the same {keys} keys compacted: {:.1} MiB more RSS after compacting, \
         {:.1} MiB after reopening, {:.1} MiB on disk; {:.0} ms to compact, {:.0} ms to load",
        compacted as f64 / 1024.0,
        reopened as f64 / 1024.0,
        disk as f64 / (1 << 20) as f64,
        ms(compact),
        ms(load)
    );
}

/// Two in-memory key-value stores kept in sync by hand (the replicator's
/// exchange without the network): A writes a history of `h` changes
/// (200 keys and 20 counters, as a busy node's scripts would), B follows;
/// then the cost, on B, of receiving A's next write, and on A of
/// generating it — per write, at each history length.
fn merge_cost(quick: bool) {
    use covey::docsync::SyncTarget;
    use covey::kvdoc::{KvDoc, KvLimits};
    use std::sync::Arc;
    let open = |name: &str| {
        let router = Arc::new(covey::router::Router::new(name, 1 << 20));
        KvDoc::open(None, KvLimits::default(), router).unwrap()
    };
    let (a, b) = (open("a"), open("b"));
    let (mut sa, mut sb) = (automerge::sync::State::new(), automerge::sync::State::new());
    // Run the exchange until both sides are quiet; time each side's work.
    let mut exchange = |a: &KvDoc, b: &KvDoc| -> (Duration, Duration) {
        let (mut send, mut recv) = (Duration::ZERO, Duration::ZERO);
        loop {
            let t = Instant::now();
            let to_b = a.generate(&mut sa);
            let to_a = b.generate(&mut sb);
            send += t.elapsed();
            if to_b.is_none() && to_a.is_none() {
                return (send, recv);
            }
            let t = Instant::now();
            if let Some(m) = to_b {
                b.receive(&mut sb, &m).unwrap();
            }
            if let Some(m) = to_a {
                a.receive(&mut sa, &m).unwrap();
            }
            recv += t.elapsed();
        }
    };
    let write = |kv: &KvDoc, i: usize| {
        if i % 5 == 4 {
            kv.incr(&format!("count/{}", i % 20), 1).unwrap();
        } else {
            kv.set(&format!("key/{}", i % 200), format!("value {i}").as_bytes())
                .unwrap();
        }
    };
    let steps: &[usize] = if quick {
        &[1_000, 5_000]
    } else {
        &[1_000, 10_000, 50_000]
    };
    let mut written = 0;
    for &h in steps {
        while written < h {
            write(&a, written);
            // One change per write (writes share a change otherwise).
            a.heads();
            written += 1;
        }
        exchange(&a, &b);
        assert_eq!(a.heads(), b.heads());
        let rounds = 200;
        let (mut send, mut recv) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..rounds {
            write(&a, written);
            written += 1;
            let (s, r) = exchange(&a, &b);
            send += s;
            recv += r;
        }
        println!(
            "merge one write into a history of {h:>6} changes: {:.0} us receiving, \
             {:.0} us generating (per write, {rounds} writes)",
            us(recv / rounds),
            us(send / rounds)
        );
    }
    // The same history compacted: `a` compacts (`b` holds its heads), and
    // `b` follows on `a`'s next message.
    let heads = a.heads();
    a.compact_at(&heads, &["b".into()]).unwrap();
    exchange(&a, &b);
    assert_eq!((a.heads(), a.epoch()), (b.heads(), b.epoch()));
    let rounds = 200;
    let (mut send, mut recv) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        write(&a, written);
        written += 1;
        let (s, r) = exchange(&a, &b);
        send += s;
        recv += r;
    }
    println!(
        "merge one write after compacting that history ({} changes): {:.0} us receiving, \
         {:.0} us generating (per write, {rounds} writes)",
        b.history_len(),
        us(recv / rounds),
        us(send / rounds)
    );
}
