//! What a web page on the operator's machine can make a browser send to a
//! node's loopback API, refused (`host/src/http/guard.rs`,
//! `docs/security.md`): first with a hand-written client for every route,
//! then in real headless Chromium — a hostile page served from another
//! loopback address (127.0.0.2) posting across origins, and a page whose
//! name resolves to the node (DNS rebinding, made with Chromium's
//! `--host-resolver-rules`) — and the dashboard's own origin still working.

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::common::{TestNode, eventually, start_with};
use super::dashboard::Driver;
use super::http::{Response, raw, req};
use super::lua::load;

/// Counts `pwned`, `ok` events and `pwned` commands into the store.
const WITNESS: &str = r#"
covey.on('*', 'pwned', function() covey.kv.incr('seen/pwned') end)
covey.on('*', 'ok', function() covey.kv.incr('seen/ok') end)
covey.handle('*', 'pwned', function() covey.kv.incr('seen/pwned'); return 'x' end)
"#;

async fn node_with_api() -> (TestNode, SocketAddr) {
    let t = start_with(&[], |c| {
        c.http = Some("127.0.0.1:0".parse().unwrap());
        c.http_hosts = vec![covey::http::HostName::parse("covey.test").unwrap()];
    })
    .await;
    load(&t, "witness.lua", WITNESS).await;
    let api = t.node().http_addr().unwrap();
    (t, api)
}

/// `method path` with the given extra header lines.
async fn with_headers(api: SocketAddr, method: &str, path: &str, lines: &str) -> Response {
    let request = format!(
        "{method} {path} HTTP/1.1\r\n{lines}Connection: close\r\nContent-Length: 4\r\n\r\nevil"
    );
    raw(api, request.as_bytes()).await
}

fn kind(r: &Response) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    v["error"]["kind"].as_str().unwrap_or_default().to_string()
}

const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/v1/events"),
    ("POST", "/v1/events/pwned"),
    ("POST", "/v1/commands/n1/pwned"),
    ("POST", "/v1/calls/n1/pwned"),
    ("GET", "/v1/kv"),
    ("GET", "/v1/kv/target"),
    ("PUT", "/v1/kv/target"),
    ("DELETE", "/v1/kv/target"),
    ("GET", "/v1/status"),
    ("GET", "/v1/scripts"),
    ("GET", "/v1/nodes"),
    ("GET", "/v1/cluster/scripts"),
    ("GET", "/v1/logs"),
    ("GET", "/metrics"),
    ("OPTIONS", "/v1/kv/target"),
    ("GET", "/no/such/route"),
];

#[tokio::test]
async fn every_route_refuses_a_foreign_host_and_other_origins() {
    let (mut t, api) = node_with_api().await;
    t.node().kv().set("target", b"mine").unwrap();
    let port = api.port();
    for (method, path) in ROUTES {
        for host in [
            "attacker.example".to_string(),
            format!("attacker.example:{port}"),
            format!("localhost.attacker.example:{port}"),
            format!("covey.test.attacker.example:{port}"),
        ] {
            let r = with_headers(api, method, path, &format!("Host: {host}\r\n")).await;
            assert_eq!(
                (r.status, kind(&r).as_str()),
                (421, "host_not_allowed"),
                "{method} {path} with Host {host}"
            );
            assert!(!r.headers.contains_key("access-control-allow-origin"));
        }
        // No Host at all (HTTP/1.0).
        let r = raw(api, format!("{method} {path} HTTP/1.0\r\n\r\n").as_bytes()).await;
        assert_eq!(r.status, 421, "{method} {path} without Host");
        // The node's own name, from a page elsewhere.
        let from = format!("Host: {api}\r\nOrigin: http://127.0.0.2:8000\r\n");
        let r = with_headers(api, method, path, &from).await;
        assert_eq!(
            (r.status, kind(&r).as_str()),
            (403, "cross_origin"),
            "{method} {path} from another origin"
        );
    }
    // Nothing reached a script or the store.
    assert_eq!(t.node().kv().get("target").as_deref(), Some(&b"mine"[..]));
    assert_eq!(t.node().kv().get("seen/pwned"), None);

    // What is answered: its names, a configured name, plain clients and
    // its own origin.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "covey.test".into(),
    ] {
        let r = with_headers(api, "PUT", "/v1/kv/target", &format!("Host: {host}\r\n")).await;
        assert_eq!(r.status, 204, "PUT with Host {host}: {:?}", r.body);
    }
    let own = format!("Host: localhost:{port}\r\nOrigin: http://localhost:{port}\r\n");
    let r = with_headers(api, "POST", "/v1/events/ok", &own).await;
    assert_eq!(r.status, 200);
    eventually(5, "the same-origin event", || async {
        t.node().kv().get("seen/ok").is_some()
    })
    .await;
    let m = req(api, "GET", "/metrics", b"").await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    let refused = ROUTES.len() * 5;
    assert!(
        text.contains(&format!(
            "covey_http_refused_total{{rule=\"host\"}} {refused}"
        )),
        "{text}"
    );
    t.stop().await;
}

/// A one-page web server on 127.0.0.2: the attacker's site.
async fn hostile_site(page: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    page.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(page.as_bytes()).await;
            });
        }
    });
    addr
}

/// What a hostile page tries: a no-cors `text/plain` POST of an event (the
/// request that worked before the guard), a form posting a command into a
/// hidden frame, a store write, and reading the store.
fn hostile_page(api: SocketAddr) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="done"></pre>
<iframe name="sink" style="display:none"></iframe>
<form id="f" method="POST" target="sink" enctype="text/plain"
      action="http://{api}/v1/commands/n1/pwned"><input name="a" value="b"></form>
<script>
(async () => {{
  const api = "http://{api}";
  const out = [];
  const attempt = async (what, f) => {{
    try {{ out.push(what + ": " + await f()); }} catch (e) {{ out.push(what + ": blocked " + e); }}
  }};
  await attempt("event", async () => {{
    const r = await fetch(api + "/v1/events/pwned", {{ method: "POST", mode: "no-cors",
      headers: {{ "Content-Type": "text/plain" }}, body: "x" }});
    return r.type;
  }});
  await attempt("kv put", async () => (await fetch(api + "/v1/kv/target",
    {{ method: "PUT", body: "evil" }})).status);
  await attempt("kv read", async () => await (await fetch(api + "/v1/kv/target")).text());
  await new Promise(done => {{
    document.querySelector("iframe").onload = done;
    document.getElementById("f").submit();
  }});
  out.push("form: submitted");
  document.getElementById("done").innerText = out.join("\n") + "\nfinished";
}})();
</script></body></html>"#
    )
}

fn refused(text: &str, rule: &str) -> u64 {
    let line = format!("covey_http_refused_total{{rule=\"{rule}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line}in {text}"))
}

#[tokio::test]
async fn a_web_page_cannot_drive_the_node_but_the_dashboard_can() {
    // `rebind.test` resolves to the node, as an attacker's name would once
    // rebound.
    let Some(driver) =
        Driver::start_with(&["--host-resolver-rules=MAP rebind.test 127.0.0.1"]).await
    else {
        return;
    };
    let (mut t, api) = node_with_api().await;
    t.node().kv().set("target", b"mine").unwrap();
    let site = hostile_site(hostile_page(api)).await;

    // Cross-site: the page does what it can, then says it finished.
    driver.goto(&format!("http://{site}/")).await;
    driver.until_shows("done", &["finished"], async || {}).await;
    let report = driver.text("done").await;
    assert!(!report.contains("kv read: mine"), "{report}");

    // DNS rebinding: the attacker's page, its name now the node's address,
    // uses the API "same-origin".
    driver
        .goto(&format!("http://rebind.test:{}/", api.port()))
        .await;
    let statuses = driver
        .run(
            r#"const codes = [];
               for (const [method, path] of [["PUT", "/v1/kv/target"], ["GET", "/v1/kv/target"],
                                             ["POST", "/v1/events/pwned"]]) {
                 const r = await fetch(path, { method, body: method == "GET" ? undefined : "evil" });
                 codes.push(r.status + " " + (await r.text()).includes("host_not_allowed"));
               }
               return codes;"#,
            json!([]),
        )
        .await;
    assert_eq!(
        statuses,
        json!(["421 true", "421 true", "421 true"]),
        "{report}"
    );

    // The dashboard's own origin works, the same way.
    driver.goto(&format!("http://{api}/")).await;
    let statuses = driver
        .run(
            r#"const put = await fetch("/v1/kv/target", { method: "PUT", body: "from-dashboard" });
               const ev = await fetch("/v1/events/ok", { method: "POST", body: "hi" });
               const got = await (await fetch("/v1/kv/target")).text();
               return [put.status, ev.status, got];"#,
            json!([]),
        )
        .await;
    assert_eq!(statuses, json!([204, 200, "from-dashboard"]));
    // The witness handles its events in order: once `ok` is counted, any
    // `pwned` from before would have been.
    eventually(10, "the dashboard's event", || async {
        t.node().kv().get("seen/ok").is_some()
    })
    .await;
    assert_eq!(t.node().kv().get("seen/pwned"), None, "{report}");

    // The browser did send the hostile requests: the node refused them.
    let m = req(api, "GET", "/metrics", b"").await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    assert!(refused(&text, "origin") >= 2, "{report}\n{text}");
    assert!(refused(&text, "host") >= 4, "{report}\n{text}");
    driver.session("DELETE", "", None).await;
    t.stop().await;
}

/// Every entry under `dir` with its permission bits (symlinks skipped).
fn modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = e.path().symlink_metadata().unwrap();
            if meta.is_dir() {
                pending.push(e.path());
            }
            out.push((
                e.path().display().to_string(),
                meta.permissions().mode() & 0o777,
            ));
        }
    }
    out
}

/// Local users: the data directory holds every device's key and the whole
/// store. A node makes it owner-only, tightens what an older Covey left
/// readable (0755 directory, 0644 files), and writes every new file
/// owner-only.
#[tokio::test]
async fn the_data_directory_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = data.join("cache");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(data.join("kv.automerge"), b"").unwrap();
    std::fs::write(old.join("left-over"), b"x").unwrap();
    for (p, mode) in [(&data, 0o755), (&old, 0o755)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for p in [data.join("kv.automerge"), old.join("left-over")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap();
    std::fs::write(scripts.join("a.lua"), "covey.log('hi')").unwrap();
    let mut cfg = covey::config::NodeConfig::new("n1", scripts.clone(), data.clone());
    cfg.http = Some("127.0.0.1:0".parse().unwrap());
    let node = covey::Node::start(cfg).await.unwrap();
    node.kv().set("k", b"v").unwrap();
    node.kv().flush().unwrap();
    node.devices().registry.add("esp-1").unwrap();
    node.devices().registry.store().flush().unwrap();
    covey::http::token_command(&data).unwrap();
    node.shutdown().await.unwrap();

    let dir_mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700);
    let found = modes(&data);
    let names: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    for want in [
        "kv.automerge",
        "devices.automerge",
        "http-token",
        "left-over",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "{want} in {names:?}"
        );
    }
    let open: Vec<_> = found.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable by other accounts: {open:?}");
    // The scripts directory is the operator's, left as the umask makes it.
    let script = std::fs::metadata(scripts.join("a.lua")).unwrap();
    assert_ne!(script.permissions().mode() & 0o044, 0);
}
