//! Dialling: every peer this node knows of is kept linked. A dial loop per
//! target (a `--peer` address, or a node learnt from mDNS or gossip) dials
//! while the node is down, with backoff, and sleeps while it is up.

use std::net::{SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::link::{self, PeerLink};
use super::{Shared, credentials};
use crate::router::PeerStatus;

/// First and longest wait between dials of a down peer.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A dialled link that survives this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_millis(500);

pub(super) enum DialTarget {
    /// A `--peer` address; its node name is learnt from the hello.
    Static(String),
    /// A node learnt from mDNS or a peer; its address is in `Members`.
    Node(String),
}

impl Shared {
    /// A node heard of (mDNS or gossip): remember it and keep it dialled.
    pub(super) fn learn(self: &Arc<Self>, node: &str, addrs: &[SocketAddr]) {
        // A link-local address without its interface cannot be dialled
        // here: gossip carries no scope (it would be the sender's interface
        // anyway), and dialling `fe80::…` unscoped sends from some interface
        // while replies arrive scoped, which QUIC then drops as coming from
        // an unknown peer: the handshake times out.
        let addrs: Vec<SocketAddr> = addrs.iter().copied().filter(dialable).collect();
        if node == self.me.node || addrs.is_empty() {
            return;
        }
        if let Err(e) = crate::config::validate_node_name(node) {
            tracing::debug!("ignoring addresses of a peer: {e}");
            return;
        }
        if self.members.note_addrs(node, &addrs).is_err() {
            tracing::debug!(
                "ignoring addresses of a new peer: {} nodes known already",
                super::members::MAX_NODES
            );
            return;
        }
        if self.members.status(node) == PeerStatus::Up {
            return;
        }
        self.ensure_dialer(format!("node:{node}"), DialTarget::Node(node.to_string()));
    }

    pub(super) fn ensure_dialer(self: &Arc<Self>, key: String, target: DialTarget) {
        let mut dialers = self.dialers.lock().unwrap();
        if dialers.get(&key).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let task = tokio::spawn(self.clone().dial_loop(target));
        dialers.insert(key, task);
    }

    /// Keep one target linked: dial while its node is down, with backoff;
    /// sleep while it is up.
    async fn dial_loop(self: Arc<Self>, target: DialTarget) {
        let mut name = match &target {
            DialTarget::Node(n) => Some(n.clone()),
            DialTarget::Static(_) => None,
        };
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        loop {
            let mut changed = self.members.watch();
            if let Some(n) = &name
                && self.members.status(n) == PeerStatus::Up
            {
                let _ = changed.changed().await;
                continue;
            }
            let result = match &target {
                DialTarget::Static(spec) => self.dial_spec(spec).await,
                DialTarget::Node(n) => self.dial_any(&self.members.candidates(n)).await,
            };
            // A link the peer closes at once (a duplicate name, another
            // protocol version) counts as a failed dial, so it is retried
            // with backoff, not in a tight loop. Unless the peer stays up
            // through another link: then this one lost a simultaneous dial
            // (both nodes dialled, one link of the pair is kept), and the
            // node is linked.
            let result = match result {
                Ok(link) => {
                    tokio::select! {
                        _ = link.conn.closed() => match self.members.link(&link.node) {
                            Some(kept) if !Arc::ptr_eq(&kept, &link) && !kept.is_closed() => Ok(link),
                            _ => Err(anyhow::anyhow!(link::closed_reason(&link.conn))),
                        },
                        _ = tokio::time::sleep(STABLE_AFTER) => Ok(link),
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(link) => {
                    name = Some(link.node.to_string());
                    backoff = BACKOFF_MIN;
                    failures = 0;
                }
                Err(e) => {
                    let what = match &target {
                        DialTarget::Static(s) => s.clone(),
                        DialTarget::Node(n) => format!("node `{n}`"),
                    };
                    failures += 1;
                    // Loud once, then quiet: a peer that is off for a week
                    // should not fill the log.
                    if failures == 1 {
                        tracing::warn!("cannot link to {what}: {e:#} (retrying)");
                    } else {
                        tracing::debug!("cannot link to {what}: {e:#}");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn dial_spec(self: &Arc<Self>, spec: &str) -> Result<Arc<PeerLink>> {
        let addrs: Vec<SocketAddr> = match scoped_spec(spec)? {
            Some(addr) => vec![addr],
            None => (tokio::net::lookup_host(spec).await)
                .with_context(|| format!("resolving `{spec}`"))?
                .filter(dialable)
                .collect(),
        };
        self.dial_any(&addrs)
            .await
            .with_context(|| format!("`{spec}`"))
    }

    /// Dial each address in turn; the first link wins.
    async fn dial_any(self: &Arc<Self>, addrs: &[SocketAddr]) -> Result<Arc<PeerLink>> {
        let mut last = anyhow::anyhow!("no address known");
        for addr in addrs {
            match self.dial(*addr).await {
                Ok(link) => return Ok(link),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn dial(self: &Arc<Self>, addr: SocketAddr) -> Result<Arc<PeerLink>> {
        let connecting =
            self.endpoint
                .connect_with(self.client.clone(), addr, credentials::SERVER_NAME)?;
        let conn = connecting
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        self.establish(conn, true)
            .await
            .with_context(|| format!("linking with {addr}"))
    }
}

/// Whether `addr` can be dialled from this host: not an IPv6 link-local
/// address without the interface it is on.
fn dialable(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(v6) => !(v6.ip().is_unicast_link_local() && v6.scope_id() == 0),
        SocketAddr::V4(_) => true,
    }
}

/// A `--peer` IPv6 link-local address with its interface, by number or by
/// name: `[fe80::1%2]:7466`, `[fe80::1%eth0]:7466`. None for other specs
/// (names, other addresses); an error for a link-local address without an
/// interface or with an unknown one.
fn scoped_spec(spec: &str) -> Result<Option<SocketAddr>> {
    let Some((host, port)) = spec.strip_prefix('[').and_then(|s| s.split_once("]:")) else {
        return Ok(None);
    };
    let (ip, iface) = host.split_once('%').unwrap_or((host, ""));
    let Ok(ip) = ip.parse::<std::net::Ipv6Addr>() else {
        return Ok(None);
    };
    if !ip.is_unicast_link_local() {
        return Ok(None);
    }
    let port: u16 = port
        .parse()
        .with_context(|| format!("the port of `{spec}`"))?;
    anyhow::ensure!(
        !iface.is_empty(),
        "`{spec}` is a link-local address: name its interface, e.g. `[{ip}%eth0]:{port}`"
    );
    let scope = match iface.parse::<u32>() {
        Ok(index) => index,
        Err(_) => interface_index(iface)
            .with_context(|| format!("`{spec}`: no network interface `{iface}`"))?,
    };
    Ok(Some(SocketAddrV6::new(ip, port, 0, scope).into()))
}

/// The index of the network interface called `name`.
fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_addresses_need_their_interface() {
        let unscoped: SocketAddr = "[fe80::1]:7466".parse().unwrap();
        let scoped: SocketAddr = "[fe80::1%1]:7466".parse().unwrap();
        assert!(!dialable(&unscoped));
        assert!(dialable(&scoped));
        assert!(dialable(&"[fd00::1]:7466".parse().unwrap()));
        assert!(dialable(&"10.0.0.1:7466".parse().unwrap()));
        // By number and by name (`lo` is there everywhere).
        assert_eq!(scoped_spec("[fe80::1%1]:7466").unwrap(), Some(scoped));
        let lo = scoped_spec("[fe80::1%lo]:7466").unwrap().unwrap();
        assert!(matches!(lo, SocketAddr::V6(v6) if v6.scope_id() != 0 && v6.port() == 7466));
        let e = scoped_spec("[fe80::1]:7466").unwrap_err().to_string();
        assert!(e.contains("name its interface"), "{e}");
        let e = scoped_spec("[fe80::1%nosuch0]:7466")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no network interface `nosuch0`"), "{e}");
        // Everything else is left to the resolver.
        assert_eq!(scoped_spec("[fd00::1]:7466").unwrap(), None);
        assert_eq!(scoped_spec("pi.local:7466").unwrap(), None);
        assert_eq!(scoped_spec("10.0.0.1:7466").unwrap(), None);
    }
}
