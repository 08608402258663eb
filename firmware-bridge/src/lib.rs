//! Firmware bridge: microcontrollers (ESP8266/ESP32 on Wi-Fi, Arduinos on
//! a serial port) on the Covey bus.
//!
//! Module map (data path: device → transport → [`Bridge`] → [`Bus`] (the
//! host's router); router → [`Bridge`] → transport → device):
//!
//! - [`proto`] — the frame format of `PROTOCOL.md`: encode, decode, tags.
//! - [`serial_codec`] — frames on a byte stream: COBS, CRC-32, delimiter.
//! - [`session`] — one device's session: nonce, replay window, rate.
//! - [`bridge`] — sessions by address, the handshake, dispatch to the bus,
//!   commands and calls to devices, expiry, status.
//! - [`udp`], [`serial`] — the transports feeding the bridge.
//! - [`mqtt`] — the node on an MQTT broker: events both ways, commands in,
//!   a retained status with a last will.
//!
//! This crate knows nothing of wasm or the cluster: the host implements
//! [`Bus`] over its router and device registry.

pub mod bridge;
pub mod mqtt;
pub mod proto;
pub mod seal;
pub mod serial;
pub mod serial_codec;
pub mod session;
mod tls;
pub mod udp;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use bridge::{Bridge, BridgeConfig, WeakBridge};
pub use session::Peer;

/// What the bridge needs of the node it runs in.
pub trait Bus: Send + Sync + 'static {
    /// This node's name: devices are addressed as `NODE/DEVICE`.
    fn node(&self) -> &str;
    /// The node's payload limit.
    fn max_payload(&self) -> usize;
    /// The device's key, if it is registered (and not removed).
    fn key(&self, device: &str) -> Option<[u8; proto::KEY_LEN]>;
    /// Must the device's sessions be sealed ([`seal`])? A hello that does
    /// not offer sealing is then refused.
    fn seal_required(&self, _device: &str) -> bool {
        false
    }
    /// A session started: make `NODE/DEVICE` reachable.
    fn attach(&self, device: &str);
    /// Its session ended: its subscriptions go.
    fn detach(&self, device: &str);
    /// Subscribe the device to events matching the esc patterns; the
    /// router's id for the subscription.
    fn subscribe(&self, device: &str, from: &str, name: &str) -> Result<u64, BusError>;
    fn unsubscribe(&self, device: &str, id: u64);
    /// An event from the device, to every node.
    fn emit(&self, device: &str, name: &str, payload: Vec<u8>) -> Result<(), BusError>;
    /// A command from the device to `target` (a node, `*`, `NODE/DEVICE`).
    fn command(
        &self,
        device: &str,
        target: &str,
        name: &str,
        payload: Vec<u8>,
    ) -> Result<(), BusError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("payload over the node's limit of {0} bytes")]
    TooLarge(usize),
    #[error("refused: {0}")]
    Refused(String),
    #[error("failed: {0}")]
    Failed(String),
}

/// Sends frames to one device's address. Never blocks: a full queue drops.
pub trait Transmit: Send + Sync + 'static {
    fn send(&self, frame: &[u8]);
}

/// Why a command or call to a device failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device `{0}` is not attached to this node")]
    NotAttached(String),
    #[error("the message does not fit the device's frame size ({0} bytes)")]
    TooLarge(usize),
    #[error("the device answered with an error: {0}")]
    Failed(String),
    #[error("the device went away: {0}")]
    Gone(String),
    #[error("the device did not answer in time")]
    Timeout,
}

/// One attached device, as `covey status` shows it. Never holds its key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    pub name: String,
    pub transport: String,
    pub address: String,
    pub since_ms: u64,
    pub last_seen_ms: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub subscriptions: usize,
    /// The session's frames are sealed (encrypted), not only tagged.
    #[serde(default)]
    pub sealed: bool,
    /// Frames refused, by reason (see `proto::Reject::name`).
    pub errors: BTreeMap<String, u64>,
}

/// The bridge as `covey status` shows it.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeStatus {
    pub devices: Vec<DeviceStatus>,
    /// Refused frames that no device's session could be charged with
    /// (unknown devices, bad tags without a session, line noise).
    pub errors: BTreeMap<String, u64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
