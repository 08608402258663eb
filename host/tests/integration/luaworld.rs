//! Lua written by others runs unmodified, with the same output as the
//! reference interpreter (`lua5.4`): Penlight, luassert and say, argparse,
//! inspect, moses and dkjson — Debian's packages, copied from
//! `/usr/share/lua` at test time (nothing of theirs is in this repository)
//! — driven by `fixtures/lua-world/suite.lua`, and dkjson's own test
//! program. `bash .ci/test` installs them; without them the tests say
//! SKIPPED (and fail under `CI=true`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{eventually, start};
use crate::lua::load;
use crate::process::covey_exec;

/// Debian's packages, and where each library comes from (inspect and
/// moses ship for 5.1-5.3 only; they are plain Lua that 5.4 runs).
const LIBRARIES: [&str; 7] = [
    "5.4/pl",
    "5.4/luassert",
    "5.4/say",
    "5.4/argparse.lua",
    "5.4/dkjson.lua",
    "5.3/inspect.lua",
    "5.3/moses.lua",
];
const PACKAGES: &str =
    "lua5.4 lua-penlight lua-luassert lua-say lua-argparse lua-dkjson lua-inspect lua-moses";
const JSONTEST: &str = "/usr/share/doc/lua-dkjson/examples/jsontest.lua";

/// The libraries copied into `dir` (symlinks followed), or None (and
/// SKIPPED said) when they are not installed.
fn libraries(dir: &Path) -> Option<()> {
    let have_lua = Command::new("lua5.4").arg("-v").output().is_ok();
    let missing: Vec<&str> = LIBRARIES
        .iter()
        .copied()
        .filter(|l| !Path::new("/usr/share/lua").join(l).exists())
        .collect();
    if !have_lua || !missing.is_empty() || !Path::new(JSONTEST).exists() {
        crate::skip::missing(&format!(
            "real-world Lua: install {PACKAGES} (bash .ci/test does); missing: {missing:?}"
        ));
        return None;
    }
    for l in LIBRARIES {
        let src = Path::new("/usr/share/lua").join(l);
        copy_tree(&src, &dir.join(src.file_name().unwrap()));
    }
    Some(())
}

fn copy_tree(src: &Path, dst: &Path) {
    if std::fs::metadata(src).unwrap().is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap();
    }
}

/// `lua5.4 FILE` in the file's directory, modules found beside it.
fn reference(file: &Path) -> String {
    let out = Command::new("lua5.4")
        .arg(file.file_name().unwrap())
        .current_dir(file.parent().unwrap())
        .env("LUA_PATH", "./?.lua;./?/init.lua")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn suite() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lua-world/suite.lua")
}

#[test]
fn libraries_by_others_run_under_exec_as_under_lua() {
    let dir = tempfile::tempdir().unwrap();
    if libraries(dir.path()).is_none() {
        return;
    }
    let file = dir.path().join("suite.lua");
    std::fs::copy(suite(), &file).unwrap();
    let (ok, out, err) = covey_exec(&file, &[]);
    assert!(ok, "{err}");
    assert_eq!(out, reference(&file));
    assert!(out.contains("Animal(rex)\trex says woof"), "{out}");
}

#[test]
fn dkjson_test_program_runs_unmodified() {
    let dir = tempfile::tempdir().unwrap();
    if libraries(dir.path()).is_none() {
        return;
    }
    let file = dir.path().join("jsontest.lua");
    std::fs::copy(JSONTEST, &file).unwrap();
    let (ok, out, err) = covey_exec(&file, &[]);
    assert!(ok, "{err}");
    // What differs between two runs of the reference itself: the order of
    // a table's hash part (seeded per run), and whether the machine has
    // the test's German locale (the sandbox's C library accepts any).
    let comparable = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with("mixed table encoded as:"))
            .filter(|l| !l.starts_with("test could not switch to locale"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(comparable(&out), comparable(&reference(&file)));
    assert!(out.contains("sparse array (#=0) encoded as:"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libraries_by_others_load_with_require_in_a_script() {
    let t = start(&[]).await;
    if libraries(&t.scripts.join("lib")).is_none() {
        return;
    }
    let script = r#"
local List = require("pl.List")
local inspect = require("inspect")
local assert = require("luassert")
local json = require("dkjson")
covey.handle("*", "world", function(msg)
  local ok = pcall(assert.are.same, { 1 }, { 2 })
  local l = List(json.decode(msg.payload)):map(function(x) return x + 1 end)
  return inspect({ table.unpack(l:slice(1, 2)) }) .. "|" .. tostring(ok) .. "|" .. tostring(package.loaded["pl.List"] == List)
end)
"#;
    load(&t, "world.lua", script).await;
    eventually(10, "world.lua answers", || async {
        t.call("world", "[1,2,3]").await.as_deref() == Ok("{ 2, 3 }|false|true")
    })
    .await;
}
