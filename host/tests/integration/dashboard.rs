//! The live dashboard in a real browser: Debian's `chromium`, headless,
//! driven through `chromedriver` (WebDriver is JSON over HTTP: the
//! requests are written here, no client library). Two clustered nodes,
//! the page served by one of them: both nodes and both nodes' scripts
//! appear, an event emitted over the API shows up in the live stream, and
//! a screenshot is saved as `target/dashboard.png` for people to look at.
//!
//! Without `chromedriver` and `chromium` installed (`.ci/test` installs
//! them) the test says SKIPPED and passes, except under `CI=true`, where
//! it fails (`support/skip.rs`).

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use covey::cluster::credentials::ClusterToken;
use serde_json::{Value, json};

use super::cluster::{addr, join, wait_up};
use super::http::req;
use super::lua::load;

pub(crate) struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// chromedriver on a free port, and a headless Chromium session.
    async fn start() -> Option<Driver> {
        Driver::start_with(&[]).await
    }

    /// The same, with more Chromium switches.
    pub(crate) async fn start_with(switches: &[&str]) -> Option<Driver> {
        let found = |p: &str| std::path::Path::new(p).exists();
        if !found("/usr/bin/chromedriver") || !found("/usr/bin/chromium") {
            crate::skip::missing("browser test: chromium and chromium-driver are not installed");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
        };
        // --no-sandbox: Chromium refuses to run as root otherwise.
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1400,1100",
        ];
        args.extend_from_slice(switches);
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args }
        } } });
        for _ in 0..100 {
            if std::net::TcpStream::connect(d.addr).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v = d.send("POST", "/session", Some(caps)).await;
        d.session = v["sessionId"].as_str().expect("a session").to_string();
        Some(d)
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let r = req(self.addr, method, path, body.as_bytes()).await;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert!(
            r.status == 200,
            "WebDriver {method} {path}: {} {v}",
            r.status
        );
        v["value"].clone()
    }

    pub(crate) async fn session(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.send(method, &path, body).await
    }

    /// Open `url` in the window.
    pub(crate) async fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Run `body` in the page as an async function of `args`; what it
    /// returns is the answer.
    pub(crate) async fn run(&self, body: &str, args: Value) -> Value {
        let script = format!(
            "const done = arguments[arguments.length - 1];
             (async (...args) => {{ {body} }})(...Array.from(arguments).slice(0, -1))
               .then(done, e => done('threw: ' + e));"
        );
        let call = json!({ "script": script, "args": args });
        self.session("POST", "/execute/async", Some(call)).await
    }

    /// The text of the element `#id`, as the page shows it.
    pub(crate) async fn text(&self, id: &str) -> String {
        let script = json!({ "script": "const e = document.getElementById(arguments[0]); return e ? e.innerText : '';", "args": [id] });
        let v = self.session("POST", "/execute/sync", Some(script)).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Wait until `#id` shows every string of `want`.
    pub(crate) async fn until_shows(&self, id: &str, want: &[&str], mut act: impl AsyncFnMut()) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text(id).await;
            if want.iter().all(|w| text.contains(w)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "#{id} never showed {want:?}: {text}"
            );
            act().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn the_dashboard_shows_the_cluster_and_live_events() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let token = ClusterToken::generate();
    let a = join("dash-a", &token, &[], &[], |c| {
        c.http = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let b = join("dash-b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    load(&a, "sensor.lua", "covey.on('*', 'reading', function() end)").await;
    load(
        &b,
        "pump.lua",
        "covey.handle('*', 'pump.on', function() return 'ok' end)",
    )
    .await;
    let api = a.node().http_addr().unwrap();

    driver
        .session(
            "POST",
            "/url",
            Some(json!({ "url": format!("http://{api}/") })),
        )
        .await;
    driver
        .until_shows("nodes", &["dash-a", "dash-b"], async || {})
        .await;
    // b's script comes over the cluster link (a `covey.node.scripts` call).
    driver
        .until_shows(
            "scripts",
            &["sensor.lua", "pump.lua", "dash-b"],
            async || {},
        )
        .await;
    driver
        .until_shows("events", &["reading", "from-the-test"], async || {
            req(api, "POST", "/v1/events/reading", b"from-the-test").await;
        })
        .await;

    let png = driver.session("GET", "/screenshot", None).await;
    let png = base64_decode(png.as_str().unwrap());
    assert_eq!(&png[..4], b"\x89PNG");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::write(target.join("dashboard.png"), png).unwrap();
    driver.session("DELETE", "", None).await;
}

/// Standard base64 (the screenshot), without a crate for one call.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= u32::from(value(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
