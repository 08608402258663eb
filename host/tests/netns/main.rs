//! Separate `covey run` processes in network namespaces joined by a bridge:
//! mDNS discovery, another cluster on the same LAN, a cut link detected,
//! and the cluster healing by itself.
//!
//! Needs root and `ip` (iproute2). Without them (and not under `CI=true`,
//! where it fails) the test prints SKIPPED
//! and passes: the message is in the test output, never silent.

use std::time::Duration;

use covey::cluster::credentials::ClusterToken;

// The shared helpers (this binary uses a few of them).
#[allow(dead_code)]
#[path = "../integration/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../support/lan.rs"]
mod lan;
#[path = "../support/skip.rs"]
mod skip;

use common::eventually;
use lan::{Lan, ip, write_file};

/// The namespace tests run one at a time, and in their own test binary so
/// that no in-process test competes with their processes for the CPU and
/// the disk: what they time is failure detection, not a loaded machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Wait until n1..n3 each see the other two up.
async fn all_linked(lan: &Lan, what: &str) {
    for (i, others) in [(1, ["n2", "n3"]), (2, ["n1", "n3"]), (3, ["n1", "n2"])] {
        eventually(60, &format!("n{i} {what}"), || async move {
            lan.up_peers(i).await == names(&others)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_discovery_partition_and_heal_across_namespaces() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut lan) = Lan::new_or_skip(
        4,
        "d",
        "mdns_discovery_partition_and_heal_across_namespaces",
    ) else {
        return;
    };
    let token = ClusterToken::generate();
    for i in 1..=3 {
        lan.run(i, &token);
    }
    // n4 is on the same LAN but in another cluster.
    lan.run(4, &ClusterToken::generate());

    // Discovery: no addresses given, every node finds the other two.
    all_linked(&lan, "finds its peers over mDNS").await;
    // The other cluster's node was seen on mDNS and ignored.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lan.peers(4).await,
        Some(vec![]),
        "n4 linked to another cluster"
    );
    assert_eq!(lan.peers(1).await.unwrap().len(), 2, "{}", lan.log(1));

    // Cut n3's cable: both sides see the other down within a few seconds.
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "down"]).unwrap();
    for (i, up) in [(1, vec!["n2"]), (2, vec!["n1"]), (3, vec![])] {
        let lan = &lan;
        let up = names(&up);
        eventually(30, &format!("n{i} sees the cut"), || {
            let up = up.clone();
            async move { lan.up_peers(i).await == up }
        })
        .await;
    }
    assert_eq!(
        lan.peers(1).await.unwrap(),
        vec![("n2".to_string(), true), ("n3".to_string(), false)],
        "n3 is still a known member, marked down"
    );

    // Heal: everyone links again without help.
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "up"]).unwrap();
    all_linked(&lan, "linked again after healing").await;
}

/// Every node runs this once it is synced there: a write every 10 ms, each
/// printed once `set` returned (acknowledged = on disk).
const WRITER: &str = r#"
local me = covey.node()
local n = 0
covey.every(10, function()
  n = n + 1
  covey.kv.set("w/" .. me .. "/" .. n, "x")
  print("acked " .. me .. " " .. n)
  return true
end)
"#;

/// (node, n) of every acknowledged write in a log.
fn acked(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter_map(|l| {
            let mut it = l.split("acked ").nth(1)?.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// How many conflict copies of `shared.txt` node `i` has.
fn conflict_copies(lan: &Lan, i: usize) -> usize {
    (std::fs::read_dir(lan.scripts(i))
        .into_iter()
        .flatten()
        .flatten())
    .filter(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("shared.txt.conflict-")
    })
    .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_kill_9_while_writing_then_everything_converges() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut lan) = Lan::new_or_skip(
        3,
        "f",
        "partition_and_kill_9_while_writing_then_everything_converges",
    ) else {
        return;
    };
    let token = ClusterToken::generate();
    for i in 1..=3 {
        lan.run(i, &token);
    }
    all_linked(&lan, "links up").await;
    // The writer is dropped on n1 only and spreads to every node.
    write_file(&lan.scripts(1).join("writer.lua"), WRITER);
    for i in 1..=3 {
        let lan = &lan;
        eventually(120, &format!("writer running on n{i}"), || async move {
            acked(&lan.log(i)).len() > 5
        })
        .await;
    }

    // Partition n3 away; both sides keep writing and edit scripts: a file
    // each, and the same file on both sides.
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "down"]).unwrap();
    {
        let lan = &lan;
        eventually(30, "n3 cut off", || async move {
            lan.up_peers(3).await.is_empty()
        })
        .await;
    }
    write_file(&lan.scripts(1).join("side/one.lua"), "-- written on n1\n");
    write_file(&lan.scripts(3).join("side/three.lua"), "-- written on n3\n");
    write_file(&lan.scripts(1).join("shared.txt"), "n1's version\n");
    write_file(&lan.scripts(3).join("shared.txt"), "n3's version\n");
    // Meanwhile n2 dies without warning and comes back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lan.stop(2, true);
    lan.run(2, &token);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Heal, then stop the writers (deleting the script anywhere stops it
    // everywhere) and wait until all documents are identical.
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "up"]).unwrap();
    all_linked(&lan, "linked again after healing").await;
    std::fs::remove_file(lan.scripts(2).join("writer.lua")).unwrap();
    {
        let lan = &lan;
        eventually(120, "identical documents on every node", || async move {
            let mut seen = Vec::new();
            for i in 1..=3 {
                match lan.status(i).await {
                    Some(s) => seen.push((s.kv_heads, s.scripts_heads)),
                    None => return false,
                }
            }
            (1..=3).all(|i| !lan.scripts(i).join("writer.lua").exists())
                && seen.iter().all(|s| *s == seen[0])
        })
        .await;
        // Contents follow the manifest: a version whose blob could not be
        // fetched yet (a peer slow to answer under load) is retried every
        // second, so the files can lag the heads for a while.
        // (Not `eventually`: if they never agree, the assertions below
        // say how, with each node's sync log.)
        let same_files = || {
            let shared: Vec<_> = (1..=3)
                .map(|i| std::fs::read(lan.scripts(i).join("shared.txt")).ok())
                .collect();
            shared.iter().all(|s| *s == shared[0]) && (1..=3).all(|i| conflict_copies(lan, i) == 1)
        };
        for _ in 0..600 {
            if same_files() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Still identical a moment later: the writers really stopped.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let logs: Vec<String> = (1..=3).map(|i| lan.log(i)).collect();
    for i in 1..=3 {
        lan.stop(i, false);
    }

    // Every acknowledged write, including n2's before its kill -9 and both
    // sides' during the partition, is on every node.
    let acks: Vec<(String, u64)> = logs.iter().flat_map(|l| acked(l)).collect();
    assert!(acks.len() > 100, "few writes: {}", acks.len());
    for i in 1..=3 {
        let kv = covey::kvdoc::KvDoc::open(
            Some(lan.data(i).join("kv.automerge")),
            covey::kvdoc::KvLimits::default(),
            std::sync::Arc::new(covey::router::Router::new("check", 1024)),
        )
        .unwrap();
        let missing: Vec<_> = acks
            .iter()
            .filter(|(node, n)| kv.get(&format!("w/{node}/{n}")).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "n{i} lacks {} of {} acknowledged writes, e.g. {:?}",
            missing.len(),
            acks.len(),
            &missing[..missing.len().min(5)]
        );
    }
    // Scripts: both sides' files everywhere, one winner for the shared
    // file everywhere, the other version kept as a conflict copy.
    let shared = std::fs::read_to_string(lan.scripts(1).join("shared.txt")).unwrap();
    // On a failure, what each node's scripts sync did.
    let sync_lines = || {
        let lines = |l: &String| -> String {
            (l.lines().filter(|l| l.contains("scripts sync")))
                .map(|l| format!("    {l}\n"))
                .collect()
        };
        (logs.iter().enumerate())
            .map(|(i, l)| format!("  n{}:\n{}", i + 1, lines(l)))
            .collect::<String>()
    };
    for i in 1..=3 {
        let dir = lan.scripts(i);
        assert!(dir.join("side/one.lua").exists() && dir.join("side/three.lua").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("shared.txt")).unwrap(),
            shared,
            "shared.txt on n{i} and n1 differ; scripts sync logs:\n{}",
            sync_lines()
        );
        let copies: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("shared.txt.conflict-"))
            .collect();
        assert_eq!(copies.len(), 1, "n{i}: {copies:?}\n{}", sync_lines());
        let copy = std::fs::read_to_string(dir.join(&copies[0])).unwrap();
        assert_ne!(copy, shared);
        assert!(copy.contains("version"), "{copy}");
    }
}

/// Nodes whose only addresses are IPv6 link-local ones (a LAN without
/// DHCP or router advertisements): mDNS hands out each address with the
/// interface it was heard on, gossip's unscoped ones are not dialled, and
/// links carry stream data well over one packet both ways, across a cut
/// and a heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_link_local_only_lan_links_syncs_and_heals() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut lan) = Lan::new_link_local(3, "l")
        .map_err(|e| {
            crate::skip::missing(&format!(
                "ipv6_link_local_only_lan_links_syncs_and_heals: {e}"
            ))
        })
        .ok()
    else {
        return;
    };
    let token = ClusterToken::generate();
    for i in 1..=3 {
        lan.run(i, &token);
    }
    all_linked(&lan, "finds its peers over link-local IPv6").await;
    for i in 1..=3 {
        let peers = lan.status(i).await.unwrap().cluster.unwrap().peers;
        assert!(
            peers.iter().all(|p| matches!(p.addr,
                Some(std::net::SocketAddr::V6(a))
                    if a.ip().is_unicast_link_local() && a.scope_id() != 0)),
            "n{i} linked over something else, or its status lost the interface: {peers:?}"
        );
    }
    // 300 KB through scripts sync: blobs over many packets, each way.
    let big = |seed: u8| -> Vec<u8> { (0..300_000u32).map(|i| (i % 251) as u8 ^ seed).collect() };
    let arrives = |from: usize, name: &'static str, seed: u8| {
        std::fs::write(lan.scripts(from).join(name), big(seed)).unwrap();
        let lan = &lan;
        async move {
            for i in 1..=3 {
                eventually(60, &format!("{name} from n{from} on n{i}"), || async move {
                    std::fs::read(lan.scripts(i).join(name)).ok() == Some(big(seed))
                })
                .await;
            }
        }
    };
    arrives(1, "from-n1.bin", 1).await;
    // No dial timed out on the way: an address heard through gossip carries
    // no interface, and dialling it unscoped only times out. (A dial that
    // loses a simultaneous-dial race is closed, not timed out.)
    for i in 1..=3 {
        let log = lan.log(i);
        let timed_out = |l: &&str| l.contains("cannot link") && l.contains("timed out");
        assert!(
            !log.lines().any(|l| timed_out(&l)),
            "n{i} failed a dial:\n{log}"
        );
    }
    // Cut n3 off and heal: the links come back over the same addresses.
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "down"]).unwrap();
    {
        let lan = &lan;
        eventually(30, "n3 cut off", || async move {
            lan.up_peers(3).await.is_empty()
        })
        .await;
    }
    ip(&["-n", &lan.hub, "link", "set", &lan.port(3), "up"]).unwrap();
    all_linked(&lan, "linked again after healing").await;
    arrives(3, "from-n3.bin", 3).await;
}
