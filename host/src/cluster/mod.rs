//! The cluster: QUIC links with mutual TLS to every other node, membership,
//! discovery, and the router's way out to other nodes.
//!
//! - [`credentials`] — the cluster token, the CA derived from it, this
//!   node's certificate and TLS configurations.
//! - [`frame`] — what travels on a link.
//! - [`link`] — `PeerLink`, one connection to one peer.
//! - `outbox` — a link's bounded outbound queue, small frames copied together.
//! - [`members`] — who is up, since when, and the link to each.
//! - [`presence`] — what this node's scripts were told of that:
//!   `covey.node.up` / `covey.node.down`, once per transition.
//! - [`discovery`] — mDNS announce and browse.
//!
//! Data paths: instance → router → [`Cluster`] (as `Remote`) → link →
//! network; network → link → [`Cluster`] (as `Inbound`) → router →
//! instance. Every node links to every other node directly (full mesh: a
//! fleet is tens of nodes, and a direct link keeps ordering and failure
//! detection per pair simple). Links come from three places: static
//! `--peer` addresses, mDNS, and addresses gossiped by peers; each is
//! re-dialled with backoff for as long as the node is down.

pub mod credentials;
mod dial;
pub mod discovery;
pub mod frame;
mod inbound;
pub mod link;
pub mod members;
mod outbox;
pub mod presence;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::Endpoint;
use tokio::task::JoinHandle;

use self::credentials::{CipherPreference, ClusterToken, NodeCredentials};
use self::dial::DialTarget;
use self::frame::{DocId, Frame, Hello, PROTOCOL, PeerAddr, WireCallError, WireMessage};
use self::link::{Inbound, PeerLink, close};
use self::members::{Members, PeerReport};
use self::presence::Presence;
use crate::bindings::{CallError, NodeInfo};
use crate::router::{CallFuture, Message, PeerStatus, Remote, Router};

/// Clustering settings, resolved from flags, environment and file.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub token: ClusterToken,
    /// Where to accept links (UDP). Port 0 picks a free port.
    pub bind: SocketAddr,
    /// Static peers, `host:port` (names are resolved at every dial).
    pub peers: Vec<String>,
    /// Announce and browse with mDNS.
    pub mdns: bool,
    /// Network interfaces for mDNS (empty: all).
    pub ifaces: Vec<String>,
    /// A peer silent this long is down (keep-alives go every third of it).
    pub peer_timeout: Duration,
    pub cipher: CipherPreference,
    /// A link that drops and comes back within this long is not reported
    /// to scripts as `covey.node.down` (0: every drop is).
    pub flap_window: Duration,
}

pub const DEFAULT_PORT: u16 = 7466;

impl ClusterConfig {
    pub fn new(token: ClusterToken) -> Self {
        ClusterConfig {
            token,
            bind: SocketAddr::from(([0u16; 8], DEFAULT_PORT)),
            peers: Vec::new(),
            mdns: true,
            ifaces: Vec::new(),
            peer_timeout: Duration::from_secs(3),
            cipher: CipherPreference::detect(),
            flap_window: presence::DEFAULT_FLAP_WINDOW,
        }
    }
}

/// A document replicated over the links (the key-value store, the scripts
/// manifest): told when a peer comes and goes, handed its sync messages.
pub trait Replica: Send + Sync + 'static {
    fn doc(&self) -> DocId;
    fn peer_up(&self, link: &Arc<PeerLink>);
    fn peer_down(&self, link: &Arc<PeerLink>);
    fn receive(&self, link: &Arc<PeerLink>, msg: &[u8]);
    /// The document whole, for a peer that has to start over.
    fn snapshot(&self) -> Option<Vec<u8>> {
        None
    }
    /// Whether the document holds every change `heads` name.
    fn holds(&self, heads: &[[u8; 32]]) -> bool {
        let _ = heads;
        false
    }
}

/// Where a node finds the blobs (script file contents) peers ask for.
pub trait BlobSource: Send + Sync + 'static {
    fn blob(&self, hash: &[u8; 32]) -> Option<Vec<u8>>;
}

/// Longest wait for one blob from a peer.
const BLOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A running cluster membership of this node (clones share it).
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

struct Shared {
    me: Hello,
    router: Arc<Router>,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    members: Members,
    presence: Arc<Presence>,
    /// Dial loops, by target (`peer:host:port` or `node:name`).
    dialers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// One admission at a time, so two links of one node cannot race.
    admit: tokio::sync::Mutex<()>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
    discovery: Mutex<Option<discovery::Discovery>>,
    replicas: Vec<Arc<dyn Replica>>,
    blobs: Option<Arc<dyn BlobSource>>,
    config: ClusterConfig,
}

impl Cluster {
    /// Bind the endpoint, start accepting, dial the static peers and
    /// start mDNS. The router sends to other nodes through the cluster.
    pub async fn start(
        config: ClusterConfig,
        router: Arc<Router>,
        replicas: Vec<Arc<dyn Replica>>,
        blobs: Option<Arc<dyn BlobSource>>,
    ) -> Result<Cluster> {
        let node = router.node_name().to_string();
        let creds = NodeCredentials::issue(&config.token, &node, config.cipher)?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_idle_timeout(Some(config.peer_timeout.try_into()?))
            .keep_alive_interval(Some(config.peer_timeout / 3))
            .max_concurrent_uni_streams(4u32.into())
            .max_concurrent_bidi_streams(16u32.into());
        let transport = Arc::new(transport);
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(creds.server.clone())?,
        ));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(creds.client.clone())?,
        ));
        client.transport_config(transport);
        let endpoint = bind_endpoint(server, config.bind)?;
        let local = endpoint.local_addr()?;
        let me = Hello {
            proto: PROTOCOL,
            cluster: creds.fingerprint.clone(),
            node,
            incarnation: crate::random::u64(),
            listen_port: local.port(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let shared = Arc::new(Shared {
            me,
            router: router.clone(),
            endpoint,
            client,
            members: Members::default(),
            presence: Presence::new(router.clone(), config.flap_window),
            dialers: Mutex::new(HashMap::new()),
            admit: tokio::sync::Mutex::new(()),
            accept_task: Mutex::new(None),
            discovery: Mutex::new(None),
            replicas,
            blobs,
            config: config.clone(),
        });
        router.set_remote(shared.clone());
        let accept = tokio::spawn(shared.clone().accept_loop());
        *shared.accept_task.lock().unwrap() = Some(accept);
        for spec in &config.peers {
            shared.ensure_dialer(format!("peer:{spec}"), DialTarget::Static(spec.clone()));
        }
        if config.mdns {
            let d =
                discovery::Discovery::start(&shared.me, &config.ifaces, Arc::downgrade(&shared))
                    .context("starting mDNS discovery (use --discovery off to go without)")?;
            *shared.discovery.lock().unwrap() = Some(d);
        }
        tracing::info!(
            listen = %local,
            cluster = shared.me.cluster,
            peers = config.peers.len(),
            mdns = config.mdns,
            cipher = ?config.cipher,
            "cluster links up"
        );
        Ok(Cluster { shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.endpoint.local_addr().expect("bound endpoint")
    }

    pub fn fingerprint(&self) -> &str {
        &self.shared.me.cluster
    }

    pub fn peers(&self) -> Vec<PeerReport> {
        self.shared.members.reports()
    }

    pub fn status(&self, node: &str) -> PeerStatus {
        self.shared.members.status(node)
    }

    /// Link to `host:port` too (and keep re-dialling it while down), as
    /// if it had been given with `--peer`.
    /// Close the link to `node` as a network fault would (code `BAD_FRAME`,
    /// not a shutdown); it is re-dialled. False if no link is up. How the
    /// tests make a link flap.
    pub fn sever(&self, node: &str) -> bool {
        match self.shared.members.link(node) {
            Some(link) => {
                link.close(close::BAD_FRAME, "severed");
                true
            }
            None => false,
        }
    }

    pub fn add_peer(&self, spec: &str) {
        self.shared
            .ensure_dialer(format!("peer:{spec}"), DialTarget::Static(spec.to_string()));
    }

    /// Names of the peers that are up.
    pub fn up_peers(&self) -> Vec<String> {
        self.shared
            .members
            .up_links()
            .iter()
            .map(|l| l.node.to_string())
            .collect()
    }

    /// Fetch a blob from `node`: none if it does not have it.
    pub async fn fetch_blob(&self, node: &str, hash: &[u8; 32]) -> Result<Option<Vec<u8>>> {
        let link = self
            .shared
            .members
            .link(node)
            .with_context(|| format!("node `{node}` is not linked"))?;
        // Generous: 32 MiB over a slow Wi-Fi link; a dead peer fails much
        // sooner through the link's idle timeout.
        tokio::time::timeout(BLOB_TIMEOUT, link::fetch_blob(&link.conn, hash))
            .await
            .with_context(|| format!("fetching from `{node}` timed out"))?
    }

    /// Leave: say goodbye on mDNS, close every link (peers see the node
    /// down at once instead of after the timeout), stop dialling.
    pub async fn shutdown(self) {
        let s = &self.shared;
        s.presence.close();
        if let Some(d) = s.discovery.lock().unwrap().take() {
            d.shutdown();
        }
        for (_, h) in s.dialers.lock().unwrap().drain() {
            h.abort();
        }
        if let Some(h) = s.accept_task.lock().unwrap().take() {
            h.abort();
        }
        for link in s.members.take_links() {
            link.close(close::SHUTDOWN, "node shutting down");
        }
        s.endpoint
            .close(close::SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), s.endpoint.wait_idle()).await;
    }
}

fn bind_endpoint(server: quinn::ServerConfig, bind: SocketAddr) -> Result<Endpoint> {
    match Endpoint::server(server.clone(), bind) {
        Ok(e) => Ok(e),
        // No IPv6 on this host: the IPv4 wildcard instead of `[::]`.
        Err(_) if bind.ip().is_unspecified() && bind.is_ipv6() => {
            let v4 = SocketAddr::from(([0, 0, 0, 0], bind.port()));
            Endpoint::server(server, v4).with_context(|| format!("binding UDP {v4}"))
        }
        Err(e) => Err(e).with_context(|| format!("binding UDP {bind} for cluster links")),
    }
}

impl Shared {
    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let result = async {
                    let conn = incoming.await?;
                    me.establish(conn, false).await
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!(%remote, "refused a link: {e:#}");
                }
            });
        }
    }

    /// Hello exchange, checks, admission into membership, then run.
    async fn establish(
        self: &Arc<Self>,
        conn: quinn::Connection,
        dialed: bool,
    ) -> Result<Arc<PeerLink>> {
        let max = self.router.max_payload();
        let hello = tokio::time::timeout(
            self.config.peer_timeout,
            link::exchange_hello(&conn, &self.me, max),
        )
        .await;
        let (hello, send, reader) = match hello {
            Ok(Ok(h)) => h,
            Ok(Err(e)) if conn.close_reason().is_some() => {
                anyhow::bail!("{} ({e})", link::closed_reason(&conn))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => anyhow::bail!("no hello from the peer in time"),
        };
        let refuse = |code: u32, why: String| {
            conn.close(code.into(), why.as_bytes());
            Err(anyhow::anyhow!(why))
        };
        if hello.proto != PROTOCOL {
            return refuse(
                close::PROTOCOL,
                format!(
                    "protocol version {} (covey {}) is not {} (covey {}): upgrade the older node",
                    hello.proto, hello.version, PROTOCOL, self.me.version
                ),
            );
        }
        if hello.cluster != self.me.cluster {
            return refuse(
                close::WRONG_CLUSTER,
                format!("cluster {} is not {}", hello.cluster, self.me.cluster),
            );
        }
        if let Err(e) = crate::config::validate_node_name(&hello.node) {
            return refuse(close::PROTOCOL, format!("peer's {e}"));
        }
        if hello.node == self.me.node {
            return refuse(
                close::DUPLICATE_NAME,
                format!(
                    "duplicate node name `{}`: both ends of this link use it; node names must be unique",
                    hello.node
                ),
            );
        }
        let link = PeerLink::new(hello, conn, dialed);
        let _turn = self.admit.lock().await;
        if let Some(old) = self.members.link(&link.node)
            && !old.is_closed()
        {
            if old.hello.incarnation == link.hello.incarnation {
                // Both processes dialled each other at once. Both keep the
                // connection dialled by the node whose name sorts first.
                let first = self.me.node.as_str().min(&*link.node);
                let new_dialer = if link.dialed {
                    self.me.node.as_str()
                } else {
                    &*link.node
                };
                if new_dialer != first {
                    link.close(close::DUPLICATE_LINK, "duplicate link");
                    return Ok(old);
                }
                old.close(close::DUPLICATE_LINK, "duplicate link");
            } else if link::probe(&old.conn, Duration::from_secs(1)).await {
                let why = format!(
                    "duplicate node name `{}`: a node of that name is already linked from {}; \
                     node names must be unique",
                    link.node, old.addr
                );
                tracing::error!("{why}");
                link.close(close::DUPLICATE_NAME, &why);
                anyhow::bail!(why);
            } else {
                old.close(close::SHUTDOWN, "replaced by a newer link (peer restarted)");
            }
        }
        self.members.set_up(link.clone());
        let id = link.conn.stable_id();
        (self.presence).up(&link.node, id, link.hello.incarnation, link.addr);
        link.run(send, reader, self.clone());
        for r in &self.replicas {
            r.peer_up(&link);
        }
        drop(_turn);
        tracing::info!(
            peer = %link.node,
            addr = %link.addr,
            version = link.hello.version,
            "peer up"
        );
        self.gossip(&link);
        Ok(link)
    }

    /// Tell the new peer about every other live peer, and them about it.
    fn gossip(&self, new: &Arc<PeerLink>) {
        let all = self.members.up_addrs();
        let others: Vec<PeerAddr> = all
            .iter()
            .filter(|(n, _)| *n != new.node)
            .map(|(n, a)| PeerAddr {
                node: n.to_string(),
                addr: *a,
            })
            .collect();
        if !others.is_empty() {
            new.offer(Frame::Peers(others).encode());
        }
        let about_new = Frame::Peers(vec![PeerAddr {
            node: new.node.to_string(),
            addr: new.addr,
        }])
        .encode();
        for link in self.members.up_links().iter() {
            if !Arc::ptr_eq(link, new) {
                link.offer(about_new.clone());
            }
        }
    }
}

thread_local! {
    /// Where an event is encoded once before it is copied into each link's
    /// queue (see `outbox`).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encode `frame` in this thread's scratch buffer and offer it to `links`.
fn offer_to_all(frame: &Frame<'_>, links: &[Arc<PeerLink>]) {
    SCRATCH.with_borrow_mut(|buf| {
        frame.encode_into(buf);
        for link in links {
            link.offer_slice(buf);
        }
        // A large payload's buffer is not kept for the thread's lifetime.
        if buf.capacity() > 64 * 1024 {
            *buf = Vec::new();
        }
    });
}

impl Remote for Shared {
    fn peer(&self, node: &str) -> PeerStatus {
        self.members.status(node)
    }

    fn broadcast_event(&self, msg: &Message) {
        let links = self.members.up_links();
        if links.is_empty() {
            return;
        }
        offer_to_all(&Frame::Event(WireMessage::borrow(msg)), &links);
    }

    fn send_command(&self, to: Option<&str>, msg: &Message) {
        let frame = Frame::Command(WireMessage::borrow(msg));
        match to {
            Some(node) => {
                if let Some(link) = self.members.link(node) {
                    offer_to_all(&frame, &[link]);
                }
            }
            None => offer_to_all(&frame, &self.members.up_links()),
        }
    }

    fn call(&self, node: &str, msg: Message, timeout: Duration) -> CallFuture {
        let link = self.members.link(node);
        let node = node.to_string();
        Box::pin(async move {
            match link {
                Some(link) => link.call(&msg, timeout).await,
                None => Err(crate::bindings::CallError::NodeDown(node)),
            }
        })
    }

    fn members(&self) -> Vec<NodeInfo> {
        self.members.infos()
    }

    fn replay_up(&self, deliver: &mut dyn FnMut(Vec<u8>)) {
        self.presence.replay(deliver);
    }
}
