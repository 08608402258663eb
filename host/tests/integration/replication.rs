//! The key-value store replicated between in-process nodes over QUIC on
//! loopback: sets, deletes, counters from several nodes at once, conflicts,
//! watches firing for remote changes, late joiners.

use std::time::Duration;

use covey::cluster::credentials::ClusterToken;

use crate::cluster::{addr, join, probe, three, wait_up};
use crate::common::{TestNode, eventually};

async fn converged(nodes: &[&TestNode], key: &str, want: Option<&str>) {
    for t in nodes {
        eventually(10, &format!("{key} = {want:?} on {}", t.name), || async {
            t.kv_string(key).as_deref() == want
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_deletes_and_watches_reach_every_node() {
    let (_token, [a, b, c]) = three(|_| {}).await;
    // b's probe watches `w/`; it counts what it sees in `probe-seen/<key>`.
    probe(&b, "probe.watch", "w/").await;

    assert_eq!(probe(&a, "probe.set", "w/x|hello").await, "Ok(())");
    converged(&[&a, &b, &c], "w/x", Some("hello")).await;
    // The watch on b fired for a's write, exactly once.
    converged(&[&b], "probe-last/w/x", Some("hello")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.kv_i64("probe-seen/w/x"), 1);

    // Written on c, deleted on b.
    assert_eq!(probe(&c, "probe.set", "w/y|from c").await, "Ok(())");
    converged(&[&a, &b], "w/y", Some("from c")).await;
    assert_eq!(probe(&b, "probe.delete", "w/y").await, "Ok(true)");
    converged(&[&a, &b, &c], "w/y", None).await;
    converged(&[&b], "probe-last/w/y", Some("<deleted>")).await;
    assert_eq!(probe(&a, "probe.keys", "w/").await, "w/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_from_three_nodes_at_once_lose_nothing() {
    let (_token, [a, b, c]) = three(|_| {}).await;
    // Every node creates and bumps the same counter at the same time.
    let bump = |t: &TestNode| {
        let kv = t.node().kv().clone();
        tokio::spawn(async move {
            for _ in 0..200 {
                kv.incr("hits", 1).unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let tasks = [bump(&a), bump(&b), bump(&c)];
    for t in tasks {
        t.await.unwrap();
    }
    converged(&[&a, &b, &c], "hits", Some("600")).await;
    // Through the WIT API too, with a negative delta.
    assert_eq!(probe(&b, "probe.incr", "hits|-100").await, "Ok(500)");
    converged(&[&a, &b, &c], "hits", Some("500")).await;
    assert_eq!(probe(&c, "probe.keys", "hi").await, "hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sets_converge_to_one_winner_everywhere() {
    let (_token, [a, b, c]) = three(|_| {}).await;
    // Many rounds of the same key written on every node at once.
    for round in 0..20 {
        let key = format!("race/{round}");
        for t in [&a, &b, &c] {
            t.node()
                .kv()
                .set(&key, format!("{}-{round}", t.name).as_bytes())
                .unwrap();
        }
    }
    for round in 0..20 {
        let key = format!("race/{round}");
        eventually(10, "same winner everywhere", || async {
            let v: Vec<_> = [&a, &b, &c].iter().map(|t| t.kv_string(&key)).collect();
            v[0].is_some() && v.iter().all(|x| *x == v[0])
        })
        .await;
    }
    eventually(10, "identical documents", || async {
        let h = a.node().kv().heads();
        b.node().kv().heads() == h && c.node().kv().heads() == h
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_receives_everything_and_a_returning_node_catches_up() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &["probe"], |_| {}).await;
    for i in 0..500 {
        a.node()
            .kv()
            .set(&format!("early/{i}"), format!("v{i}").as_bytes())
            .unwrap();
    }
    a.node().kv().incr("n", 5).unwrap();
    let mut b = join("b", &token, &[addr(&a)], &["probe"], |_| {}).await;
    wait_up(&[&a, &b]).await;
    converged(&[&b], "early/499", Some("v499")).await;
    converged(&[&b], "n", Some("5")).await;
    assert_eq!(b.node().kv().keys("early/").len(), 500);

    // b leaves; a keeps writing; b comes back and catches up.
    b.stop().await;
    a.node().kv().set("while-away", b"yes").unwrap();
    a.node().kv().incr("n", 1).unwrap();
    let mut cfg = b.config();
    cfg.cluster = Some(crate::cluster::cluster_config(&token, &[addr(&a)]));
    b.restart(cfg).await;
    converged(&[&b], "while-away", Some("yes")).await;
    converged(&[&b], "n", Some("6")).await;
    // Nothing written on b was lost by leaving: its own store kept it.
    assert_eq!(b.kv_string("early/0").as_deref(), Some("v0"));
}

fn lua_version(v: &str) -> String {
    format!("covey.handle('*', 'ver', function() return '{v}' end)\n")
}

/// Wait until `t` runs `rel` answering `ver` with `want`.
async fn runs(t: &TestNode, want: &str) {
    eventually(20, &format!("{} runs version {want}", t.name), || async {
        t.call("ver", "").await.ok().as_deref() == Some(want)
    })
    .await;
}

fn write_script(t: &TestNode, rel: &str, text: &str) {
    let path = t.scripts.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("partial~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_created_edited_deleted_anywhere_reach_every_node() {
    let (_token, [a, b, c]) = three(|_| {}).await;
    // Created on a, in a nested folder: runs on every node.
    write_script(&a, "deep/er/greet.lua", &lua_version("v1"));
    for t in [&a, &b, &c] {
        runs(t, "v1").await;
    }
    assert!(c.scripts.join("deep/er/greet.lua").exists());
    // Edited on b: every node reloads it.
    write_script(&b, "deep/er/greet.lua", &lua_version("v2"));
    for t in [&a, &b, &c] {
        runs(t, "v2").await;
    }
    // Renamed on c: the old path goes, the new one runs, everywhere.
    std::fs::rename(
        c.scripts.join("deep/er/greet.lua"),
        c.scripts.join("greet.lua"),
    )
    .unwrap();
    for t in [&a, &b, &c] {
        eventually(20, "rename synced", || async {
            !t.scripts.join("deep/er/greet.lua").exists() && t.scripts.join("greet.lua").exists()
        })
        .await;
        runs(t, "v2").await;
    }
    // Deleted on a: gone everywhere, and nothing answers any more.
    std::fs::remove_file(a.scripts.join("greet.lua")).unwrap();
    for t in [&a, &b, &c] {
        eventually(20, "delete synced", || async {
            !t.scripts.join("greet.lua").exists() && t.call("ver", "").await.is_err()
        })
        .await;
    }
    // No echo: each change was recorded once, by the node where it was made
    // (the manifest holds one entry per path, no conflicts).
    assert!(
        std::fs::read_dir(&a.scripts)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("conflict")),
        "no conflict copies from echoes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_gets_the_directory_and_offline_edits_conflict_visibly() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |_| {}).await;
    write_script(&a, "greet.lua", &lua_version("base"));
    std::fs::write(a.scripts.join("notes.txt"), "not a script, synced too").unwrap();
    runs(&a, "base").await;
    let mut b = join("b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    runs(&b, "base").await;
    assert_eq!(
        std::fs::read_to_string(b.scripts.join("notes.txt")).unwrap(),
        "not a script, synced too"
    );

    // b goes offline; both sides edit the same file.
    b.stop().await;
    write_script(&a, "greet.lua", &lua_version("from-a"));
    runs(&a, "from-a").await;
    write_script(&b, "greet.lua", &lua_version("from-b"));
    let mut cfg = b.config();
    cfg.cluster = Some(crate::cluster::cluster_config(&token, &[addr(&a)]));
    b.restart(cfg).await;
    wait_up(&[&a, &b]).await;

    // One winner on both nodes; the other version kept as a conflict copy.
    let winner = |t: &TestNode| std::fs::read_to_string(t.scripts.join("greet.lua")).unwrap();
    eventually(20, "same winner on a and b", || async {
        winner(&a) == winner(&b)
    })
    .await;
    let won = winner(&a);
    let lost = if won.contains("from-a") {
        "from-b"
    } else {
        "from-a"
    };
    for t in [&a, &b] {
        eventually(20, &format!("conflict copy on {}", t.name), || async {
            std::fs::read_dir(&t.scripts).unwrap().flatten().any(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("greet.lua.conflict-")
                    && std::fs::read_to_string(e.path()).unwrap().contains(lost)
            })
        })
        .await;
        runs(t, if lost == "from-a" { "from-b" } else { "from-a" }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_keeps_its_valid_part_and_resyncs_from_peers() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |_| {}).await;
    let mut b = join("b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    for i in 0..200 {
        a.node()
            .kv()
            .set(&format!("k/{i}"), format!("v{i}").as_bytes())
            .unwrap();
    }
    converged(&[&b], "k/199", Some("v199")).await;
    b.stop().await;
    // Damage the end of b's store file.
    let file = b.data.join("kv.automerge");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len - len / 3).unwrap();
    drop(f);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .map(|mut f| std::io::Write::write_all(&mut f, b"\x85\x6f\x4a\x83garbage"))
        .unwrap()
        .unwrap();
    let mut cfg = b.config();
    cfg.cluster = Some(crate::cluster::cluster_config(&token, &[addr(&a)]));
    b.restart(cfg).await;
    // The bad file is kept aside, not deleted; the rest comes from a.
    let aside = std::fs::read_dir(&b.data)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(aside, "corrupted file moved aside");
    wait_up(&[&a, &b]).await;
    converged(&[&b], "k/199", Some("v199")).await;
    converged(&[&b], "k/0", Some("v0")).await;
    assert_eq!(b.node().kv().keys("k/").len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_values_written_apart_converge_in_one_large_sync() {
    let token = ClusterToken::generate();
    // Two nodes of one cluster that have not met, as after a partition:
    // each writes 40 MiB of 1 MiB values (far over the message payload
    // limit and a link's queue budget when sent in one sync message).
    let a = join("a", &token, &[], &[], |_| {}).await;
    let b = join("b", &token, &[], &[], |_| {}).await;
    // Incompressible values (Automerge compresses its columns).
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    for i in 0..40 {
        a.node()
            .kv()
            .set(&format!("big/a{i}"), &noise(1 << 20))
            .unwrap();
        b.node()
            .kv()
            .set(&format!("big/b{i}"), &noise(1 << 20))
            .unwrap();
    }
    b.node().cluster().unwrap().add_peer(&addr(&a).to_string());
    wait_up(&[&a, &b]).await;
    eventually(60, "both stores identical", || async {
        a.node().kv().heads() == b.node().kv().heads()
    })
    .await;
    assert_eq!(a.node().kv().keys("big/").len(), 80);
    assert_eq!(b.node().kv().get("big/a39").unwrap().len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_edit_not_yet_recorded_is_never_overwritten_by_a_peer() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |c| c.watch = false).await;
    let sync = a.node().scripts_sync().unwrap().clone();
    // Edited here (the watcher is off: not recorded yet) while a peer's
    // version of the same file arrives.
    std::fs::write(a.scripts.join("notes.txt"), "edited here").unwrap();
    sync.inject_unchecked("notes.txt", &[("b", Some(b"from b".as_slice()))])
        .await;
    sync.reconcile().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(a.scripts.join("notes.txt")).unwrap(),
        "edited here"
    );
    // Once recorded, the local edit is the newer version everywhere.
    sync.rescan().await.unwrap();
    sync.reconcile().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(a.scripts.join("notes.txt")).unwrap(),
        "edited here"
    );
    let heads = sync.heads();
    sync.rescan().await.unwrap();
    assert_eq!(sync.heads(), heads, "nothing new to record");
}

/// Write `n` keys on `t`, each its own change (each waits for the disk,
/// which closes the change).
async fn changes(t: &TestNode, prefix: &str, n: usize) {
    let kv = t.node().kv().clone();
    for i in 0..n {
        kv.set(&format!("{prefix}{i}"), format!("v{i}").as_bytes())
            .unwrap();
        kv.durable().await.unwrap();
    }
}

async fn same_history(nodes: &[&TestNode]) {
    eventually(20, "same epoch and heads everywhere", || async {
        let first = (nodes[0].node().kv().epoch(), nodes[0].node().kv().heads());
        nodes[1..]
            .iter()
            .all(|t| (t.node().kv().epoch(), t.node().kv().heads()) == first)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_compacted_everywhere_once_every_member_holds_it() {
    let (_token, [a, b, c]) = three(|c| c.kv.compact_after = 40).await;
    b.node().kv().incr("hits", 2).unwrap();
    changes(&a, "k", 100).await;
    for t in [&a, &b, &c] {
        eventually(20, &format!("{} compacted", t.name), || async {
            t.node().kv().epoch().epoch >= 1
        })
        .await;
    }
    converged(&[&a, &b, &c], "k99", Some("v99")).await;
    same_history(&[&a, &b, &c]).await;
    for t in [&a, &b, &c] {
        let len = t.node().kv().history_len();
        assert!(len < 40, "{}: {len} changes after compaction", t.name);
        assert_eq!(t.node().kv().keys("k").len(), 100);
        assert_eq!(t.kv_string("hits").as_deref(), Some("2"));
    }
    // Writes go on in the new epoch, from any node.
    assert_eq!(probe(&c, "probe.set", "after|compaction").await, "Ok(())");
    c.node().kv().incr("hits", 1).unwrap();
    converged(&[&a, &b, &c], "after", Some("compaction")).await;
    converged(&[&a, &b, &c], "hits", Some("3")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_its_own_history_joins_a_compacted_cluster_and_keeps_it() {
    let token = ClusterToken::generate();
    let tweak = |c: &mut covey::config::NodeConfig| c.kv.compact_after = 40;
    let a = join("a", &token, &[], &["probe"], tweak).await;
    let b = join("b", &token, &[addr(&a)], &["probe"], tweak).await;
    wait_up(&[&a, &b]).await;
    changes(&a, "k", 100).await;
    same_history(&[&a, &b]).await;
    eventually(20, "compacted", || async {
        a.node().kv().epoch().epoch >= 1
    })
    .await;
    // `d` starts alone (same cluster, no peers), writes, then meets `a`.
    let mut d = join("d", &token, &[], &["probe"], |_| {}).await;
    d.node().kv().set("d/own", b"mine").unwrap();
    d.node().kv().set("k7", b"d's k7").unwrap();
    d.node().kv().incr("hits", 4).unwrap();
    d.node().kv().durable().await.unwrap();
    d.stop().await;
    let mut cfg = d.config();
    cfg.cluster = Some(crate::cluster::cluster_config(&token, &[addr(&a)]));
    d.restart(cfg).await;
    converged(&[&a, &b, &d], "d/own", Some("mine")).await;
    converged(&[&a, &b, &d], "k99", Some("v99")).await;
    converged(&[&a, &b, &d], "hits", Some("4")).await;
    // Written on `d` after everything in the base: it wins.
    converged(&[&a, &b, &d], "k7", Some("d's k7")).await;
    same_history(&[&a, &b, &d]).await;
    assert!(d.node().kv().epoch().epoch >= 1);
}
