//! The `http` capability (outgoing requests) against a real HTTP server on
//! loopback, from Lua scripts through `require("http")`: what a grant
//! allows, and everything it does not.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::RawQuery;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{any, get};
use covey::grants::Grants;
use serde_json::json;

use crate::common::{TestNode, start_with};
use crate::lua::load;

/// The server the scripts talk to.
async fn server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port();
    let app = Router::new()
        .route("/hello", get(|| async { ([("x-test", "yes")], "hi") }))
        .route(
            "/echo",
            any(
                |method: Method, headers: HeaderMap, q: RawQuery, body: String| async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .map_or("-", |v| v.to_str().unwrap())
                            .to_string()
                    };
                    let ct = h("content-type");
                    let auth = h("authorization");
                    let q = q.0.unwrap_or_default();
                    format!("{method} q={q} ct={ct} auth={auth} body={body}")
                },
            ),
        )
        .route(
            "/delay",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "late"
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "never"
            }),
        )
        .route("/huge", get(|| async { vec![b'x'; 200_000] }))
        .route(
            "/huge-chunked",
            get(|| async {
                let chunks = (0..50).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 4096]));
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route("/in", get(|| async { Redirect::to("/hello") }))
        .route(
            "/post-303",
            any(|| async { (StatusCode::SEE_OTHER, [(header::LOCATION, "/echo")]) }),
        )
        .route(
            "/out",
            get(move || async move { Redirect::to(&format!("http://localhost:{port}/hello")) }),
        )
        .route("/loop", get(|| async { Redirect::to("/loop") }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "nope").into_response() });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Fetch `url` with `opts` (Lua table text) from the script and return
/// `status|x-test|url|body` or `nil|error`.
const FETCH: &str = r#"
local http = require("http")
onCommand("*", "fetch", function(msg)
  local req = json.decode(msg.payload)
  local opts = req.opts and load("return " .. req.opts)() or nil
  local r, err = http.request(req.method or "GET", req.url, opts)
  if not r then return "nil|" .. err end
  return r.status_code .. "|" .. tostring(r.headers["X-Test"]) .. "|" .. r.url .. "|" .. r.body
end)
"#;

async fn node(addr: SocketAddr) -> TestNode {
    let port = addr.port();
    let grants = json!({
        "web.lua": { "http": {
            "hosts": [format!("127.0.0.1:{port}")],
            "timeout_ms": 1500,
            "max_response_bytes": 100_000,
        }},
        "named.lua": { "http": [format!("localhost:{port}")] },
    });
    with_fetchers(grants, &["web.lua", "named.lua", "none.lua"]).await
}

/// A node with `grants`, running [`FETCH`] as each of `scripts` (its
/// handler named after the script).
async fn with_fetchers(grants: serde_json::Value, scripts: &[&str]) -> TestNode {
    let t = start_with(&[], |c| {
        c.grants = Grants::parse(&grants, covey::capabilities::check_grant).unwrap();
    })
    .await;
    for name in scripts {
        let text = FETCH.replace("\"fetch\"", &format!("{:?}", name.trim_end_matches(".lua")));
        load(&t, name, &text).await;
    }
    t
}

async fn fetch(t: &TestNode, script: &str, url: &str, opts: Option<&str>) -> String {
    fetch_with(t, script, "GET", url, opts).await
}

async fn fetch_with(
    t: &TestNode,
    script: &str,
    method: &str,
    url: &str,
    opts: Option<&str>,
) -> String {
    let mut req = json!({ "method": method, "url": url });
    if let Some(opts) = opts {
        req["opts"] = opts.into();
    }
    let req = req.to_string();
    t.call_timeout(script, &req, Duration::from_secs(20))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_host_answers_and_nothing_else_is_reachable() {
    let addr = server().await;
    let t = node(addr).await;
    let base = format!("http://{addr}");
    assert_eq!(
        fetch(&t, "web", &format!("{base}/hello"), None).await,
        format!("200|yes|{base}/hello|hi")
    );
    // A 404 is a response, not an error.
    assert!(
        fetch(&t, "web", &format!("{base}/missing"), None)
            .await
            .starts_with("404|")
    );
    // Options: query table, headers, form, auth, body.
    let echo = fetch_with(
        &t,
        "web",
        "POST",
        &format!("{base}/echo?a=1"),
        Some(
            r#"{ query = { b = "x y" }, auth = { user = "u", pass = "p" }, form = { k = "v&w" } }"#,
        ),
    )
    .await;
    assert!(
        echo.ends_with(
            "POST q=a=1&b=x%20y ct=application/x-www-form-urlencoded auth=Basic dTpw body=k=v%26w"
        ),
        "{echo}"
    );
    // A script with no grant, and a granted script asking for another
    // port: refused, naming the grant that would allow it.
    let none = fetch(&t, "none", &format!("{base}/hello"), None).await;
    assert!(
        none.starts_with("nil|not granted: script `none.lua` has no http grant"),
        "{none}"
    );
    let other = fetch(&t, "web", "http://127.0.0.1:1/hello", None).await;
    assert!(
        other.contains("not granted") && other.contains("\"127.0.0.1:1\""),
        "{other}"
    );
    // Names and addresses are different grants.
    let by_name = format!("http://localhost:{}/hello", addr.port());
    assert!(
        fetch(&t, "web", &by_name, None)
            .await
            .contains("not granted")
    );
    assert!(
        fetch(&t, "named", &by_name, None)
            .await
            .starts_with("200|yes|")
    );
    assert!(
        fetch(&t, "named", &format!("{base}/hello"), None)
            .await
            .contains("not granted")
    );
    // `covey scripts` shows what each script was granted.
    let list = t.node().supervisor().list().await;
    let grants = |name: &str| {
        list.iter()
            .find(|s| s.script == name)
            .unwrap()
            .grants
            .clone()
    };
    assert_eq!(
        grants("named.lua"),
        [format!("http [\"localhost:{}\"]", addr.port())]
    );
    assert!(grants("web.lua")[0].starts_with("http {"));
    assert!(grants("none.lua").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed_only_to_granted_hosts() {
    let addr = server().await;
    let t = node(addr).await;
    let base = format!("http://{addr}");
    assert_eq!(
        fetch(&t, "web", &format!("{base}/in"), None).await,
        format!("200|yes|{base}/hello|hi")
    );
    // To `localhost`, which `web.lua` is not granted.
    let out = fetch(&t, "web", &format!("{base}/out"), None).await;
    assert!(
        out.contains("not granted") && out.contains("localhost"),
        "{out}"
    );
    let looped = fetch(&t, "web", &format!("{base}/loop"), None).await;
    assert!(
        looped.starts_with("nil|protocol: more than 5 redirects"),
        "{looped}"
    );
    // 303 after a POST: a GET without the body.
    let see_other = fetch_with(
        &t,
        "web",
        "POST",
        &format!("{base}/post-303"),
        Some(r#"{ body = "data" }"#),
    )
    .await;
    assert!(
        see_other.ends_with("|GET q= ct=- auth=- body="),
        "{see_other}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_huge_responses_fail_cleanly_and_waiting_is_not_cpu() {
    let addr = server().await;
    let t = node(addr).await;
    let base = format!("http://{addr}");
    // 400 ms of waiting is well over the 100 ms CPU budget: waiting on the
    // network is not the script's CPU.
    assert!(
        fetch(&t, "web", &format!("{base}/delay"), None)
            .await
            .ends_with("|late")
    );
    let slow = fetch(&t, "web", &format!("{base}/slow"), None).await;
    assert_eq!(slow, "nil|timeout: no complete response within 1500 ms");
    let sooner = fetch(
        &t,
        "web",
        &format!("{base}/slow"),
        Some(r#"{ timeout = "200ms" }"#),
    )
    .await;
    assert_eq!(sooner, "nil|timeout: no complete response within 200 ms");
    for path in ["huge", "huge-chunked"] {
        let huge = fetch(&t, "web", &format!("{base}/{path}"), None).await;
        assert_eq!(huge, "nil|response too large: over 100000 bytes", "{path}");
    }
    // Malformed requests are the script's error, reported as such.
    let bad = fetch(&t, "web", "ftp://127.0.0.1/x", None).await;
    assert!(bad.starts_with("nil|invalid request: url"), "{bad}");
    let bad = fetch_with(&t, "web", "GE T", &format!("{base}/hello"), None).await;
    assert!(bad.starts_with("nil|invalid request: method"), "{bad}");
    // The script is still fine.
    assert!(
        fetch(&t, "web", &format!("{base}/hello"), None)
            .await
            .starts_with("200|")
    );
}

use crate::pki;

/// An HTTPS server on 127.0.0.1 with a certificate for `localhost` from
/// `ca`: `/hello` answers, `/down` redirects to `plain` over http.
async fn tls_server(dir: &std::path::Path, ca: &pki::Ca, plain: SocketAddr) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let leaf = ca.leaf(dir, "server", &["localhost"]);
    let chain = CertificateDer::pem_file_iter(&leaf.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = plain.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                // A client that refuses the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // One request per connection, answered by hand.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = if head.starts_with(b"GET /down ") {
                    format!(
                        "HTTP/1.1 302 Found\r\nlocation: http://localhost:{port}/hello\r\n\
                         content-length: 0\r\nconnection: close\r\n\r\n"
                    )
                } else {
                    "HTTP/1.1 200 OK\r\nx-test: tls\r\ncontent-length: 6\r\n\
                     connection: close\r\n\r\nsecret"
                        .to_string()
                };
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// The `https` path: a private CA given to the grant (`ca:`), a
/// certificate for another name refused, and a redirect from https down to
/// plain http refused unless the host is granted as `http://HOST`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_grant_ca_names_and_no_silent_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("covey test web CA");
    let ca_file = ca.write(dir.path(), "ca.pem").display().to_string();
    let plain = server().await;
    let tls = tls_server(dir.path(), &ca, plain).await;
    let (tp, pp) = (tls.port(), plain.port());
    let grants = json!({
        // The CA, the TLS server by name and by address, the plain server
        // granted for either scheme.
        "tls.lua": { "http": { "hosts": [format!("localhost:{tp}"),
            format!("127.0.0.1:{tp}"), format!("localhost:{pp}")], "ca": ca_file } },
        // The plain server granted as http://: a downgrade is fine.
        "down.lua": { "http": { "hosts": [format!("localhost:{tp}"),
            format!("http://localhost:{pp}")], "ca": ca_file } },
        // No CA: the system's roots do not know this one.
        "noca.lua": { "http": [format!("localhost:{tp}")] },
    });
    let t = with_fetchers(grants, &["tls.lua", "down.lua", "noca.lua"]).await;
    let hello = format!("https://localhost:{tp}/hello");
    assert_eq!(
        fetch(&t, "tls", &hello, None).await,
        format!("200|tls|{hello}|secret")
    );
    let r = fetch(&t, "noca", &hello, None).await;
    assert!(r.starts_with("nil|") && r.contains("UnknownIssuer"), "{r}");
    // The certificate names localhost, not 127.0.0.1.
    let r = fetch(&t, "tls", &format!("https://127.0.0.1:{tp}/hello"), None).await;
    assert!(
        r.starts_with("nil|") && r.contains("not valid for name \"127.0.0.1\""),
        "{r}"
    );
    // https -> http: refused, and the error names the entry that allows it.
    let down = format!("https://localhost:{tp}/down");
    let r = fetch(&t, "tls", &down, None).await;
    assert!(
        r.starts_with("nil|") && r.contains(&format!("\"http://localhost:{pp}\"")),
        "{r}"
    );
    let r = fetch(&t, "down", &down, None).await;
    assert_eq!(r, format!("200|yes|http://localhost:{pp}/hello|hi"));
}
