//! Devices: the firmware bridge (`covey-firmware-bridge`) wired into this
//! node, beside the cluster as the router's other peer.
//!
//! Data paths: device → transport → bridge → [`RouterBus`] → router →
//! instance (and cluster); instance → router → [`BridgeDevices`] → bridge
//! → device. A device's subscriptions live in the router under the id
//! `device:NAME` (no script path has a `:`), so esc patterns mean the same
//! for devices as for scripts; a small task per device forwards what they
//! match to the bridge.
//!
//! - [`registry`] — the replicated registry of device names and keys.
//! - [`cli`] — `covey device add|list|remove`.
//! - `mqtt` — the node on an MQTT broker (events both ways, commands in).

pub mod cli;
mod mqtt;
pub mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use covey_firmware_bridge::mqtt::MqttConfig;
use covey_firmware_bridge::serial::SerialPort;
use covey_firmware_bridge::{Bridge, BridgeConfig, Bus, BusError, DeviceError, WeakBridge};
use tokio::task::JoinHandle;

use self::registry::DeviceRegistry;
use crate::bindings::{CallError, SendError};
use crate::docstore::DocStore;
use crate::lifecycle;
use crate::pattern::Pattern;
use crate::router::{CallFuture, Delivery, Devices, Message, Router, SubKind};

/// Where the bridge listens; both off by default.
#[derive(Clone, Debug, Default)]
pub struct BridgeSettings {
    pub udp: Option<SocketAddr>,
    pub serial: Vec<SerialPort>,
    /// Frames per second one device may send (its burst is a tenth).
    pub rate: Option<u32>,
    /// An MQTT broker to bridge to.
    pub mqtt: Option<MqttConfig>,
}

/// The config file's bridge keys.
pub struct FileBridge {
    pub udp: Option<SocketAddr>,
    pub serial: Vec<String>,
    pub rate: Option<u32>,
    pub mqtt: Option<String>,
    pub mqtt_username: Option<String>,
    pub mqtt_password: Option<String>,
    pub mqtt_prefix: Option<String>,
    /// PEM files for `mqtts://`: a private CA, a client certificate and key.
    pub mqtt_tls: covey_firmware_bridge::mqtt::TlsFiles,
}

impl BridgeSettings {
    /// Flags and environment (`args`) over the config file.
    pub fn resolve(args: &crate::config::RunArgs, file: FileBridge) -> Result<Self> {
        let serial = match args.bridge_serial.is_empty() {
            true => &file.serial,
            false => &args.bridge_serial,
        };
        let mqtt = match args.mqtt.clone().or(file.mqtt) {
            None => None,
            Some(url) => {
                let mut m = MqttConfig::parse_with(&url, &file.mqtt_tls)
                    .map_err(|e| anyhow::anyhow!("mqtt: {e}"))?;
                (m.username, m.password) = (file.mqtt_username, file.mqtt_password);
                m.prefix = file.mqtt_prefix.unwrap_or(m.prefix);
                Some(m)
            }
        };
        Ok(BridgeSettings {
            udp: args.bridge_udp.or(file.udp),
            serial: (serial.iter().map(|s| s.parse()))
                .collect::<Result<_, String>>()
                .map_err(|e| anyhow::anyhow!("bridge_serial: {e}"))?,
            rate: file.rate.filter(|r| *r > 0),
            mqtt,
        })
    }
}

/// Events queued for one device before the bridge sends them.
const DEVICE_MAILBOX: usize = 256;

/// The bridge as the router's peer, the registry, and their tasks.
pub struct DeviceService {
    pub registry: Arc<DeviceRegistry>,
    pub bridge: Bridge,
    /// The bound UDP address, when the bridge listens on UDP.
    pub udp: Option<SocketAddr>,
    mqtt: Option<covey_firmware_bridge::mqtt::Mqtt>,
    tasks: Vec<JoinHandle<()>>,
    /// The transports, until [`DeviceService::open_transports`].
    closed: Option<Transports>,
}

/// Transports configured but not yet read from: the UDP socket is bound
/// (a taken port stops the node at once; datagrams wait in its buffer).
struct Transports {
    udp: Option<covey_firmware_bridge::udp::UdpBound>,
    serial: Vec<covey_firmware_bridge::serial::SerialPort>,
    mqtt: Option<MqttConfig>,
}

impl DeviceService {
    /// Open the registry, connect the bridge to the router, and bind the
    /// configured transports; devices are heard from once
    /// [`DeviceService::open_transports`] is called (after the scripts
    /// that subscribe to them have started).
    pub async fn start(
        router: Arc<Router>,
        store: Arc<DocStore>,
        settings: &BridgeSettings,
    ) -> Result<DeviceService> {
        let registry = DeviceRegistry::open(store.clone(), router.node_name());
        let bus = Arc::new(RouterBus {
            router: router.clone(),
            registry: registry.clone(),
            bridge: OnceLock::new(),
            forwarders: Mutex::new(HashMap::new()),
        });
        let mut cfg = BridgeConfig::default();
        if let Some(rate) = settings.rate {
            cfg.rate = rate;
            cfg.burst = (rate / 10).max(10);
        }
        let bridge = Bridge::new(cfg, bus.clone());
        let _ = bus.bridge.set(bridge.downgrade());
        router.set_devices(Arc::new(BridgeDevices {
            bridge: bridge.clone(),
            registry: registry.clone(),
        }));
        let mut tasks = vec![bridge.spawn_sweeper(), store.spawn_flusher()];
        // A device removed (here or on a peer) is cut off at once.
        let mut version = registry.watch();
        let b = bridge.clone();
        tasks.push(tokio::spawn(async move {
            while version.changed().await.is_ok() {
                b.refresh_keys();
            }
        }));
        tasks.push(report_attached(bridge.clone(), registry.clone()));
        let mut udp = None;
        if let Some(addr) = settings.udp {
            let bound = covey_firmware_bridge::udp::UdpBound::bind(addr)
                .await
                .with_context(|| format!("binding the device bridge to UDP {addr}"))?;
            udp = Some(bound);
        }
        Ok(DeviceService {
            registry,
            bridge,
            udp: udp.as_ref().map(|u| u.local_addr()),
            mqtt: None,
            tasks,
            closed: Some(Transports {
                udp,
                serial: settings.serial.clone(),
                mqtt: settings.mqtt.clone(),
            }),
        })
    }

    /// Start reading from devices (once; later calls do nothing).
    pub fn open_transports(&mut self, router: &Arc<Router>) {
        let Some(t) = self.closed.take() else {
            return;
        };
        if let Some(udp) = t.udp {
            self.tasks.push(udp.serve(self.bridge.clone()));
        }
        for port in t.serial {
            let bridge = self.bridge.clone();
            self.tasks
                .push(covey_firmware_bridge::serial::serve(bridge, port));
        }
        if let Some(cfg) = t.mqtt {
            let (m, tasks) = mqtt::start(cfg, router.clone(), self.registry.clone());
            self.mqtt = Some(m);
            self.tasks.extend(tasks);
        }
    }

    /// Stop the transports; the registry is flushed to disk.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(m) = self.mqtt.take() {
            // `offline` (retained) before the connection goes; the event
            // loop task sends it.
            m.stop().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        // Stopped cleanly: no device is attached here any more.
        self.registry.set_attached(&[])?;
        let store = self.registry.store().clone();
        tokio::task::spawn_blocking(move || store.flush()).await??;
        Ok(())
    }
}

/// How often this node's list of attached devices is compared with what
/// the registry says and rewritten if it changed.
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// Keep this node's entry of attached devices in the registry current, so
/// `covey status` on every node lists every node's devices.
fn report_attached(bridge: Bridge, registry: Arc<DeviceRegistry>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        loop {
            tick.tick().await;
            let list: Vec<registry::AttachedDevice> = (bridge.status().devices.into_iter())
                .map(|d| registry::AttachedDevice {
                    name: d.name,
                    transport: d.transport,
                    address: d.address,
                    since_ms: d.since_ms,
                })
                .collect();
            if let Err(e) = registry.set_attached(&list) {
                tracing::warn!("recording attached devices: {e:#}");
            }
        }
    })
}

/// The router's id for a device's subscriptions.
fn router_id(device: &str) -> Arc<str> {
    format!("device:{device}").into()
}

/// The router and registry as the bridge sees them.
struct RouterBus {
    router: Arc<Router>,
    registry: Arc<DeviceRegistry>,
    /// Weak: the bridge holds this bus.
    bridge: OnceLock<WeakBridge>,
    forwarders: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Bus for RouterBus {
    fn node(&self) -> &str {
        self.router.node_name()
    }

    fn max_payload(&self) -> usize {
        self.router.max_payload()
    }

    fn key(&self, device: &str) -> Option<[u8; 32]> {
        self.registry.key(device)
    }

    fn seal_required(&self, device: &str) -> bool {
        self.registry.sealed(device)
    }

    fn attach(&self, device: &str) {
        let (tx, mut rx) = crate::router::mailbox(DEVICE_MAILBOX);
        self.router.register(router_id(device), tx);
        let bridge = self.bridge.get().expect("bridge set at start").clone();
        let name = device.to_string();
        let task = tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let Some(bridge) = bridge.upgrade() else {
                    break;
                };
                if let Delivery::Event { msg, .. } = d {
                    bridge.event(&name, &msg.from, &msg.name, &msg.payload);
                }
            }
        });
        if let Some(old) = self
            .forwarders
            .lock()
            .unwrap()
            .insert(device.to_string(), task)
        {
            old.abort();
        }
        self.announce(lifecycle::DEVICE_ATTACHED, device);
    }

    fn detach(&self, device: &str) {
        self.router.unregister(&router_id(device));
        if let Some(t) = self.forwarders.lock().unwrap().remove(device) {
            t.abort();
            self.announce(lifecycle::DEVICE_DETACHED, device);
        }
    }

    fn subscribe(&self, device: &str, from: &str, name: &str) -> Result<u64, BusError> {
        let kind = SubKind::Event {
            from: Pattern::new(from),
            name: Pattern::new(name),
        };
        match self.router.subscribe(&router_id(device), 0, kind) {
            0 => Err(BusError::Failed("device not attached".into())),
            id => Ok(id),
        }
    }

    fn unsubscribe(&self, device: &str, id: u64) {
        self.router.unsubscribe(&router_id(device), id);
    }

    fn emit(&self, device: &str, name: &str, payload: Vec<u8>) -> Result<(), BusError> {
        self.router
            .emit_from(Some(device), name, payload)
            .map(|_| ())
            .map_err(bus_error)
    }

    fn command(
        &self,
        device: &str,
        target: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError> {
        self.router
            .send_command_from(Some(device), target, name, payload)
            .map(|_| ())
            .map_err(bus_error)
    }
}

impl RouterBus {
    /// `covey.device.attached` / `detached`, to every node.
    fn announce(&self, name: &str, device: &str) {
        let event = lifecycle::DeviceEvent {
            node: self.router.node_name().to_string(),
            device: device.to_string(),
            since_ms: crate::clock::now_ms(),
        };
        self.router.emit_system(name, lifecycle::payload(&event));
    }
}

fn bus_error(e: SendError) -> BusError {
    match e {
        SendError::PayloadTooLarge(n) => BusError::TooLarge(n as usize),
        SendError::UnknownNode(t) => BusError::Failed(format!("unknown node `{t}`")),
        SendError::NodeDown(t) => BusError::Failed(format!("node `{t}` is down")),
        SendError::ReservedName(n) => BusError::Failed(crate::lifecycle::reserved_refusal(&n)),
    }
}

/// The bridge as the router sees it.
struct BridgeDevices {
    bridge: Bridge,
    registry: Arc<DeviceRegistry>,
}

/// A device that is not attached here: down if it is registered (it may
/// come back), unknown if not. Asked only when a send or call failed.
fn registered(registry: &DeviceRegistry, device: &str) -> bool {
    registry.key(device).is_some()
}

impl Devices for BridgeDevices {
    fn command(&self, device: &str, msg: &Message) -> Result<(), SendError> {
        match self
            .bridge
            .command(device, &msg.from, &msg.name, &msg.payload)
        {
            Ok(()) => Ok(()),
            Err(DeviceError::TooLarge(n)) => Err(SendError::PayloadTooLarge(n as u64)),
            Err(_) if registered(&self.registry, device) => {
                Err(SendError::NodeDown(msg.to.to_string()))
            }
            Err(_) => Err(SendError::UnknownNode(msg.to.to_string())),
        }
    }

    fn call(&self, device: &str, msg: Message, timeout: Duration) -> CallFuture {
        let bridge = self.bridge.clone();
        let registry = self.registry.clone();
        let device = device.to_string();
        Box::pin(async move {
            let result = bridge
                .call(&device, &msg.from, &msg.name, &msg.payload, timeout)
                .await;
            result.map_err(|e| match e {
                DeviceError::TooLarge(n) => CallError::PayloadTooLarge(n as u64),
                DeviceError::Failed(text) => CallError::HandlerFailed(text),
                DeviceError::Timeout => CallError::Timeout,
                DeviceError::Gone(why) => CallError::NodeDown(format!("{}: {why}", msg.to)),
                DeviceError::NotAttached(_) if registered(&registry, &device) => {
                    CallError::NodeDown(msg.to.to_string())
                }
                DeviceError::NotAttached(_) => CallError::UnknownNode(msg.to.to_string()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> FileBridge {
        FileBridge {
            udp: Some("0.0.0.0:7468".parse().unwrap()),
            serial: vec!["/dev/ttyACM0@9600".into(), "/dev/ttyUSB0".into()],
            rate: Some(500),
            mqtt: Some("mqtt://broker.lan".into()),
            mqtt_username: Some("u".into()),
            mqtt_password: Some("p".into()),
            mqtt_prefix: Some("home".into()),
            mqtt_tls: Default::default(),
        }
    }

    #[test]
    fn bridge_settings_from_the_file_and_flags() {
        let args = crate::config::RunArgs::default();
        let s = BridgeSettings::resolve(&args, file()).unwrap();
        assert_eq!(s.udp.unwrap().port(), 7468);
        assert_eq!((s.serial[0].baud, s.serial[1].baud), (9600, 115_200));
        assert_eq!(s.rate, Some(500));
        let m = s.mqtt.unwrap();
        assert_eq!(
            (m.host.as_str(), m.port, m.prefix.as_str()),
            ("broker.lan", 1883, "home")
        );
        assert_eq!(m.username.as_deref(), Some("u"));
        // Flags win.
        let args = crate::config::RunArgs {
            bridge_serial: vec!["/dev/ttyS1@57600".into()],
            ..Default::default()
        };
        let s = BridgeSettings::resolve(&args, file()).unwrap();
        assert_eq!(s.serial.len(), 1);
    }

    #[test]
    fn bad_bridge_settings_are_clear_errors() {
        let args = crate::config::RunArgs::default();
        let mut f = file();
        f.serial = vec!["/dev/tty@fast".into()];
        let e = BridgeSettings::resolve(&args, f).unwrap_err().to_string();
        assert!(e.contains("bridge_serial") && e.contains("baud"), "{e}");
        let mut f = file();
        f.mqtt = Some("http://x".into());
        let e = BridgeSettings::resolve(&args, f).unwrap_err().to_string();
        assert!(e.contains("mqtt://"), "{e}");
        // TLS files on a plain broker, a CA that is not there, half a
        // client identity.
        let mut f = file();
        f.mqtt_tls.ca = Some("/nonexistent/ca.pem".into());
        let e = BridgeSettings::resolve(&args, f).unwrap_err().to_string();
        assert!(e.contains("need an mqtts:// broker"), "{e}");
        let mut f = file();
        f.mqtt = Some("mqtts://broker.lan".into());
        f.mqtt_tls.ca = Some("/nonexistent/ca.pem".into());
        let e = BridgeSettings::resolve(&args, f).unwrap_err().to_string();
        assert!(e.contains("mqtt_ca /nonexistent/ca.pem"), "{e}");
        let mut f = file();
        f.mqtt = Some("mqtts://broker.lan".into());
        f.mqtt_tls.cert = Some("/x.pem".into());
        let e = BridgeSettings::resolve(&args, f).unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
    }
}
