//! Several nodes in one process, linked over QUIC on loopback (no mDNS):
//! events, commands, calls and membership across nodes, and refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use covey::NodeConfig;
use covey::bindings::{CallError, SendError};
use covey::cluster::ClusterConfig;
use covey::cluster::credentials::ClusterToken;
use covey::router::PeerStatus;

use crate::common::{TestNode, eventually, start_named};

pub(crate) fn cluster_config(token: &ClusterToken, seeds: &[SocketAddr]) -> ClusterConfig {
    let mut c = ClusterConfig::new(token.clone());
    c.bind = "127.0.0.1:0".parse().unwrap();
    c.peers = seeds.iter().map(|a| a.to_string()).collect();
    c.mdns = false;
    c.peer_timeout = Duration::from_secs(1);
    c
}

pub(crate) fn addr(t: &TestNode) -> SocketAddr {
    t.node().cluster().expect("clustered").local_addr()
}

/// Start `name` in the cluster of `token`, seeded with `seeds`.
pub(crate) async fn join(
    name: &str,
    token: &ClusterToken,
    seeds: &[SocketAddr],
    scripts: &[&str],
    tweak: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let cluster = cluster_config(token, seeds);
    start_named(name, scripts, move |c| {
        c.cluster = Some(cluster);
        tweak(c);
    })
    .await
}

pub(crate) fn status(t: &TestNode, peer: &str) -> PeerStatus {
    t.node().cluster().unwrap().status(peer)
}

pub(crate) async fn wait_up(nodes: &[&TestNode]) {
    for a in nodes {
        for b in nodes {
            if a.name != b.name {
                eventually(10, &format!("{} sees {} up", a.name, b.name), || async {
                    status(a, &b.name) == PeerStatus::Up
                })
                .await;
            }
        }
    }
}

/// Three nodes: `a`, `b` seeded with `a`, `c` seeded with `b` only (it
/// must learn `a` from `b`). Each runs `probe` and `echo`.
pub(crate) async fn three(tweak: impl Fn(&mut NodeConfig) + Copy) -> (ClusterToken, [TestNode; 3]) {
    let token = ClusterToken::generate();
    let scripts = ["probe", "echo"];
    let a = join("a", &token, &[], &scripts, tweak).await;
    let b = join("b", &token, &[addr(&a)], &scripts, tweak).await;
    let c = join("c", &token, &[addr(&b)], &scripts, tweak).await;
    wait_up(&[&a, &b, &c]).await;
    (token, [a, b, c])
}

pub(crate) async fn probe(t: &TestNode, cmd: &str, args: &str) -> String {
    t.call(cmd, args).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_commands_and_calls_cross_nodes() {
    let (_token, [a, b, c]) = three(|_| {}).await;
    for t in [&a, &b, &c] {
        probe(t, "probe.subscribe", "*|temp").await;
    }

    // An event from a script on `a` reaches every node, `a` included, once:
    // each node's probe counts it in the (replicated) counter, so it ends
    // at 3 everywhere.
    assert_eq!(probe(&a, "probe.emit", "temp|21").await, "Ok(())");
    for t in [&a, &b, &c] {
        eventually(5, &format!("event counted on {}", t.name), || async {
            t.kv_i64("probe-events/temp") == 3
        })
        .await;
    }

    // A command to `*` reaches every node.
    a.node()
        .router()
        .send_command("*", "probe.subscribe", b"*|to-all".to_vec())
        .unwrap();
    // One to `c` reaches only `c`: afterwards only `c` counts `only-c`
    // events. (Commands and calls from `a` to `c` stay in order, so the
    // subscription exists once the call returns.)
    a.node()
        .router()
        .send_command("c", "probe.subscribe", b"*|only-c".to_vec())
        .unwrap();
    for t in ["a", "b", "c"] {
        a.node()
            .router()
            .call(None, t, "probe.node", vec![], Duration::from_secs(2))
            .await
            .unwrap();
    }
    assert_eq!(probe(&a, "probe.emit", "to-all|x").await, "Ok(())");
    assert_eq!(probe(&a, "probe.emit", "only-c|x").await, "Ok(())");
    for t in [&a, &b, &c] {
        eventually(5, "command to *", || async {
            t.kv_i64("probe-events/to-all") == 3 && t.kv_i64("probe-events/only-c") == 1
        })
        .await;
    }

    // Guest on `a` calls a guest on `c` and gets its reply.
    assert_eq!(
        probe(&a, "probe.call", "c|echo.upper|2000|hello").await,
        "ok:HELLO"
    );
    // The sender of a remote message is the node it came from.
    let r = a
        .node()
        .router()
        .call(None, "b", "probe.node", vec![], Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(String::from_utf8(r).unwrap(), "b|3", "b sees three nodes");

    // Errors: no handler there, no reply, unknown node, timeout.
    let router = a.node().router();
    let call = |node: &'static str, name: &'static str, t: Duration| {
        router.call(None, node, name, b"x".to_vec(), t)
    };
    match call("b", "nobody.handles", Duration::from_secs(2)).await {
        Err(CallError::NoHandler(m)) => assert!(m.contains("`b`"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        call("b", "probe.silent", Duration::from_secs(2)).await,
        Err(CallError::NoReply)
    );
    assert_eq!(
        call("zed", "echo", Duration::from_secs(2)).await,
        Err(CallError::UnknownNode("zed".into()))
    );
    std::fs::write(
        b.scripts.join("slow.lua"),
        "covey.handle('*', 'slow', function(msg)\n\
           local t = os.clock()\n\
           while os.clock() - t < 0.05 do end\n\
           return 'late ' .. msg.payload\n\
         end)\n",
    )
    .unwrap();
    eventually(20, "slow.lua loaded on b", || async {
        call("b", "slow", Duration::from_secs(2)).await.is_ok()
    })
    .await;
    assert_eq!(
        call("b", "slow", Duration::from_millis(10)).await,
        Err(CallError::Timeout)
    );
    // The late reply to the timed-out call is dropped, not misdelivered.
    assert_eq!(
        call("b", "echo", Duration::from_secs(2)).await.unwrap(),
        b"x"
    );
    assert_eq!(
        call("b", "slow", Duration::from_secs(2)).await.unwrap(),
        b"late x"
    );
    assert_eq!(
        router.send_command("zed", "probe.set", vec![]),
        Err(SendError::UnknownNode("zed".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limit_is_enforced_on_send() {
    let (_token, [a, b, _c]) = three(|c| c.max_payload = 4096).await;
    let router = a.node().router();
    let big = vec![b'x'; 4097];
    assert_eq!(
        router.emit("big", big.clone()),
        Err(SendError::PayloadTooLarge(4096))
    );
    assert_eq!(
        router
            .call(None, "b", "echo", big, Duration::from_secs(1))
            .await,
        Err(CallError::PayloadTooLarge(4096))
    );
    // Exactly the limit goes through, to a guest on another node and back.
    let max = vec![b'y'; 4096];
    let reply = router
        .call(None, "b", "echo", max.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, max);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_push_a_message_past_this_nodes_payload_limit() {
    // b allows 64 KiB, a only 4 KiB: what b sends over a's limit is
    // dropped by a (a call gets payload-too-large), the rest goes through.
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &["echo"], |c| c.max_payload = 4096).await;
    let b = join("b", &token, &[addr(&a)], &["probe"], |c| {
        c.max_payload = 64 << 10
    })
    .await;
    wait_up(&[&a, &b]).await;
    let router = b.node().router();
    let big = vec![b'x'; 8192];
    assert_eq!(
        router
            .call(None, "a", "echo", big, Duration::from_secs(5))
            .await,
        Err(CallError::PayloadTooLarge(4096))
    );
    let small = vec![b'y'; 4096];
    let reply = router
        .call(None, "a", "echo", small.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, small);
    // Nor can a reply: b answers 8 KiB, a refuses it.
    b.node().kv().set("big", &[b'z'; 8192]).unwrap();
    assert_eq!(
        a.node()
            .router()
            .call(
                None,
                "b",
                "probe.get",
                b"big".to_vec(),
                Duration::from_secs(5)
            )
            .await,
        Err(CallError::PayloadTooLarge(4096))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leaves_is_down_then_back_up() {
    let (token, [a, b, mut c]) = three(|_| {}).await;
    c.stop().await;
    for t in [&a, &b] {
        eventually(5, "c down", || async { status(t, "c") == PeerStatus::Down }).await;
    }
    let router = a.node().router();
    assert_eq!(
        router
            .call(None, "c", "echo", b"x".to_vec(), Duration::from_secs(2))
            .await,
        Err(CallError::NodeDown("c".into()))
    );
    assert_eq!(
        router.send_command("c", "echo", vec![]),
        Err(SendError::NodeDown("c".into()))
    );
    let nodes = probe(&a, "probe.node", "").await;
    assert_eq!(nodes, "a|3", "a down node is still a known member");

    // `c` comes back on another port, seeded with `b`; both sides link
    // again without anyone re-joining by hand.
    let mut cfg = c.config();
    cfg.cluster = Some(cluster_config(&token, &[addr(&b)]));
    c.restart(cfg).await;
    wait_up(&[&a, &b, &c]).await;
    let reply = router
        .call(None, "c", "echo", b"back".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_duplicate_names_are_refused() {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &["echo"], |_| {}).await;
    let b = join("b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;

    // A node of another cluster, pointed straight at `a`.
    let other = ClusterToken::generate();
    let x = join("x", &other, &[addr(&a)], &[], |_| {}).await;
    // A second `b` in the right cluster.
    let b2 = join("b", &token, &[addr(&a)], &[], |_| {}).await;
    // A plain QUIC client with no certificate.
    let plain = plain_quic_connect(addr(&a)).await;
    let refused = format!(
        "{:#}",
        plain.expect_err("a client without a certificate got in")
    );
    assert!(refused.contains("no certificates"), "{refused}");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peers = a.node().cluster().unwrap().peers();
    let names: Vec<_> = peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["b"], "only the first b is a member: {peers:?}");
    assert!(peers[0].up);
    assert_eq!(
        peers[0].addr,
        Some(addr(&b)),
        "the original b kept its link"
    );
    assert!(x.node().cluster().unwrap().peers().is_empty());
    assert_ne!(status(&b2, "a"), PeerStatus::Up);
    // The real `b` still reaches `a`.
    let reply = b
        .node()
        .router()
        .call(None, "a", "echo", b"hi".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply, b"hi");
}

/// Connect with TLS but no client certificate (and trusting any server).
async fn plain_quic_connect(to: SocketAddr) -> anyhow::Result<()> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    #[derive(Debug)]
    struct AnyServer(Arc<rustls::crypto::CryptoProvider>);
    impl ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"covey/1".to_vec()];
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint.connect_with(client, to, "covey")?.await?;
    // TLS 1.3 clients finish before the server checks their (missing)
    // certificate: the refusal shows up as the connection closing.
    let mut stream = conn.open_uni().await?;
    stream.write_all(b"hello?").await?;
    let closed = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
    match closed {
        Ok(reason) => anyhow::bail!("refused: {reason}"),
        Err(_) => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_peer_loses_its_own_messages_and_delays_nobody() {
    use covey::cluster::credentials::{CipherPreference, NodeCredentials, SERVER_NAME};
    use covey::cluster::frame::{Hello, PROTOCOL};

    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |_| {}).await;
    let b = join("b", &token, &[addr(&a)], &["testing/sink"], |c| {
        c.limits.mailbox = 8192;
    })
    .await;
    wait_up(&[&a, &b]).await;

    // A member that completes the hello and then never reads again.
    let creds = NodeCredentials::issue(&token, "stuck", CipherPreference::Aes).unwrap();
    let client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(creds.client.clone()).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(client, addr(&a), SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let hello = Hello {
        proto: PROTOCOL,
        cluster: token.fingerprint(),
        node: "stuck".into(),
        incarnation: 1,
        listen_port: 9,
        version: "test".into(),
    };
    let (_their_hello, _send, _recv_never_read) =
        covey::cluster::link::exchange_hello(&conn, &hello, 1 << 20)
            .await
            .unwrap();
    eventually(5, "stuck is a member", || async {
        status(&a, "stuck") == PeerStatus::Up
    })
    .await;

    // 100,000 events of 64 bytes: far more than the stuck peer's flow
    // control window and queue hold. Paced by b's progress only.
    let router = a.node().router();
    let handled = || {
        b.node()
            .router()
            .stats
            .handled
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let total = 100_000u64;
    for batch in 0..total / 1000 {
        for _ in 0..1000 {
            router.emit("bench", vec![7u8; 64]).unwrap();
        }
        eventually(10, "b keeps up", || async {
            handled() >= (batch + 1) * 1000
        })
        .await;
    }
    let seen = b
        .node()
        .router()
        .call(None, "b", "count", vec![], Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(seen).unwrap(),
        total.to_string(),
        "b got every event"
    );
    let peers = a.node().cluster().unwrap().peers();
    let stuck = peers.iter().find(|p| p.name == "stuck").unwrap();
    let to_b = peers.iter().find(|p| p.name == "b").unwrap();
    assert!(
        stuck.frames_dropped > 0,
        "drops to the stuck peer are counted: {stuck:?}"
    );
    assert_eq!(to_b.frames_dropped, 0, "{to_b:?}");
    drop(conn);
}
