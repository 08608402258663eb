//! The UDP transport: one socket, one session per source address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::{Bridge, Peer, Transmit};

struct UdpTx {
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

impl Transmit for UdpTx {
    fn send(&self, frame: &[u8]) {
        // Never waits: a full socket buffer drops, as the network would.
        let _ = self.socket.try_send_to(frame, self.to);
    }
}

/// A bound socket not read yet: datagrams that arrive wait in the
/// kernel's buffer until [`UdpBound::serve`] (a node binds first, so a
/// taken port stops it at once, and reads once its scripts are running).
pub struct UdpBound {
    socket: UdpSocket,
    local: SocketAddr,
}

impl UdpBound {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<UdpBound> {
        let socket = UdpSocket::bind(addr).await?;
        let local = socket.local_addr()?;
        Ok(UdpBound { socket, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Feed the bridge from the socket; the receiving task.
    pub fn serve(self, bridge: Bridge) -> JoinHandle<()> {
        let socket = Arc::new(self.socket);
        tracing::info!(local = %self.local, "device bridge listening on UDP");
        receive(bridge, socket)
    }
}

fn receive(bridge: Bridge, socket: Arc<UdpSocket>) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Datagrams larger than the bridge's frame size are read whole
        // (and refused by length), never split.
        let mut buf = vec![0u8; 65_536];
        let mut peers: HashMap<SocketAddr, Peer> = HashMap::new();
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from a device that went away surface here
                    // on some systems: not fatal.
                    tracing::debug!("device bridge UDP receive: {e}");
                    continue;
                }
            };
            if peers.len() > 4096 {
                peers.clear();
            }
            let peer = peers.entry(from).or_insert_with(|| Peer {
                transport: "udp",
                address: from.to_string().into(),
                tx: Arc::new(UdpTx {
                    socket: socket.clone(),
                    to: from,
                }),
            });
            bridge.receive(peer, &buf[..n]);
        }
    })
}
