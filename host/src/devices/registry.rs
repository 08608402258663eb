//! The device registry: which microcontrollers may attach, with their
//! keys, in an Automerge document replicated to every node (so a device
//! that moves to another node's Wi-Fi or serial port is accepted there).
//!
//! Layout: one root key per device, its name, holding one `Bytes` scalar:
//! `key (32) | added_ms (u64 BE) | node that added it (UTF-8)`. One scalar
//! per device, so a concurrent add and remove resolve as a whole, the same
//! way on every node. Each node also keeps the devices attached to it
//! under `\0attached\0NODE` (JSON; written by that node only, at most every
//! few seconds), so `covey status` anywhere shows every node's devices; a
//! NUL never starts a device name, so the two kinds cannot collide. What peers send is checked on every read: an entry
//! whose name is not a device name, or whose record is short, does not
//! exist.

use std::sync::Arc;

use anyhow::{Result, bail};
use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc, ScalarValue, Value, sync};
use covey_firmware_bridge::proto::{KEY_LEN, valid_device_name};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::docstore::DocStore;
use crate::docsync::{Received, SyncTarget};

/// A device attached to some node, as that node last reported it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AttachedDevice {
    pub name: String,
    pub transport: String,
    pub address: String,
    pub since_ms: u64,
}

const ATTACHED_PREFIX: &str = "\0attached\0";
/// `\0sealed\0NAME`: the device must seal its sessions. A key of its own
/// (not in the device's record), so nodes of an older version read the
/// record as before.
const SEALED_PREFIX: &str = "\0sealed\0";

/// The key holding `name`'s sealing policy.
fn policy_key(name: &str) -> String {
    format!("{SEALED_PREFIX}{name}")
}
/// Bounds on what a peer's report may hold.
const MAX_REPORT_BYTES: usize = 64 * 1024;
const MAX_REPORT_DEVICES: usize = 256;

/// A registered device, as `covey device list` shows it. No key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DeviceEntry {
    pub name: String,
    pub added_ms: u64,
    pub added_on: String,
    /// Its sessions must be sealed (devices added before sealing existed,
    /// or with `--no-seal`, may also use tagged frames in clear).
    #[serde(default)]
    pub sealed: bool,
}

pub struct DeviceRegistry {
    store: Arc<DocStore>,
    node: String,
}

struct Record<'a> {
    key: [u8; KEY_LEN],
    added_ms: u64,
    added_on: &'a str,
}

fn parse(bytes: &[u8]) -> Option<Record<'_>> {
    if bytes.len() < KEY_LEN + 8 {
        return None;
    }
    let (key, rest) = bytes.split_at(KEY_LEN);
    let (ms, node) = rest.split_at(8);
    Some(Record {
        key: key.try_into().ok()?,
        added_ms: u64::from_be_bytes(ms.try_into().ok()?),
        added_on: std::str::from_utf8(node).ok()?,
    })
}

impl DeviceRegistry {
    pub fn open(store: Arc<DocStore>, node: &str) -> Arc<Self> {
        Arc::new(DeviceRegistry {
            store,
            node: node.to_string(),
        })
    }

    pub fn store(&self) -> &Arc<DocStore> {
        &self.store
    }

    fn record<R>(&self, name: &str, f: impl FnOnce(Option<Record<'_>>) -> R) -> R {
        self.store.read(|doc| match doc.get(ROOT, name) {
            Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
                ScalarValue::Bytes(b) => f(parse(b)),
                _ => f(None),
            },
            _ => f(None),
        })
    }

    /// Register `name` with a new random key, its sessions sealed; the
    /// key, to show once.
    pub fn add(&self, name: &str) -> Result<[u8; KEY_LEN]> {
        self.add_with(name, true)
    }

    /// Register `name`; `sealed`: its sessions must be sealed (otherwise
    /// tagged frames in clear are taken too, for firmware that cannot seal).
    pub fn add_with(&self, name: &str, sealed: bool) -> Result<[u8; KEY_LEN]> {
        if !valid_device_name(name) {
            bail!(
                "invalid device name {name:?}: use 1-63 letters, digits, '-', '_' or '.' (not first)"
            );
        }
        if self.record(name, |r| r.is_some()) {
            bail!("device `{name}` already exists (`covey device remove {name}` first)");
        }
        let key: [u8; KEY_LEN] = crate::random::bytes();
        let mut rec = key.to_vec();
        rec.extend_from_slice(&now_ms().to_be_bytes());
        rec.extend_from_slice(self.node.as_bytes());
        let policy = policy_key(name);
        self.store.write(|doc| {
            doc.put(ROOT, name, ScalarValue::Bytes(rec))?;
            match sealed {
                true => doc.put(ROOT, policy.as_str(), true),
                false => doc.delete(ROOT, policy.as_str()),
            }
        })?;
        Ok(key)
    }

    /// Unregister `name`; false if it was not registered.
    pub fn remove(&self, name: &str) -> Result<bool> {
        if !self
            .store
            .read(|doc| doc.get(ROOT, name).ok().flatten().is_some())
        {
            return Ok(false);
        }
        let policy = policy_key(name);
        self.store.write(|doc| {
            doc.delete(ROOT, name)?;
            doc.delete(ROOT, policy.as_str())
        })?;
        Ok(true)
    }

    /// Must `name`'s sessions be sealed?
    pub fn sealed(&self, name: &str) -> bool {
        let policy = policy_key(name);
        self.store
            .read(|doc| doc.get(ROOT, policy.as_str()).ok().flatten().is_some())
    }

    /// The key of a registered device.
    pub fn key(&self, name: &str) -> Option<[u8; KEY_LEN]> {
        if !valid_device_name(name) {
            return None;
        }
        self.record(name, |r| r.map(|r| r.key))
    }

    pub fn list(&self) -> Vec<DeviceEntry> {
        self.store.read(|doc| {
            doc.map_range(ROOT, ..)
                .filter(|item| valid_device_name(&item.key))
                .filter_map(|item| {
                    let (Value::Scalar(s), _) = doc.get(ROOT, item.key.as_ref()).ok()?? else {
                        return None;
                    };
                    let ScalarValue::Bytes(b) = s.as_ref() else {
                        return None;
                    };
                    let r = parse(b)?;
                    let policy = policy_key(&item.key);
                    Some(DeviceEntry {
                        name: item.key.to_string(),
                        added_ms: r.added_ms,
                        added_on: r.added_on.to_string(),
                        sealed: doc.get(ROOT, policy.as_str()).ok().flatten().is_some(),
                    })
                })
                .collect()
        })
    }

    /// Record the devices attached to this node (if the list changed).
    pub fn set_attached(&self, list: &[AttachedDevice]) -> Result<()> {
        let key = format!("{ATTACHED_PREFIX}{}", self.node);
        let text = serde_json::to_string(list)?;
        let same = self.store.read(|doc| match doc.get(ROOT, key.as_str()) {
            Ok(Some((Value::Scalar(s), _))) => s.as_str() == Some(text.as_str()),
            _ => list.is_empty(),
        });
        if !same {
            self.store
                .write(|doc| doc.put(ROOT, key.as_str(), text.as_str()))?;
        }
        Ok(())
    }

    /// Every node's last report of its attached devices (this node's
    /// included). Malformed or oversized reports from peers are skipped.
    pub fn attached(&self) -> std::collections::BTreeMap<String, Vec<AttachedDevice>> {
        self.store.read(|doc| {
            doc.map_range(ROOT, ATTACHED_PREFIX.to_string()..)
                .take_while(|item| item.key.starts_with(ATTACHED_PREFIX))
                .filter_map(|item| {
                    let node = item.key.strip_prefix(ATTACHED_PREFIX)?.to_string();
                    let (Value::Scalar(s), _) = doc.get(ROOT, item.key.as_ref()).ok()?? else {
                        return None;
                    };
                    let text = s.as_str().filter(|t| t.len() <= MAX_REPORT_BYTES)?;
                    let list: Vec<AttachedDevice> = serde_json::from_str(text).ok()?;
                    (list.len() <= MAX_REPORT_DEVICES).then_some((node, list))
                })
                .collect()
        })
    }

    /// Changes whenever the registry does (here or by sync).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.store.watch_version()
    }
}

impl SyncTarget for DeviceRegistry {
    fn generate(&self, state: &mut sync::State) -> Option<Vec<u8>> {
        self.store.sync_generate(state)
    }

    fn receive(&self, state: &mut sync::State, msg: &[u8]) -> Result<Received> {
        self.store.sync_receive(state, msg, |_, _| ())?;
        Ok(Received::Applied)
    }

    fn version(&self) -> watch::Receiver<u64> {
        self.store.watch_version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Arc<DeviceRegistry> {
        DeviceRegistry::open(Arc::new(DocStore::open(None, "devices").unwrap()), "n1")
    }

    #[test]
    fn add_list_key_remove() {
        let r = registry();
        let k = r.add("esp-1").unwrap();
        assert_eq!(r.key("esp-1"), Some(k));
        assert!(
            r.add("esp-1").is_err(),
            "a second add of one name is refused"
        );
        assert!(r.add("../x").is_err());
        let list = r.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "esp-1");
        assert_eq!(list[0].added_on, "n1");
        assert!(r.remove("esp-1").unwrap());
        assert!(!r.remove("esp-1").unwrap());
        assert_eq!(r.key("esp-1"), None);
    }

    #[test]
    fn attached_reports_round_trip_and_hostile_ones_are_skipped() {
        let r = registry();
        let d = AttachedDevice {
            name: "esp-1".into(),
            transport: "udp".into(),
            address: "10.0.0.5:4000".into(),
            since_ms: 1,
        };
        r.set_attached(std::slice::from_ref(&d)).unwrap();
        assert_eq!(r.attached()["n1"], vec![d]);
        let heads = r.store.heads();
        r.set_attached(&r.attached()["n1"].clone()).unwrap();
        assert_eq!(r.store.heads(), heads, "an unchanged list is not rewritten");
        r.store
            .write(|doc| {
                doc.put(ROOT, "\0attached\0n2", "not json")?;
                doc.put(ROOT, "\0attached\0n3", "x".repeat(70_000))
            })
            .unwrap();
        assert_eq!(r.attached().len(), 1);
        assert!(r.list().is_empty(), "reports are not devices");
    }

    #[test]
    fn hostile_entries_from_peers_do_not_exist() {
        let r = registry();
        r.store
            .write(|doc| {
                doc.put(ROOT, "short", ScalarValue::Bytes(vec![1; 10]))?;
                doc.put(ROOT, "a/b", ScalarValue::Bytes(vec![1; 50]))?;
                doc.put(ROOT, "text", "not bytes")
            })
            .unwrap();
        assert_eq!(r.key("short"), None);
        assert_eq!(r.key("a/b"), None);
        assert_eq!(r.key("text"), None);
        assert!(r.list().is_empty());
    }
}
