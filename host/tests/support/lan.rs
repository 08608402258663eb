//! `Lan`: covey processes in network namespaces on one bridge, for the
//! tests that need separate processes and a real network (`netns`,
//! `chaos`). Needs root and `ip` (iproute2); `Lan::new_or_skip` prints
//! SKIPPED when they are missing (failed under `CI=true`, `skip.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use covey::cluster::credentials::ClusterToken;
use covey::control::StatusReport;

/// Write `text` to `path` as an editor would: whole, renamed into place
/// (the watcher never sees a half-written file).
pub fn write_file(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("partial~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Namespaces, veths and processes of one test; removed on drop.
pub struct Lan {
    id: String,
    pub hub: String,
    pub nodes: Vec<String>,
    /// Node `i` is 10.<subnet>.7.<i>.
    subnet: u32,
    /// Extra `covey run` arguments for every start.
    pub args: Vec<String>,
    /// The nodes' `--log` filter.
    pub log: &'static str,
    /// libfaketime, when the nodes' wall clocks are to be jumped
    /// ([`Lan::set_clock`]); unset, they see the real clock.
    pub faketime: Option<PathBuf>,
    /// Running nodes by number.
    children: Vec<(usize, Child)>,
    /// How many times each node was started (log file per start).
    starts: std::collections::HashMap<usize, usize>,
    dir: tempfile::TempDir,
}

/// Set a kernel parameter (`net/ipv6/...`) inside namespace `ns` (through
/// /proc: `sysctl` is not on every machine).
fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), String> {
    let set = format!("echo {value} > /proc/sys/{key}");
    ip(&["netns", "exec", ns, "sh", "-c", &set])
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// A bridge in its own namespace and `n` node namespaces on it, with
    /// addresses 10.<x>.<y>.1..n/24.
    pub fn new(n: usize, tag: &str) -> Result<Lan, String> {
        Lan::build(n, tag, true)
    }

    /// `new` without IPv4: the nodes have only the IPv6 link-local
    /// addresses the kernel gives each interface (usable at once: no
    /// duplicate address detection on these cables).
    pub fn new_link_local(n: usize, tag: &str) -> Result<Lan, String> {
        Lan::build(n, tag, false)
    }

    fn build(n: usize, tag: &str, ipv4: bool) -> Result<Lan, String> {
        let id = format!("{tag}{:x}", std::process::id() % 0xfff);
        let mut lan = Lan {
            hub: format!("cvh{id}"),
            id: id.clone(),
            nodes: Vec::new(),
            subnet: 0,
            args: Vec::new(),
            log: "covey=debug,info",
            faketime: None,
            children: Vec::new(),
            starts: Default::default(),
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        };
        ip(&["netns", "add", &lan.hub])?;
        ip(&["-n", &lan.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan.hub, "link", "set", "br0", "up"])?;
        let subnet = (std::process::id() + tag.len() as u32 * 7) % 200 + 20;
        lan.subnet = subnet;
        for i in 1..=n {
            let ns = format!("cvn{id}x{i}");
            ip(&["netns", "add", &ns])?;
            lan.nodes.push(ns.clone());
            let (inside, outside) = (format!("cvi{id}x{i}"), lan.port(i));
            ip(&[
                "link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &outside,
                "netns", &lan.hub,
            ])?;
            ip(&["-n", &lan.hub, "link", "set", &outside, "master", "br0"])?;
            ip(&["-n", &lan.hub, "link", "set", &outside, "up"])?;
            ip(&["-n", &ns, "link", "set", &inside, "name", "eth0"])?;
            if ipv4 {
                let addr = format!("10.{subnet}.7.{i}/24");
                ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            } else {
                sysctl(&ns, "net/ipv6/conf/eth0/accept_dad", "0")?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lan)
    }

    /// `new`, or none after printing why the test `test` is skipped.
    pub fn new_or_skip(n: usize, tag: &str, test: &str) -> Option<Lan> {
        match Lan::new(n, tag) {
            Ok(lan) => Some(lan),
            Err(e) => {
                crate::skip::missing(&format!("{test}: {e}"));
                None
            }
        }
    }

    /// The bridge-side end of node `i`'s cable.
    pub fn port(&self, i: usize) -> String {
        format!("cvo{}x{i}", self.id)
    }

    pub fn data(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{i}"))
    }

    /// Start `covey run` as node `n<i>` in its namespace.
    pub fn run(&mut self, i: usize, token: &ClusterToken) {
        let data = self.data(i);
        std::fs::create_dir_all(&data).unwrap();
        let start = {
            let n = self.starts.entry(i).or_insert(0);
            *n += 1;
            *n
        };
        let log_path = if start == 1 {
            data.with_extension("log")
        } else {
            data.with_extension(format!("{start}.log"))
        };
        let log = std::fs::File::create(log_path).unwrap();
        let mut cmd = Command::new("ip");
        if let Some(lib) = &self.faketime {
            let clock = self.clock_file(i);
            if !clock.exists() {
                write_file(&clock, "+0");
            }
            // Only the wall clock jumps, as when NTP steps it: monotonic
            // time and file times stay real. The offset file is read at
            // most once a second.
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &clock)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("NO_FAKE_STAT", "1");
        }
        let child = cmd
            .args(["netns", "exec", &self.nodes[i - 1]])
            .arg(env!("CARGO_BIN_EXE_covey"))
            .args(["run", "--node", &format!("n{i}"), "--data"])
            .arg(&data)
            .arg("--scripts")
            .arg(data.join("scripts"))
            .args(["--discovery", "mdns", "--iface", "eth0"])
            .args(["--peer-timeout-ms", "1500", "--log", self.log])
            .args(&self.args)
            .env("COVEY_CLUSTER_TOKEN", token.encode())
            .env("NO_COLOR", "1")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting covey");
        self.children.push((i, child));
    }

    /// `n<i>`'s view of its peers: (name, up), or none if not answering.
    pub async fn peers(&self, i: usize) -> Option<Vec<(String, bool)>> {
        let report: StatusReport = covey::control::fetch_status(&self.data(i)).await.ok()?;
        let cluster = report.cluster?;
        Some(cluster.peers.into_iter().map(|p| (p.name, p.up)).collect())
    }

    pub async fn up_peers(&self, i: usize) -> Vec<String> {
        self.peers(i)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, up)| *up)
            .map(|(n, _)| n)
            .collect()
    }

    /// Everything node `i` logged, over all its starts.
    pub fn log(&self, i: usize) -> String {
        let mut all = String::new();
        for start in 1..=*self.starts.get(&i).unwrap_or(&1) {
            let p = if start == 1 {
                self.data(i).with_extension("log")
            } else {
                self.data(i).with_extension(format!("{start}.log"))
            };
            all.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        all
    }

    /// Stop node `i`: SIGKILL (no goodbye, no flush) or SIGTERM (clean).
    pub fn stop(&mut self, i: usize, kill9: bool) {
        let pos = self.children.iter().position(|(n, _)| *n == i).unwrap();
        let (_, mut child) = self.children.remove(pos);
        if kill9 {
            child.kill().unwrap();
        } else {
            unsafe { kill(child.id() as i32, 15) };
        }
        child.wait().unwrap();
    }

    fn clock_file(&self, i: usize) -> PathBuf {
        self.data(i).with_extension("clock")
    }

    /// Jump node `i`'s wall clock to `offset` from the real one
    /// (libfaketime's syntax: `+0`, `-1h`, `+3d`); needs `faketime` set
    /// before the node started. Seen within a second or so.
    pub fn set_clock(&self, i: usize, offset: &str) {
        assert!(self.faketime.is_some(), "set_clock without faketime");
        write_file(&self.clock_file(i), offset);
    }

    /// Node `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.7.{i}", self.subnet)
    }

    /// The process of node `i`, if running.
    pub fn pid(&self, i: usize) -> Option<i32> {
        self.children
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, c)| c.id() as i32)
    }

    /// Is node `i`'s process still running (not exited, not killed)?
    pub fn alive(&mut self, i: usize) -> bool {
        self.children
            .iter_mut()
            .find(|(n, _)| *n == i)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Send `sig` to node `i`'s process.
    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(pid) = self.pid(i) {
            unsafe { kill(pid, sig) };
        }
    }

    /// Resident memory of node `i`'s process, KiB.
    pub fn rss_kib(&self, i: usize) -> Option<u64> {
        self.memory_kib(i, "VmRSS")
    }

    /// A memory figure of node `i`'s process from `/proc/PID/status`
    /// (`VmRSS`, `RssAnon`: the heap and stacks, `RssFile`: mapped files,
    /// the binary's code among them), KiB.
    pub fn memory_kib(&self, i: usize, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(i)?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    }

    pub fn scripts(&self, i: usize) -> PathBuf {
        self.data(i).join("scripts")
    }

    pub async fn status(&self, i: usize) -> Option<StatusReport> {
        covey::control::fetch_status(&self.data(i)).await.ok()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What each node said, to see why a wait timed out.
            for i in self.starts.keys() {
                let log = self.log(*i);
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .filter(|l| !l.contains("acked"))
                    .take(40)
                    .collect();
                eprintln!("--- n{i} log (last 40 lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

unsafe extern "C" {
    pub fn kill(pid: i32, sig: i32) -> i32;
}
