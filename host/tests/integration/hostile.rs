//! A hostile cluster member (it holds the cluster token, but runs modified
//! code): manifest entries crafted to write, overwrite or delete files
//! outside the scripts directory. Every honest node refuses them, logs and
//! counts them, and keeps syncing the honest entries beside them.

use std::path::{Path, PathBuf};

use covey::cluster::credentials::ClusterToken;

use crate::cluster::{addr, join, wait_up};
use crate::common::{TestNode, eventually};

const PWNED: &[u8] = b"-- pwned\n";

/// Every regular file under `dir` whose contents are `PWNED` (symlinks
/// are not followed: what is listed is really there), except in `skip`.
/// The node keeps writing its state while this walks (a temporary file
/// renamed into place), so an entry that vanishes between the listing and
/// the read is skipped: what it became is listed under its new name.
fn pwned_files(dir: &Path, skip: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() && e.path() != skip {
            pwned_files(&e.path(), skip, out);
        } else if t.is_file() && std::fs::read(e.path()).is_ok_and(|b| b == PWNED) {
            out.push(e.path());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_manifest_entries_never_leave_the_scripts_directory() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |_| {}).await;
    // Beside a's scripts directory: a directory the attacker aims at, and
    // a symlink to it inside the scripts directory (an operator's link).
    let top = a.scripts.parent().unwrap().to_path_buf();
    let outside = top.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("victim.lua"), "keep me").unwrap();
    std::os::unix::fs::symlink(&outside, a.scripts.join("link")).unwrap();
    let kv_file = a.data.join("kv.automerge");

    let evil = join("evil", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &evil]).await;
    let sync = evil.node().scripts_sync().unwrap().clone();
    let absolute = outside.join("absolute.lua");
    let long = format!("{}x.lua", "deep/".repeat(300));
    let hostile: Vec<(String, &str)> = vec![
        ("../escaped.lua".into(), "parent"),
        ("../../escaped.lua".into(), "parent"),
        ("ok/../../escaped.lua".into(), "parent"),
        ("../data/kv.automerge".into(), "parent"),
        (absolute.to_str().unwrap().into(), "absolute"),
        ("nul\0.lua".into(), "control-char"),
        (long, "too-long"),
        (".ssh/authorized_keys".into(), "ignored-name"),
        ("..\\..\\windows.lua".into(), "windows-syntax"),
        ("C:evil.lua".into(), "windows-syntax"),
    ];
    for (key, _) in &hostile {
        sync.inject_unchecked(key, &[("evil", Some(PWNED))]).await;
    }
    // Deletes aimed outside, and a write through the symlinked directory
    // (the path itself is fine; the file system walk must not follow it).
    sync.inject_unchecked("../outside/victim.lua", &[("evil", None)])
        .await;
    sync.inject_unchecked("link/victim.lua", &[("evil", None)])
        .await;
    sync.inject_unchecked("link/through-symlink.lua", &[("evil", Some(PWNED))])
        .await;
    // Concurrent versions whose origins are paths: the conflict copy's
    // name is built from the losing origin.
    sync.inject_unchecked(
        "greet.lua",
        &[
            ("../../outside/o1", Some(PWNED)),
            ("../../outside/o2", Some(b"-- pwned too\n".as_slice())),
        ],
    )
    .await;
    // And one honest entry among them: it must still arrive and run.
    sync.inject_unchecked(
        "fine.lua",
        &[(
            "evil",
            Some(b"covey.handle('*', 'fine', function() return 'yes' end)\n".as_slice()),
        )],
    )
    .await;

    eventually(20, "the honest entry runs on a", || async {
        a.call("fine", "").await.ok().as_deref() == Some("yes")
    })
    .await;
    eventually(20, "the conflict is applied on a", || async {
        a.scripts.join("greet.lua").exists() && conflict_copy(&a).is_some()
    })
    .await;
    // Each refused entry counted once, by reason; the delete with `..`
    // too, and the write through the symlink as not applied.
    let by_reason = a.node().scripts_sync().unwrap().refused();
    let mut want = std::collections::BTreeMap::new();
    for (_, reason) in &hostile {
        *want.entry(*reason).or_insert(0u64) += 1;
    }
    *want.entry("parent").or_insert(0) += 1;
    want.insert("not-applied", 1);
    assert_eq!(by_reason, want);

    // Nothing written outside the scripts directory (but for the blob
    // store, which holds contents by hash), nothing deleted.
    let mut found = Vec::new();
    pwned_files(&top, &a.data.join("blobs"), &mut found);
    let copy = conflict_copy(&a).unwrap();
    // The copy sits beside the file, its name built from a sanitised origin.
    let copy_name = copy.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        copy_name.starts_with("greet.lua.conflict-_.._outside_o"),
        "{copy_name}"
    );
    let legit: Vec<PathBuf> = [a.scripts.join("greet.lua"), copy]
        .into_iter()
        .filter(|p| std::fs::read(p).unwrap() == PWNED)
        .collect();
    assert_eq!(legit.len(), 1);
    assert_eq!(found, legit, "files with the attacker's contents");
    assert_eq!(
        std::fs::read_to_string(outside.join("victim.lua")).unwrap(),
        "keep me"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing new beside the victim"
    );
    assert!(std::fs::read(&kv_file).map_or(true, |b| b != PWNED));
    // The node is unharmed: its store and scripts still work.
    a.node().kv().set("still", b"fine").unwrap();
    assert_eq!(a.kv_string("still").as_deref(), Some("fine"));
    assert_eq!(a.call("fine", "").await.ok().as_deref(), Some("yes"));
}

fn conflict_copy(t: &TestNode) -> Option<PathBuf> {
    std::fs::read_dir(&t.scripts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(".conflict-"))
}
