//! The HTTP API against an in-process node, over real TCP on loopback with
//! a hand-written HTTP/1.1 client (so malformed requests can be sent too):
//! every route, its status codes, body limits, the bearer token off
//! loopback, Server-Sent Events, Prometheus metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{OPS_SCRIPT, TestNode, eventually, start_with};
use super::lua::load;

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Send raw bytes, read the whole answer (the connection is closed).
pub(crate) async fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    // Up to the head, then `Content-Length` bytes, or to the end (some
    // servers, chromedriver among them, keep the connection open).
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(i) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the head ended");
        all.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    let length = (head.lines())
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            while all.len() < split + 4 + len {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed in the body");
                all.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut all).await.unwrap();
        }
    }
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = all[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 4 + size..];
    }
}

pub(crate) async fn req(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    req_auth(addr, method, path, body, None).await
}

async fn req_auth(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
) -> Response {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    raw(addr, &r).await
}

async fn node() -> (TestNode, SocketAddr) {
    let t = start_with(&[], |c| {
        c.http = Some("127.0.0.1:0".parse().unwrap());
        c.max_payload = 4096;
        c.limits.cpu_budget = Duration::from_secs(3);
    })
    .await;
    load(&t, "ops.lua", OPS_SCRIPT).await;
    let addr = t.node().http_addr().unwrap();
    (t, addr)
}

fn kind(r: &Response) -> String {
    r.json()["error"]["kind"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn bus_routes_and_their_status_codes() {
    let (t, a) = node().await;

    let r = req(a, "POST", "/v1/calls/n1/echo", b"hi").await;
    assert_eq!((r.status, r.text().as_str()), (200, "echo:hi"));
    assert_eq!(r.headers["content-type"], "application/octet-stream");
    let r = req(a, "POST", "/v1/calls/n1/nobody", b"").await;
    assert_eq!(
        (r.status, kind(&r).as_str()),
        (404, "no_handler"),
        "{}",
        r.text()
    );
    let r = req(a, "POST", "/v1/calls/ghost/echo", b"").await;
    assert_eq!((r.status, kind(&r).as_str()), (404, "unknown_node"));
    let r = req(a, "POST", "/v1/calls/%2A/echo", b"").await;
    assert_eq!(
        (r.status, kind(&r).as_str()),
        (400, "bad_request"),
        "{}",
        r.text()
    );
    let r = req(a, "POST", "/v1/calls/n1/echo?timeout_ms=soon", b"").await;
    assert_eq!(r.status, 400);
    let r = req(a, "POST", "/v1/calls/n1/spin?timeout_ms=200", b"").await;
    assert_eq!((r.status, kind(&r).as_str()), (504, "timeout"));

    // Webhook ingress: the body is the event's payload.
    let r = req(a, "POST", "/v1/events/ping", b"p1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(10, "event handled", || async {
        t.kv_string("pinged").as_deref() == Some("p1")
    })
    .await;
    let r = req(a, "POST", "/v1/commands/n1/store", b"s1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    eventually(10, "command handled", || async {
        t.kv_string("stored").as_deref() == Some("s1")
    })
    .await;
    let r = req(a, "POST", "/v1/commands/a%20b/store", b"").await;
    assert_eq!(r.status, 400, "{}", r.text());

    // Over the payload limit: refused, and the node goes on.
    let r = req(a, "POST", "/v1/events/ping", &[b'x'; 5000]).await;
    assert_eq!(
        (r.status, kind(&r).as_str()),
        (413, "payload_too_large"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("4096"), "{}", r.text());
    let garbage = raw(a, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(garbage.status, 400);
    // Percent-encoding that decodes to bytes that are not UTF-8.
    let r = req(a, "POST", "/v1/events/%FF%FE", b"").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let huge = format!(
        "GET /v1/status HTTP/1.1\r\nHost: {a}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "x".repeat(1 << 20)
    );
    let r = raw(a, huge.as_bytes()).await;
    assert!(r.status == 431 || r.status == 400, "{}", r.status);
    let r = req(a, "GET", "/v1/nowhere", b"").await;
    assert_eq!((r.status, kind(&r).as_str()), (404, "not_found"));
    let r = req(a, "POST", "/v1/calls/n1/echo", b"still up").await;
    assert_eq!(r.text(), "echo:still up");
}

#[tokio::test]
async fn kv_status_scripts_and_metrics() {
    let (_t, a) = node().await;

    assert_eq!(req(a, "PUT", "/v1/kv/sensors/a", b"21.5").await.status, 204);
    let r = req(a, "GET", "/v1/kv/sensors/a", b"").await;
    assert_eq!((r.status, r.text().as_str()), (200, "21.5"));
    let r = req(a, "GET", "/v1/kv?prefix=sensors/", b"").await;
    assert_eq!(r.json()["keys"], serde_json::json!(["sensors/a"]));
    let r = req(a, "DELETE", "/v1/kv/sensors/a", b"").await;
    assert_eq!(r.json()["existed"], true);
    let r = req(a, "GET", "/v1/kv/sensors/a", b"").await;
    assert_eq!((r.status, kind(&r).as_str()), (404, "not_found"));
    let r = req(a, "PUT", &format!("/v1/kv/{}", "k".repeat(2000)), b"v").await;
    assert_eq!(r.status, 400, "{}", r.text());

    let status = req(a, "GET", "/v1/status", b"").await.json();
    assert_eq!(status["node"], "n1");
    let scripts = req(a, "GET", "/v1/scripts", b"").await.json();
    assert_eq!(scripts["scripts"][0]["script"], "ops.lua");
    assert_eq!(
        req(a, "GET", "/v1/nodes", b"").await.json()[0]["name"],
        "n1"
    );

    req(a, "POST", "/v1/calls/n1/echo", b"").await;
    req(a, "POST", "/v1/calls/n1/nobody", b"").await;
    // A callback over its CPU budget: a failure of kind cpu_budget.
    req(a, "POST", "/v1/calls/n1/spin?timeout_ms=5000", b"").await;
    // The failure is counted just after the reply went out, and the script
    // comes back after its restart delay: ask until both have happened.
    let mut m = req(a, "GET", "/metrics", b"").await;
    for _ in 0..200 {
        let t = m.text();
        if t.contains("kind=\"cpu_budget\"} 1")
            && t.contains("covey_script_up{script=\"ops.lua\"} 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = req(a, "GET", "/metrics", b"").await;
    }
    assert!(m.headers["content-type"].starts_with("text/plain; version=0.0.4"));
    let text = m.text();
    for want in [
        "# TYPE covey_build_info gauge",
        "covey_build_info{version=\"",
        "covey_script_up{script=\"ops.lua\"} 1",
        "# TYPE covey_script_messages_handled_total counter",
        "covey_script_messages_handled_total{script=\"ops.lua\"} ",
        "covey_kv_keys ",
        "# TYPE covey_script_callback_duration_seconds histogram",
        "covey_script_callback_duration_seconds_bucket{script=\"ops.lua\",le=\"+Inf\"} ",
        "covey_script_callback_duration_seconds_count{script=\"ops.lua\"} ",
        "covey_bus_calls_total{outcome=\"ok\"} ",
        "covey_bus_calls_total{outcome=\"no_handler\"} 1",
        "covey_script_failures_total{script=\"ops.lua\",kind=\"cpu_budget\"} 1",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    // Every sample line is `name{labels} value` with a number.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // The heap (this is a glibc build): something in use, no more than held.
    let in_use = sample(&text, "covey_heap_in_use_bytes").expect("heap in use");
    let held = sample(&text, "covey_heap_held_bytes").expect("heap held");
    assert!(in_use > 0.0 && in_use <= held, "{in_use} {held}");
}

/// The value of the sample `name` (with its labels) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[tokio::test]
async fn replication_and_scripts_sync_are_counted() {
    use super::cluster::{addr, join, wait_up};
    let token = covey::cluster::credentials::ClusterToken::generate();
    let a = join("m-a", &token, &[], &[], |c| {
        c.http = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let b = join("m-b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    let http = a.node().http_addr().unwrap();
    // Written on b: reaches a by sync; the file by a fetch from b.
    b.node().kv().set("sensors/b", b"21.5").unwrap();
    std::fs::write(b.scripts.join("shared.lua"), "covey.log.info('shared')").unwrap();
    eventually(60, "a counts what came from b", || async move {
        let text = req(http, "GET", "/metrics", b"").await.text();
        sample(&text, "covey_scripts_sync_fetched_total") == Some(1.0)
            && sample(&text, "covey_kv_keys") == Some(1.0)
    })
    .await;
    let text = req(http, "GET", "/metrics", b"").await.text();
    let bytes = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    assert_eq!(bytes("covey_kv_bytes"), ("sensors/b".len() + 4) as f64);
    // Merged, not written here.
    assert_eq!(bytes("covey_kv_writes_total"), 0.0, "{text}");
    assert!(bytes("covey_kv_file_bytes") >= 0.0);
    for doc in ["kv", "scripts"] {
        assert!(
            bytes(&format!("covey_sync_received_bytes_total{{doc=\"{doc}\"}}")) > 0.0,
            "{text}"
        );
        assert!(
            bytes(&format!("covey_sync_sent_bytes_total{{doc=\"{doc}\"}}")) > 0.0,
            "{text}"
        );
    }
    let len = "covey.log.info('shared')".len() as f64;
    assert_eq!(
        bytes("covey_scripts_sync_fetched_bytes_total"),
        len,
        "{text}"
    );
    assert_eq!(bytes("covey_scripts_sync_served_total"), 0.0, "{text}");
}

/// Read an SSE stream until a `data:` line contains `want`.
async fn sse_until(s: &mut TcpStream, want: &str, seen: &mut String) -> Value {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = seen
            .lines()
            .find(|l| l.starts_with("data:") && l.contains(want))
        {
            let v = serde_json::from_str(line.trim_start_matches("data:").trim()).unwrap();
            seen.clear();
            return v;
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in the stream: {seen}"))
            .unwrap();
        assert!(n > 0, "stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Open the SSE stream at `path`, then emit `ping` (with `payload`) until
/// a `data:` line with `want` arrives (the stream may start after the
/// first event).
async fn stream_until(a: SocketAddr, path: &str, want: &str, payload: &[u8]) -> Value {
    let mut s = TcpStream::connect(a).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {a}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut seen = String::new();
    loop {
        req(a, "POST", "/v1/events/ping", payload).await;
        let next = sse_until(&mut s, want, &mut seen);
        if let Ok(v) = tokio::time::timeout(Duration::from_millis(500), next).await {
            return v;
        }
    }
}

#[tokio::test]
async fn server_sent_events_and_logs() {
    let (_t, a) = node().await;
    let v = stream_until(a, "/v1/events?pattern=pi*", "ping", b"sse").await;
    assert_eq!(
        (v["from"].as_str(), v["payload"].as_str()),
        (Some("n1"), Some("sse"))
    );

    // Logs: the kept lines of one script (the ring needs the node's
    // logging layer, installed here as `covey run` does).
    covey_logging();
    let line = stream_until(a, "/v1/logs?script=ops.lua", "got ping logged", b"logged").await;
    assert_eq!(line["script"], "ops.lua");
    let r = req(a, "GET", "/v1/logs?since=10w", b"").await;
    assert_eq!(r.status, 400);
}

pub(crate) fn covey_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let _ = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::INFO)
        .with(covey::logring::RingLayer)
        .try_init();
}

#[tokio::test]
async fn off_loopback_it_needs_the_token() {
    let mut t = start_with(&[], |_| {}).await;
    t.stop().await;
    let data = t.data.clone();
    let mut cfg = t.config();
    cfg.http = Some("0.0.0.0:0".parse().unwrap());
    let err = match covey::Node::start(cfg.clone()).await {
        Ok(_) => panic!("started without a token"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("covey http token"), "{err}");

    let token = covey::http::token_command(&data).unwrap();
    assert_eq!(
        covey::http::token_command(&data).unwrap(),
        token,
        "made once"
    );
    let node = covey::Node::start(cfg).await.unwrap();
    let a = SocketAddr::from(([127, 0, 0, 1], node.http_addr().unwrap().port()));
    let r = req(a, "GET", "/v1/status", b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    let r = req_auth(a, "GET", "/v1/status", b"", Some("wrong")).await;
    assert_eq!(r.status, 401);
    let r = req_auth(a, "GET", "/v1/status", b"", Some(&token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stream_reader_that_never_reads_costs_a_bounded_queue() {
    let (t, a) = node().await;
    let mut s = TcpStream::connect(a).await.unwrap();
    let head = format!("GET /v1/events HTTP/1.1\r\nHost: {a}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    // Wait for its tap, then flood it without ever reading the socket:
    // the tap's queue and the socket buffers fill, the rest is dropped
    // and counted, and the node goes on answering.
    let router = t.node().router().clone();
    eventually(10, "the stream's tap", || async {
        let before = router
            .stats
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed);
        router.emit("probe", vec![]).unwrap();
        router
            .stats
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    })
    .await;
    let payload = vec![b'x'; 4000];
    for _ in 0..20_000 {
        router.emit("flood", payload.clone()).unwrap();
    }
    let dropped = router
        .stats
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        dropped > 10_000,
        "only {dropped} dropped: the tap's queue is not bounded"
    );
    let r = req(a, "POST", "/v1/calls/n1/echo", b"alive").await;
    assert_eq!(r.text(), "echo:alive");
    drop(s);
}
