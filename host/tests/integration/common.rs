//! Shared helpers: the guest scripts (built once), nodes on temp dirs, and
//! polling with a deadline.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use covey::bindings::CallError;
use covey::{Node, NodeConfig};
use tempfile::TempDir;

#[path = "../support/guests.rs"]
mod guests;
pub use guests::guest;

/// The script the operator tests (CLI and HTTP) drive.
pub const OPS_SCRIPT: &str = r#"
covey.on("*", "ping", function(msg)
  covey.kv.set("pinged", msg.payload)
  covey.log.info("got ping " .. msg.payload)
end)
covey.handle("*", "echo", function(msg) return "echo:" .. msg.payload end)
covey.handle("*", "store", function(msg) covey.kv.set("stored", msg.payload) end)
covey.handle("*", "spin", function() while true do end end)
covey.log.info("ops script ready")
"#;

pub struct TestNode {
    pub name: String,
    pub node: Option<Node>,
    pub scripts: PathBuf,
    pub data: PathBuf,
    pub _dir: TempDir,
}

impl TestNode {
    pub fn config(&self) -> NodeConfig {
        NodeConfig::new(&self.name, self.scripts.clone(), self.data.clone())
    }

    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("node running")
    }

    /// Copy a guest into the scripts directory under `as_name`.
    pub fn install(&self, guest_name: &str, as_name: &str) -> PathBuf {
        let dest = self.scripts.join(as_name);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        // Write-then-rename, as editors and `covey` sync do: the watcher
        // sees one complete file.
        let tmp = self
            .scripts
            .join(format!(".{}.partial", as_name.replace('/', "_")));
        std::fs::copy(guest(guest_name), &tmp).unwrap();
        std::fs::rename(&tmp, &dest).unwrap();
        dest
    }

    pub async fn call(&self, name: &str, payload: &str) -> Result<String, CallError> {
        self.call_timeout(name, payload, Duration::from_secs(5))
            .await
    }

    pub async fn call_timeout(
        &self,
        name: &str,
        payload: &str,
        timeout: Duration,
    ) -> Result<String, CallError> {
        self.node()
            .router()
            .call(None, &self.name, name, payload.as_bytes().to_vec(), timeout)
            .await
            .map(|r| String::from_utf8(r).unwrap())
    }

    pub fn kv_string(&self, key: &str) -> Option<String> {
        self.node()
            .kv()
            .get(key)
            .map(|v| String::from_utf8(v).unwrap())
    }

    pub fn kv_i64(&self, key: &str) -> i64 {
        self.kv_string(key).map(|s| s.parse().unwrap()).unwrap_or(0)
    }

    pub async fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown().await.unwrap();
        }
    }

    pub async fn restart(&mut self, cfg: NodeConfig) {
        self.stop().await;
        self.node = Some(Node::start(cfg).await.unwrap());
    }
}

/// A node named `n1` on fresh temp dirs with `scripts` installed
/// (`guest` or `guest:as/name.wasm`).
pub async fn start(scripts: &[&str]) -> TestNode {
    start_with(scripts, |_| {}).await
}

pub async fn start_with(scripts: &[&str], tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
    start_named("n1", scripts, tweak).await
}

/// A node called `name` on fresh temp dirs with `scripts` installed.
pub async fn start_named(
    name: &str,
    scripts: &[&str],
    tweak: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TestNode {
        name: name.to_string(),
        node: None,
        scripts: dir.path().join("scripts"),
        data: dir.path().join("data"),
        _dir: dir,
    };
    std::fs::create_dir_all(&t.scripts).unwrap();
    for s in scripts {
        let (g, name) = match s.split_once(':') {
            Some((g, n)) => (g.to_string(), n.to_string()),
            None => (s.to_string(), format!("{s}.wasm")),
        };
        t.install(&g, &name);
    }
    let mut cfg = t.config();
    tweak(&mut cfg);
    t.node = Some(Node::start(cfg).await.unwrap());
    t
}

/// Poll `check` every 10 ms until it returns true; panic after `secs`.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {secs} s waiting for: {what}");
}
