//! The MQTT side of the bridge wired to this node: every event seen here
//! goes to the MQTT connection (which publishes those that started here),
//! and what comes from the broker enters the router.

use std::sync::Arc;

use covey_firmware_bridge::mqtt::{Mqtt, MqttBus, MqttConfig};
use tokio::task::JoinHandle;

use super::registry::DeviceRegistry;
use crate::pattern::Pattern;
use crate::router::{Delivery, PeerStatus, Router, SubKind};

/// The router's id for the MQTT bridge's subscription.
const ROUTER_ID: &str = "mqtt:";
/// Events queued for the broker before some are dropped.
const MAILBOX: usize = 4096;

struct NodeBus {
    router: Arc<Router>,
    registry: Arc<DeviceRegistry>,
}

impl MqttBus for NodeBus {
    fn node(&self) -> &str {
        self.router.node_name()
    }

    fn max_payload(&self) -> usize {
        self.router.max_payload()
    }

    fn is_node(&self, name: &str) -> bool {
        name == self.router.node_name()
            || self
                .router
                .remote()
                .is_some_and(|r| r.peer(name) != PeerStatus::Unknown)
    }

    fn is_device(&self, name: &str) -> bool {
        self.registry.key(name).is_some()
    }

    fn emit(&self, source: &str, name: &str, payload: Vec<u8>) {
        if let Err(e) = self.router.emit_from(Some(source), name, payload) {
            tracing::debug!("MQTT event not taken: {e:?}");
        }
    }

    fn command(&self, name: &str, payload: Vec<u8>) {
        let node = self.router.node_name().to_string();
        if let Err(e) = self.router.send_command(&node, name, payload) {
            tracing::debug!("MQTT command not taken: {e:?}");
        }
    }
}

/// Connect to the broker and start forwarding; the MQTT handle and the
/// tasks to stop.
pub fn start(
    cfg: MqttConfig,
    router: Arc<Router>,
    registry: Arc<DeviceRegistry>,
) -> (Mqtt, Vec<JoinHandle<()>>) {
    let bus = Arc::new(NodeBus {
        router: router.clone(),
        registry,
    });
    let (mqtt, task) = Mqtt::start(cfg, bus.clone());
    let (tx, mut rx) = crate::router::mailbox(MAILBOX);
    router.register(ROUTER_ID.into(), tx);
    let all = SubKind::Event {
        from: Pattern::new("*"),
        name: Pattern::new("*"),
    };
    router.subscribe(ROUTER_ID, 0, all);
    let m = mqtt.clone();
    let forward = tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if let Delivery::Event { msg, .. } = d {
                m.event(&*bus, &msg.from, &msg.name, &msg.payload);
            }
        }
    });
    (mqtt, vec![task, forward])
}
