//! The bridge's session rules, driven frame by frame: the handshake,
//! replays, rate limits, refusals, moves and revocation. The bus here
//! records what reached it (the host's router is exercised by the host's
//! integration tests, with the C simulator as the device).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use covey_firmware_bridge::proto::{self, Body, Dir, FLAG_ACK, KEY_LEN, NONCE_LEN};
use covey_firmware_bridge::{Bridge, BridgeConfig, Bus, BusError, DeviceError, Peer, Transmit};

#[derive(Default)]
struct TestBus {
    keys: Mutex<HashMap<String, [u8; KEY_LEN]>>,
    emitted: Mutex<Vec<(String, String, Vec<u8>)>>,
    attached: Mutex<Vec<String>>,
    subs: Mutex<Vec<(String, String, String)>>,
}

impl Bus for TestBus {
    fn node(&self) -> &str {
        "n1"
    }
    fn max_payload(&self) -> usize {
        1000
    }
    fn key(&self, device: &str) -> Option<[u8; KEY_LEN]> {
        self.keys.lock().unwrap().get(device).copied()
    }
    fn attach(&self, device: &str) {
        self.attached.lock().unwrap().push(device.to_string());
    }
    fn detach(&self, device: &str) {
        self.attached.lock().unwrap().retain(|d| d != device);
    }
    fn subscribe(&self, device: &str, from: &str, name: &str) -> Result<u64, BusError> {
        let mut subs = self.subs.lock().unwrap();
        subs.push((device.into(), from.into(), name.into()));
        Ok(subs.len() as u64)
    }
    fn unsubscribe(&self, _device: &str, id: u64) {
        self.subs.lock().unwrap()[id as usize - 1].0 = "-".into();
    }
    fn emit(&self, device: &str, name: &str, payload: Vec<u8>) -> Result<(), BusError> {
        if payload.len() > 1000 {
            return Err(BusError::TooLarge(1000));
        }
        self.emitted
            .lock()
            .unwrap()
            .push((device.into(), name.into(), payload));
        Ok(())
    }
    fn command(&self, _: &str, _: &str, _: &str, _: Vec<u8>) -> Result<(), BusError> {
        Err(BusError::Failed("unknown node".into()))
    }
}

/// What the bridge sent to one address.
#[derive(Default)]
struct Wire(Mutex<Vec<Vec<u8>>>);

impl Transmit for Wire {
    fn send(&self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

impl Wire {
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// A device speaking the protocol by hand.
struct Dev {
    name: &'static str,
    key: ring::hmac::Key,
    nonce: [u8; NONCE_LEN],
    seq: u32,
    wire: Arc<Wire>,
    peer: Peer,
}

impl Dev {
    fn new(bus: &TestBus, name: &'static str, address: &str) -> Dev {
        let raw = [name.len() as u8; KEY_LEN];
        bus.keys.lock().unwrap().insert(name.into(), raw);
        let wire = Arc::new(Wire::default());
        Dev {
            name,
            key: proto::key(&raw),
            nonce: [0; NONCE_LEN],
            seq: 0,
            peer: Peer {
                transport: "test",
                address: address.into(),
                tx: wire.clone(),
            },
            wire,
        }
    }

    fn hello_frame(&self) -> Vec<u8> {
        let hello = Body::Hello {
            client_nonce: [5; 8],
            max_frame: 512,
            ping_interval_s: 1,
            name: self.name,
            features: 0,
        };
        proto::encode(&self.key, Dir::DeviceToBridge, &[0; 8], 0, 0, &hello)
    }

    /// Hello, welcome, and a first frame (a ping) to confirm the session.
    fn connect(&mut self, bridge: &Bridge) {
        bridge.receive(&self.peer, &self.hello_frame());
        let welcome = self.wire.take().pop().expect("a welcome");
        let Body::Welcome { session_nonce, .. } = proto::body(&welcome).unwrap() else {
            panic!("not a welcome");
        };
        assert!(proto::verify(
            &self.key,
            Dir::BridgeToDevice,
            &session_nonce,
            &welcome
        ));
        self.nonce = session_nonce;
        self.seq = 0;
        self.send(bridge, 0, &Body::Ping);
        assert_eq!(self.kinds(), vec![proto::T_PONG]);
    }

    fn frame(&mut self, flags: u8, body: &Body<'_>) -> Vec<u8> {
        self.seq += 1;
        proto::encode(
            &self.key,
            Dir::DeviceToBridge,
            &self.nonce,
            flags,
            self.seq,
            body,
        )
    }

    fn send(&mut self, bridge: &Bridge, flags: u8, body: &Body<'_>) {
        let f = self.frame(flags, body);
        bridge.receive(&self.peer, &f);
    }

    fn kinds(&self) -> Vec<u8> {
        self.wire.take().iter().map(|f| f[1]).collect()
    }

    /// Ack statuses received, in order.
    fn acks(&self) -> Vec<u8> {
        self.wire
            .take()
            .iter()
            .filter_map(|f| match proto::body(f) {
                Ok(Body::Ack { status, .. }) => Some(status),
                _ => None,
            })
            .collect()
    }
}

fn event(name: &str) -> Body<'_> {
    Body::Event {
        from: "",
        name,
        payload: b"1",
    }
}

fn setup(cfg: BridgeConfig) -> (Arc<TestBus>, Bridge) {
    let bus = Arc::new(TestBus::default());
    let bridge = Bridge::new(cfg, bus.clone());
    (bus, bridge)
}

fn errors(bridge: &Bridge, device: Option<&str>) -> HashMap<String, u64> {
    let st = bridge.status();
    let m = match device {
        Some(d) => st.devices.into_iter().find(|x| x.name == d).unwrap().errors,
        None => st.errors,
    };
    m.into_iter().collect()
}

#[test]
fn handshake_event_qos1_and_replays() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    assert_eq!(*bus.attached.lock().unwrap(), vec!["esp-1"]);
    let f = d.frame(FLAG_ACK, &event("temp"));
    bridge.receive(&d.peer, &f);
    assert_eq!(d.acks(), vec![0]);
    // The same frame again (a retry whose ack was lost): acked, not redone.
    bridge.receive(&d.peer, &f);
    assert_eq!(d.acks(), vec![0]);
    assert_eq!(bus.emitted.lock().unwrap().len(), 1);
    assert_eq!(errors(&bridge, Some("esp-1"))["replay"], 1);
    // A frame of this session, tagged for another: refused.
    d.nonce[0] ^= 1;
    d.send(&bridge, 0, &event("x"));
    d.nonce[0] ^= 1;
    assert_eq!(errors(&bridge, Some("esp-1"))["bad-tag"], 1);
    assert_eq!(bus.emitted.lock().unwrap().len(), 1);
}

#[test]
fn unknown_devices_bad_keys_and_junk_are_counted_not_answered() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let d = Dev::new(&bus, "esp-1", "a:1");
    bus.keys.lock().unwrap().clear();
    bridge.receive(&d.peer, &d.hello_frame());
    assert!(d.wire.take().is_empty(), "no answer to an unknown device");
    bus.keys
        .lock()
        .unwrap()
        .insert("esp-1".into(), [9; KEY_LEN]);
    bridge.receive(&d.peer, &d.hello_frame());
    assert!(d.wire.take().is_empty(), "no answer to a wrong key");
    bridge.receive(&d.peer, &[1, 2, 3]);
    bridge.receive(&d.peer, &vec![1u8; 5000]);
    let e = errors(&bridge, None);
    assert_eq!(
        (
            e["unknown-device"],
            e["bad-tag"],
            e["truncated"],
            e["oversized"]
        ),
        (1, 1, 1, 1)
    );
    assert!(bus.attached.lock().unwrap().is_empty());
}

#[test]
fn a_replayed_hello_does_not_disturb_the_live_session() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    std::thread::sleep(Duration::from_millis(30));
    bridge.receive(&d.peer, &d.hello_frame());
    assert_eq!(d.kinds(), vec![proto::T_WELCOME]);
    // The old session still works.
    d.send(&bridge, FLAG_ACK, &event("still"));
    assert_eq!(d.acks(), vec![0]);
    assert_eq!(bus.emitted.lock().unwrap().len(), 1);
}

#[test]
fn frames_without_a_session_get_a_reset_and_a_new_hello_recovers() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    // The bridge restarts: a new one knows nothing of the session.
    let (_, bridge2) = (
        bus.clone(),
        Bridge::new(BridgeConfig::default(), bus.clone()),
    );
    d.send(&bridge2, FLAG_ACK, &event("lost"));
    assert_eq!(d.kinds(), vec![proto::T_RESET]);
    d.send(&bridge2, 0, &event("lost"));
    assert!(
        d.wire.take().is_empty(),
        "resets are rate-limited per address"
    );
    std::thread::sleep(Duration::from_millis(30));
    d.connect(&bridge2);
    d.send(&bridge2, FLAG_ACK, &event("back"));
    assert_eq!(d.acks(), vec![0]);
    assert_eq!(errors(&bridge2, None)["no-session"], 2);
}

#[test]
fn a_flooding_device_is_rate_limited_and_qos1_frames_are_told_to_retry() {
    let cfg = BridgeConfig {
        rate: 10,
        burst: 5,
        ..BridgeConfig::default()
    };
    let (bus, bridge) = setup(cfg);
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge); // the ping takes one token
    for _ in 0..10 {
        d.send(&bridge, FLAG_ACK, &event("flood"));
    }
    let acks = d.acks();
    assert_eq!(acks.iter().filter(|s| **s == 0).count(), 4);
    assert_eq!(acks.iter().filter(|s| **s == 3).count(), 6);
    assert_eq!(bus.emitted.lock().unwrap().len(), 4);
    assert_eq!(errors(&bridge, Some("esp-1"))["rate-limited"], 6);
    // Another device is not affected.
    let mut e = Dev::new(&bus, "esp-2", "b:1");
    e.connect(&bridge);
    e.send(&bridge, FLAG_ACK, &event("fine"));
    assert_eq!(e.acks(), vec![0]);
}

#[test]
fn oversized_payloads_and_bad_bodies_are_nacked() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    d.send(
        &bridge,
        FLAG_ACK,
        &Body::Event {
            from: "",
            name: "big",
            payload: &[0; 480],
        },
    );
    assert_eq!(d.acks(), vec![0]);
    // Over the negotiated 512-byte frame.
    d.send(
        &bridge,
        FLAG_ACK,
        &Body::Event {
            from: "",
            name: "huge",
            payload: &[0; 600],
        },
    );
    assert!(d.acks().is_empty());
    assert_eq!(errors(&bridge, Some("esp-1"))["oversized"], 1);
    // A device may not claim a sender.
    d.send(
        &bridge,
        FLAG_ACK,
        &Body::Event {
            from: "n2",
            name: "forged",
            payload: b"",
        },
    );
    assert_eq!(d.acks(), vec![1]);
    // A type the bridge never takes from a device.
    d.send(&bridge, 0, &Body::Pong);
    assert_eq!(errors(&bridge, Some("esp-1"))["wrong-direction"], 1);
}

#[test]
fn a_device_that_moves_leaves_its_old_address_and_subscriptions() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    d.send(
        &bridge,
        FLAG_ACK,
        &Body::Subscribe {
            from: "*",
            name: "led.*",
        },
    );
    assert_eq!(d.acks(), vec![0]);
    let mut moved = Dev::new(&bus, "esp-1", "a:2");
    moved.connect(&bridge);
    let st = bridge.status();
    assert_eq!(st.devices.len(), 1);
    assert_eq!(st.devices[0].address, "a:2");
    assert_eq!(
        bus.subs.lock().unwrap()[0].0,
        "-",
        "old subscription removed"
    );
    // The old address's session is gone.
    d.send(&bridge, 0, &event("old"));
    assert_eq!(d.kinds(), vec![proto::T_RESET]);
}

#[tokio::test]
async fn calls_reach_the_device_and_fail_when_it_is_revoked() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge);
    let b = bridge.clone();
    let call = tokio::spawn(async move {
        b.call("esp-1", "n1", "read", b"x", Duration::from_secs(5))
            .await
    });
    let frame = loop {
        if let Some(f) = d.wire.take().pop() {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let Ok(Body::Call { call_id, name, .. }) = proto::body(&frame) else {
        panic!("not a call")
    };
    assert_eq!(name, "read");
    d.send(
        &bridge,
        0,
        &Body::Reply {
            call_id,
            ok: true,
            payload: b"42",
        },
    );
    assert_eq!(call.await.unwrap(), Ok(b"42".to_vec()));
    // A call in flight when the device is removed fails at once.
    let b = bridge.clone();
    let call = tokio::spawn(async move {
        b.call("esp-1", "n1", "read", b"", Duration::from_secs(30))
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    bus.keys.lock().unwrap().clear();
    bridge.refresh_keys();
    assert!(matches!(call.await.unwrap(), Err(DeviceError::Gone(_))));
    assert!(!bridge.attached("esp-1"));
    assert!(matches!(
        bridge.command("esp-1", "n1", "x", b""),
        Err(DeviceError::NotAttached(_))
    ));
}

#[tokio::test]
async fn a_silent_device_is_expired_and_loses_its_subscriptions() {
    let (bus, bridge) = setup(BridgeConfig::default());
    let _sweeper = bridge.spawn_sweeper();
    let mut d = Dev::new(&bus, "esp-1", "a:1");
    d.connect(&bridge); // announces a 1 s ping interval: expired after 3 s
    d.send(
        &bridge,
        FLAG_ACK,
        &Body::Subscribe {
            from: "*",
            name: "t",
        },
    );
    assert_eq!(d.acks(), vec![0]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while bridge.attached("esp-1") {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bus.subs.lock().unwrap()[0].0, "-", "subscription removed");
    assert!(bus.attached.lock().unwrap().is_empty());
}
