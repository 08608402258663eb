//! `Members`: which nodes this node knows, which are up, and the link to
//! each. The one place membership changes, so every change wakes the
//! dialers and refreshes the snapshot used on the broadcast hot path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::link::PeerLink;
use crate::bindings::NodeInfo;
use crate::clock::now_ms;
use crate::router::PeerStatus;

/// Most nodes remembered (a "small fleet" is far below this).
pub const MAX_NODES: usize = 1024;

/// [`Members::note_addrs`] refused a new node: [`MAX_NODES`] are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyNodes;

struct Member {
    addr: Option<SocketAddr>,
    /// Addresses to dial while it is down, best first (mDNS can announce
    /// several: Ethernet, Wi-Fi, a container bridge that is unreachable).
    candidates: Vec<SocketAddr>,
    since_ms: u64,
    link: Option<Arc<PeerLink>>,
    version: String,
}

/// One peer as `covey status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PeerReport {
    pub name: String,
    pub up: bool,
    /// When it last went up or down (ms since the Unix epoch).
    pub since_ms: u64,
    pub addr: Option<SocketAddr>,
    /// Smoothed round-trip time of the link, microseconds.
    pub rtt_us: Option<u64>,
    pub version: String,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub frames_dropped: u64,
}

pub struct Members {
    map: Mutex<BTreeMap<Arc<str>, Member>>,
    /// The links that are up, for broadcasts without taking the lock.
    up: RwLock<Arc<Vec<Arc<PeerLink>>>>,
    changed: watch::Sender<u64>,
}

impl Default for Members {
    fn default() -> Self {
        Members {
            map: Mutex::new(BTreeMap::new()),
            up: RwLock::new(Arc::new(Vec::new())),
            changed: watch::Sender::new(0),
        }
    }
}

impl Members {
    pub fn status(&self, node: &str) -> PeerStatus {
        match self.map.lock().unwrap().get(node) {
            Some(m) if m.link.is_some() => PeerStatus::Up,
            Some(_) => PeerStatus::Down,
            None => PeerStatus::Unknown,
        }
    }

    pub fn link(&self, node: &str) -> Option<Arc<PeerLink>> {
        self.map.lock().unwrap().get(node)?.link.clone()
    }

    /// Where to dial `node`, best first.
    pub fn candidates(&self, node: &str) -> Vec<SocketAddr> {
        self.map
            .lock()
            .unwrap()
            .get(node)
            .map(|m| m.candidates.clone())
            .unwrap_or_default()
    }

    pub fn up_links(&self) -> Arc<Vec<Arc<PeerLink>>> {
        self.up.read().unwrap().clone()
    }

    /// Wakes when membership changes (subscribe before checking state).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Remember addresses for `node` (from mDNS or a peer), ahead of the
    /// ones known before. Returns whether the node was not known before,
    /// or `Err` if it is new and [`MAX_NODES`] are known already (gossip
    /// is peer data: it cannot make this node remember, and dial, without
    /// bound).
    pub fn note_addrs(&self, node: &str, addrs: &[SocketAddr]) -> Result<bool, TooManyNodes> {
        const KEEP: usize = 8;
        let mut map = self.map.lock().unwrap();
        let fresh = !map.contains_key(node);
        if fresh && map.len() >= MAX_NODES {
            return Err(TooManyNodes);
        }
        let m = map.entry(node.into()).or_insert_with(|| Member {
            addr: None,
            candidates: Vec::new(),
            since_ms: now_ms(),
            link: None,
            version: String::new(),
        });
        let mut merged: Vec<SocketAddr> = addrs.to_vec();
        merged.extend(m.candidates.iter().filter(|a| !addrs.contains(a)));
        merged.truncate(KEEP);
        m.candidates = merged;
        if m.link.is_none() {
            m.addr = m.candidates.first().copied();
        }
        drop(map);
        if fresh {
            self.changed.send_modify(|v| *v += 1);
        }
        Ok(fresh)
    }

    /// `link` is now the link to its node; returns the one it replaces.
    pub fn set_up(&self, link: Arc<PeerLink>) -> Option<Arc<PeerLink>> {
        let mut map = self.map.lock().unwrap();
        let m = map.entry(link.node.clone()).or_insert(Member {
            addr: None,
            candidates: Vec::new(),
            since_ms: 0,
            link: None,
            version: String::new(),
        });
        m.addr = Some(link.addr);
        // The address that worked goes first for the next reconnect.
        m.candidates.retain(|a| *a != link.addr);
        m.candidates.insert(0, link.addr);
        m.version = link.hello.version.clone();
        let old = m.link.replace(link);
        if old.is_none() {
            m.since_ms = now_ms();
        }
        self.refresh(&map);
        old
    }

    /// `link` closed: the node is down unless another link replaced it.
    /// Returns true if this marked the node down.
    pub fn set_down(&self, link: &Arc<PeerLink>) -> bool {
        let mut map = self.map.lock().unwrap();
        let Some(m) = map.get_mut(&link.node) else {
            return false;
        };
        if !m.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            return false;
        }
        m.link = None;
        m.since_ms = now_ms();
        self.refresh(&map);
        true
    }

    fn refresh(&self, map: &BTreeMap<Arc<str>, Member>) {
        let links = map.values().filter_map(|m| m.link.clone()).collect();
        *self.up.write().unwrap() = Arc::new(links);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Every known peer, for `node.nodes`.
    pub fn infos(&self) -> Vec<NodeInfo> {
        let map = self.map.lock().unwrap();
        map.iter()
            .map(|(name, m)| NodeInfo {
                name: name.to_string(),
                up: m.link.is_some(),
                since_ms: m.since_ms,
            })
            .collect()
    }

    /// Names and addresses of the peers that are up (for gossip).
    pub fn up_addrs(&self) -> Vec<(Arc<str>, SocketAddr)> {
        self.up_links()
            .iter()
            .map(|l| (l.node.clone(), l.addr))
            .collect()
    }

    pub fn reports(&self) -> Vec<PeerReport> {
        let map = self.map.lock().unwrap();
        map.iter()
            .map(|(name, m)| {
                let link = m.link.as_ref();
                let stat = |f: fn(&PeerLink) -> u64| link.map(|l| f(l)).unwrap_or(0);
                PeerReport {
                    name: name.to_string(),
                    up: link.is_some(),
                    since_ms: m.since_ms,
                    addr: m.addr,
                    rtt_us: link.map(|l| l.conn.rtt().as_micros() as u64),
                    version: m.version.clone(),
                    frames_sent: stat(|l| l.stats.sent.load(Ordering::Relaxed)),
                    frames_received: stat(|l| l.stats.received.load(Ordering::Relaxed)),
                    frames_dropped: stat(|l| l.stats.dropped.load(Ordering::Relaxed)),
                }
            })
            .collect()
    }

    /// Every link, up or being replaced, for shutdown.
    pub fn take_links(&self) -> Vec<Arc<PeerLink>> {
        let mut map = self.map.lock().unwrap();
        let links = map.values_mut().filter_map(|m| m.link.take()).collect();
        self.refresh(&map);
        links
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_addresses_are_kept_newest_first_without_repeats() {
        let m = Members::default();
        let a: SocketAddr = "10.0.0.1:7466".parse().unwrap();
        let b: SocketAddr = "172.17.0.1:7466".parse().unwrap();
        let c: SocketAddr = "[fd00::1]:7466".parse().unwrap();
        assert!(m.note_addrs("pi", &[a, b]).unwrap());
        assert_eq!(m.status("pi"), PeerStatus::Down);
        assert!(!m.note_addrs("pi", &[c, a]).unwrap());
        assert_eq!(m.candidates("pi"), [c, a, b]);
        let many: Vec<SocketAddr> = (0..20)
            .map(|i| SocketAddr::from(([10, 0, 1, i], 7466)))
            .collect();
        m.note_addrs("pi", &many).unwrap();
        assert_eq!(m.candidates("pi").len(), 8);
        assert!(m.candidates("nobody").is_empty());
    }

    #[test]
    fn gossip_cannot_grow_the_member_list_without_bound() {
        let m = Members::default();
        let a: SocketAddr = "10.0.0.1:7466".parse().unwrap();
        for i in 0..MAX_NODES {
            assert!(m.note_addrs(&format!("n{i}"), &[a]).unwrap());
        }
        assert_eq!(m.note_addrs("one-more", &[a]), Err(TooManyNodes));
        // Known nodes still take new addresses.
        assert_eq!(m.note_addrs("n0", &[a]), Ok(false));
    }
}
