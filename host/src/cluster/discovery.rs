//! mDNS: announce this node as `_covey._udp.local.` and link to every
//! node of the same cluster that announces itself.
//!
//! The TXT record carries the node name, the cluster fingerprint and the
//! protocol version; announcements of other clusters (or other protocol
//! versions) on the same LAN are ignored before any packet is sent to them.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Weak;

use anyhow::{Context, Result};
use mdns_sd::{IfKind, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::task::JoinHandle;

use super::Shared;
use super::frame::{Hello, PROTOCOL};

pub const SERVICE: &str = "_covey._udp.local.";

pub struct Discovery {
    daemon: ServiceDaemon,
    fullname: String,
    task: JoinHandle<()>,
}

impl Discovery {
    pub(super) fn start(me: &Hello, ifaces: &[String], cluster: Weak<Shared>) -> Result<Self> {
        let daemon = ServiceDaemon::new().context("creating the mDNS responder")?;
        if !ifaces.is_empty() {
            daemon.disable_interface(IfKind::All)?;
            for name in ifaces {
                daemon.enable_interface(IfKind::Name(name.clone()))?;
            }
        }
        // Instance and host names carry the fingerprint: two clusters on
        // one LAN may well both have a node called `kitchen`.
        let instance = format!("{}-{}", me.node, &me.cluster[..8]);
        let host = format!("{}.local.", instance.replace(['.', '_'], "-"));
        let props = [
            ("node", me.node.clone()),
            ("cluster", me.cluster.clone()),
            ("proto", PROTOCOL.to_string()),
            ("version", me.version.clone()),
        ];
        let info = ServiceInfo::new(SERVICE, &instance, &host, (), me.listen_port, &props[..])
            .context("building the mDNS announcement")?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        daemon
            .register(info)
            .context("announcing this node over mDNS")?;
        let events = daemon.browse(SERVICE).context("browsing mDNS")?;
        let my_name = me.node.clone();
        let fingerprint = me.cluster.clone();
        let cluster = cluster;
        let task = tokio::spawn(async move {
            while let Ok(event) = events.recv_async().await {
                let ServiceEvent::ServiceResolved(svc) = event else {
                    continue;
                };
                let txt = &svc.txt_properties;
                let (Some(node), Some(their_cluster)) = (
                    txt.get_property_val_str("node"),
                    txt.get_property_val_str("cluster"),
                ) else {
                    continue;
                };
                if node == my_name
                    || their_cluster != fingerprint
                    || txt.get_property_val_str("proto") != Some(&PROTOCOL.to_string())
                {
                    continue;
                }
                let Some(shared) = cluster.upgrade() else {
                    return;
                };
                let mut addrs: Vec<SocketAddr> = svc
                    .addresses
                    .iter()
                    .map(|ip| dial_addr(ip, svc.port))
                    .collect();
                addrs.sort_by_key(|a| preference(a.ip()));
                addrs.dedup();
                if addrs.is_empty() {
                    continue;
                }
                tracing::debug!(node, ?addrs, "found over mDNS");
                shared.learn(node, &addrs);
            }
        });
        Ok(Discovery {
            daemon,
            fullname,
            task,
        })
    }

    /// Withdraw the announcement (peers drop the record at once) and stop.
    pub fn shutdown(self) {
        self.task.abort();
        if let Ok(rx) = self.daemon.unregister(&self.fullname) {
            let _ = rx.recv_timeout(std::time::Duration::from_millis(500));
        }
        let _ = self.daemon.shutdown();
    }
}

/// Which announced address to dial first: IPv4, then global IPv6,
/// loopback last.
fn preference(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => 3,
        IpAddr::V4(_) => 0,
        IpAddr::V6(v6) if v6.is_loopback() => 3,
        IpAddr::V6(v6) if v6.is_unicast_link_local() => 2,
        IpAddr::V6(_) => 1,
    }
}

/// The address to dial for an announced `ip`: an IPv6 link-local address
/// gets the interface it was heard on as its scope (`Shared::learn` drops
/// one that has none).
fn dial_addr(ip: &ScopedIp, port: u16) -> SocketAddr {
    match ip {
        ScopedIp::V6(v6) if v6.addr().is_unicast_link_local() => {
            SocketAddrV6::new(*v6.addr(), port, 0, v6.scope_id().index).into()
        }
        other => SocketAddr::new(other.to_ip_addr(), port),
    }
}
