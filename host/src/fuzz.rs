//! Fuzz targets: what a peer, a config file or a script can hand the host,
//! with the properties that must hold for any input. Shared by the
//! cargo-fuzz crate (`host/fuzz`, nightly, coverage-guided) and the corpus
//! replay test (`host/tests/fuzz_replay.rs`, stable, every CI run), so a
//! crash found once stays a regression test.
//!
//! Targets: `frame` (cluster links), `manifest`, `sync_message`, `config`,
//! `wit_boundary`, `device_frame` (the firmware bridge's decoders).
//!
//! A target panics only when a property fails (or the code under test
//! panics, which is the bug being looked for); every input is otherwise
//! "fine".

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT, ScalarValue, sync};

use crate::cluster::frame::{FrameError, FrameReader};
use crate::docsync::SyncTarget;
use crate::kvdoc::{KvDoc, KvLimits};
use crate::router::Router;
use crate::scriptdir::{ScriptDir, ScriptPath, name_part};
use crate::scriptsync::manifest::{self, Entry};

/// Poll a future that never waits (it reads from a byte slice).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("reading from a slice never waits"),
    }
}

/// Cluster frames off a link: any bytes decode to frames or a clean error;
/// a decoded frame re-encodes to a frame that decodes to itself.
pub fn frame(data: &[u8]) {
    let mut reader = FrameReader::new(data, 1 << 20);
    loop {
        match ready(reader.next()) {
            Ok(f) => {
                let again = f.encode();
                let mut r = FrameReader::new(&again[..], 1 << 20);
                assert_eq!(ready(r.next()).expect("re-encoded frame decodes"), f);
            }
            Err(FrameError::Closed | FrameError::Io(_)) => return,
            Err(FrameError::Decode(_) | FrameError::TooLarge(..)) => return,
        }
    }
}

/// Manifest entries as a hostile peer could write them: `data` is split
/// into (path, origin, contents) records by NUL-free separators. Whatever
/// the entries, every path the manifest accepts is inside the scripts
/// directory, a write there lands inside it (a symlink to outside is
/// planted), and the conflict-copy name part is one plain name.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut doc = AutoCommit::new();
    for record in text.split('\u{1e}').take(16) {
        let mut fields = record.splitn(3, '\u{1f}');
        let path = fields.next().unwrap_or_default();
        let origin = fields.next().unwrap_or_default();
        let contents = fields.next().unwrap_or_default().as_bytes();
        let entry = Entry {
            hash: crate::scriptsync::blobs::hash(contents),
            size: contents.len() as u64,
            origin: origin.to_string(),
            deleted: contents.is_empty(),
        };
        manifest::put(&mut doc, path, &entry).expect("put");
        // Some values that are not entries at all.
        if origin == "raw" {
            doc.put(ROOT, path, ScalarValue::Bytes(contents.to_vec()))
                .expect("put");
        }
        let part = name_part(origin);
        assert!(!part.is_empty() && !part.starts_with('.'), "{part:?}");
        assert!(
            part.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{part:?}"
        );
    }
    let m = manifest::all(&doc);
    let sandbox = sandbox();
    for (path, (winner, _)) in &m.entries {
        assert_inside(path);
        let _guard = sandbox.lock.lock().unwrap();
        if sandbox.dir.write(path, &winner.hash[..4]).is_ok() {
            let _ = sandbox.dir.remove(path);
        }
        assert!(
            std::fs::read_dir(&sandbox.outside)
                .unwrap()
                .next()
                .is_none(),
            "{path} wrote outside the scripts directory"
        );
    }
    // Arbitrary text through the rule directly.
    if let Ok(p) = ScriptPath::parse(&text) {
        assert_inside(&p);
    }
}

fn assert_inside(path: &ScriptPath) {
    let joined = Path::new("/scripts").join(path.as_str());
    assert!(joined.starts_with("/scripts/"), "{path}");
    for c in Path::new(path.as_str()).components() {
        let Component::Normal(name) = c else {
            panic!("{path}: {c:?}");
        };
        let name = name.to_string_lossy();
        assert!(!crate::scriptdir::is_ignored_name(&name), "{path}");
    }
}

struct Sandbox {
    _tmp: PathBuf,
    dir: ScriptDir,
    outside: PathBuf,
    lock: Mutex<()>,
}

/// A scripts directory with a symlink `link` to a directory beside it.
fn sandbox() -> &'static Sandbox {
    static S: OnceLock<Sandbox> = OnceLock::new();
    S.get_or_init(|| {
        // Memory-backed where there is one: the writes are fsynced.
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let tmp = base.join(format!("covey-fuzz-{}", std::process::id()));
        let root = tmp.join("scripts");
        let outside = tmp.join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let _ = std::os::unix::fs::symlink(&outside, root.join("link"));
        Sandbox {
            dir: ScriptDir::new(&root),
            _tmp: tmp,
            outside,
            lock: Mutex::new(()),
        }
    })
}

/// A peer's sync message for the key-value store: merged or refused with
/// an error, never a panic; afterwards the store still reads, writes and
/// generates messages.
pub fn sync_message(data: &[u8]) {
    let kv = KvDoc::open(
        None,
        KvLimits::default(),
        Arc::new(Router::new("fuzz", 1 << 20)),
    )
    .expect("in-memory store");
    kv.set("existing", b"value").unwrap();
    let mut state = sync::State::new();
    // As it came (the epoch envelope's parser), and as an Automerge
    // message of epoch 0 (the merge behind it).
    let _ = kv.receive(&mut state, data);
    let _ = kv.receive(&mut state, &crate::kvdoc::epoch_zero_message(data));
    let _ = kv.keys("");
    kv.set("after", b"still works").unwrap();
    assert_eq!(kv.get("after").as_deref(), Some(&b"still works"[..]));
    let _ = kv.generate(&mut state);
}

/// A config file: parsed and resolved, or a clean error.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("covey-fuzz-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{:?}.yaml", std::thread::current().id()).replace(['(', ')'], ""));
    std::fs::write(&path, text).unwrap();
    let args = crate::config::RunArgs {
        config: Some(path),
        ..Default::default()
    };
    let _ = crate::config::NodeConfig::resolve(&args);
}

/// Seeds for `frame`: one frame of each kind.
pub fn frame_seeds() -> Vec<Vec<u8>> {
    use crate::cluster::frame::{DocId, Frame, Hello, PeerAddr, WireCallError, WireMessage};
    use std::borrow::Cow;
    let msg = crate::router::Message {
        id: 1,
        from: "a".into(),
        to: "*".into(),
        name: "temp".into(),
        payload: bytes::Bytes::from_static(b"21.5"),
        timestamp_ms: 2,
    };
    let frames = [
        Frame::Hello(Hello {
            proto: 1,
            cluster: "0123456789abcdef".into(),
            node: "a".into(),
            incarnation: 3,
            listen_port: 7466,
            version: "0.1.0".into(),
        }),
        Frame::Event(WireMessage::borrow(&msg)),
        Frame::Command(WireMessage::borrow(&msg)),
        Frame::Call {
            call: 4,
            timeout_ms: 100,
            msg: WireMessage::borrow(&msg),
        },
        Frame::Reply {
            call: 4,
            result: Ok(Cow::Borrowed(b"ok")),
        },
        Frame::Reply {
            call: 5,
            result: Err(WireCallError::NoHandler("x".into())),
        },
        Frame::Peers(vec![PeerAddr {
            node: "b".into(),
            addr: "[::1]:7466".parse().unwrap(),
        }]),
        Frame::Sync {
            doc: DocId::Scripts,
            msg: Cow::Borrowed(b"\x42\x00"),
        },
    ];
    frames.iter().map(|f| f.encode().to_vec()).collect()
}

/// Seeds for `sync_message`: real messages from a store with keys and
/// counters, first and later rounds.
pub fn sync_seeds() -> Vec<Vec<u8>> {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "k", ScalarValue::Bytes(b"v".to_vec()))
        .unwrap();
    doc.put(ROOT, "\0c\0n\0a", ScalarValue::Int(3)).unwrap();
    let mut other = AutoCommit::new();
    let (mut s1, mut s2) = (sync::State::new(), sync::State::new());
    let mut out = Vec::new();
    use automerge::sync::SyncDoc;
    for _ in 0..4 {
        if let Some(m) = doc.sync().generate_sync_message(&mut s1) {
            let bytes = m.encode();
            out.push(bytes.clone());
            let _ = other
                .sync()
                .receive_sync_message(&mut s2, sync::Message::decode(&bytes).unwrap());
        }
        if let Some(m) = other.sync().generate_sync_message(&mut s2) {
            let bytes = m.encode();
            let _ = doc
                .sync()
                .receive_sync_message(&mut s1, sync::Message::decode(&bytes).unwrap());
        }
    }
    out
}

/// The script that turns fuzz input into host calls: each op byte picks a
/// call (emit, command, call, every KV function, subscribe, watch, timer,
/// log), the following bytes its arguments (names and payloads of any
/// bytes, not always UTF-8).
const FUZZ_LUA: &str = r#"
covey.handle("*", "fuzz.run", function(msg)
  local p, i, n = msg.payload, 1, 0
  local function byte() local b = p:byte(i) or 0; i = i + 1; return b end
  local function str() local len = byte() % 40; local s = p:sub(i, i + len - 1); i = i + len; return s end
  while i <= #p and n < 64 do
    n = n + 1
    local op = byte() % 13
    pcall(function()
      if op == 0 then covey.emit(str(), str())
      elseif op == 1 then covey.command(str(), str(), str())
      elseif op == 2 then covey.call(str(), str(), str(), byte())
      elseif op == 3 then covey.kv.set(str(), str())
      elseif op == 4 then covey.kv.get(str())
      elseif op == 5 then covey.kv.delete(str())
      elseif op == 6 then covey.kv.incr(str(), byte() - 128)
      elseif op == 7 then covey.kv.keys(str())
      elseif op == 8 then covey.on(str(), str(), function() end)
      elseif op == 9 then covey.kv.watch(str(), function() end)
      elseif op == 10 then covey.after(byte(), function() end)
      elseif op == 11 then covey.log.info(str())
      else covey.handle(str(), str(), function(m) return m.payload end)
      end
    end)
  end
  return "ran " .. n
end)
"#;

struct Boundary {
    rt: tokio::runtime::Runtime,
    node: crate::Node,
}

/// The WIT boundary from a guest: random names and payloads through
/// events, calls, KV, subscriptions and timers of a Lua script. The host
/// survives every input: another script still answers afterwards.
pub fn wit_boundary(data: &[u8]) {
    static B: OnceLock<Boundary> = OnceLock::new();
    let b = B.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("covey-fuzz-wit-{}", std::process::id()));
        let scripts = dir.join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        std::fs::write(scripts.join("fuzz.lua"), FUZZ_LUA).unwrap();
        std::fs::write(
            scripts.join("alive.lua"),
            "covey.handle('*', 'alive', function(m) return m.payload end)\n",
        )
        .unwrap();
        let mut cfg = crate::NodeConfig::new("fuzz", scripts, dir.join("data"));
        cfg.watch = false;
        cfg.log = "off".into();
        let node = rt.block_on(crate::Node::start(cfg)).unwrap();
        Boundary { rt, node }
    });
    let router = b.node.router().clone();
    b.rt.block_on(async move {
        let t = std::time::Duration::from_secs(10);
        let _ = router
            .call(None, "fuzz", "fuzz.run", data.to_vec(), t)
            .await;
        let alive = router.call(None, "fuzz", "alive", b"ok".to_vec(), t).await;
        assert_eq!(
            alive.as_deref(),
            Ok(&b"ok"[..]),
            "the host stopped answering"
        );
    });
}

/// What a device (or anyone on its network or serial line) can send the
/// firmware bridge. `data` is read three ways: as a serial byte stream
/// (COBS, CRC, bounded buffer), as one UDP datagram into a live bridge
/// with a connected device, and, re-tagged with that device's session
/// key, as a frame whose body the bridge parses and acts on. Properties:
/// no panic; a body that parses re-encodes to the same bytes; the bridge
/// stays usable (the device's next ping is answered).
pub fn device_frame(data: &[u8]) {
    use covey_firmware_bridge::proto::{self, Body, Dir};
    use covey_firmware_bridge::serial_codec::{Decoder, Unframed};

    let mut decoder = Decoder::new(512);
    decoder.push(data, |item| {
        if let Unframed::Frame(f) = item
            && proto::header(&f, 4096).is_ok()
        {
            let _ = proto::body(&f);
        }
    });
    if let Ok(h) = proto::header(data, 4096)
        && let Ok(body) = proto::body(data)
    {
        let key = proto::key(&[0; proto::KEY_LEN]);
        let again = proto::encode(&key, Dir::DeviceToBridge, &[0; 8], h.flags, h.seq, &body);
        let n = data.len() - proto::TAG_LEN;
        assert_eq!(
            &again[..n],
            &data[..n],
            "a parsed body re-encodes to itself"
        );
    }
    let mut device = fuzz_device::Device::connect();
    device.receive_raw(data);
    device.receive_tagged(data);
    device.send(&Body::Ping);
    assert!(
        device.got(proto::T_PONG),
        "the bridge still answers its device"
    );
}

mod fuzz_device {
    //! A bridge with one connected device, for `device_frame`.

    use std::sync::{Arc, Mutex};

    use covey_firmware_bridge::proto::{self, Body, Dir, KEY_LEN};
    use covey_firmware_bridge::{Bridge, BridgeConfig, Bus, BusError, Peer, Transmit};

    struct NullBus;

    impl Bus for NullBus {
        fn node(&self) -> &str {
            "n1"
        }
        fn max_payload(&self) -> usize {
            1 << 20
        }
        fn key(&self, device: &str) -> Option<[u8; KEY_LEN]> {
            (device == "esp-1").then_some([1; KEY_LEN])
        }
        fn attach(&self, _: &str) {}
        fn detach(&self, _: &str) {}
        fn subscribe(&self, _: &str, _: &str, _: &str) -> Result<u64, BusError> {
            Ok(1)
        }
        fn unsubscribe(&self, _: &str, _: u64) {}
        fn emit(&self, _: &str, _: &str, _: Vec<u8>) -> Result<(), BusError> {
            Ok(())
        }
        fn command(&self, _: &str, _: &str, _: &str, _: Vec<u8>) -> Result<(), BusError> {
            Err(BusError::Failed("no such node".into()))
        }
    }

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);

    impl Transmit for Wire {
        fn send(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    pub struct Device {
        bridge: Bridge,
        peer: Peer,
        wire: Arc<Wire>,
        key: ring::hmac::Key,
        nonce: [u8; 8],
        seq: u32,
    }

    impl Device {
        pub fn connect() -> Device {
            let wire = Arc::new(Wire::default());
            let peer = Peer {
                transport: "fuzz",
                address: "fuzz".into(),
                tx: wire.clone(),
            };
            let bridge = Bridge::new(BridgeConfig::default(), Arc::new(NullBus));
            let key = proto::key(&[1; KEY_LEN]);
            let hello = Body::Hello {
                client_nonce: [0; 8],
                max_frame: 4096,
                ping_interval_s: 10,
                name: "esp-1",
                features: 0,
            };
            bridge.receive(
                &peer,
                &proto::encode(&key, Dir::DeviceToBridge, &[0; 8], 0, 0, &hello),
            );
            let welcome = wire.0.lock().unwrap().pop().expect("welcome");
            let Ok(Body::Welcome { session_nonce, .. }) = proto::body(&welcome) else {
                panic!("no welcome");
            };
            let mut d = Device {
                bridge,
                peer,
                wire,
                key,
                nonce: session_nonce,
                seq: 0,
            };
            d.send(&Body::Ping);
            assert!(d.got(proto::T_PONG));
            d
        }

        pub fn send(&mut self, body: &Body<'_>) {
            self.seq += 1;
            let f = proto::encode(
                &self.key,
                Dir::DeviceToBridge,
                &self.nonce,
                0,
                self.seq,
                body,
            );
            self.bridge.receive(&self.peer, &f);
        }

        pub fn receive_raw(&self, data: &[u8]) {
            self.bridge.receive(&self.peer, data);
        }

        /// `data` with a valid tag of this session (and a fresh sequence
        /// number when the header is intact): reaches the body parser.
        pub fn receive_tagged(&mut self, data: &[u8]) {
            if data.len() < proto::MIN_FRAME || data[1] == proto::T_HELLO {
                return;
            }
            let mut f = data.to_vec();
            self.seq += 1;
            f[3..7].copy_from_slice(&self.seq.to_be_bytes());
            let n = f.len() - proto::TAG_LEN;
            let mut ctx = ring::hmac::Context::with_key(&self.key);
            ctx.update(b"D");
            ctx.update(&self.nonce);
            ctx.update(&f[..n]);
            let tag = ctx.sign();
            f[n..].copy_from_slice(&tag.as_ref()[..proto::TAG_LEN]);
            self.bridge.receive(&self.peer, &f);
        }

        pub fn got(&self, kind: u8) -> bool {
            self.wire.0.lock().unwrap().drain(..).any(|f| f[1] == kind)
        }
    }
}

/// Seeds for `device_frame`: one frame of each type, and a serial line.
pub fn device_seeds() -> Vec<Vec<u8>> {
    use covey_firmware_bridge::proto::{self, Body, Dir, FLAG_ACK};
    let key = proto::key(&[1; proto::KEY_LEN]);
    let bodies = [
        Body::Hello {
            client_nonce: [1; 8],
            max_frame: 512,
            ping_interval_s: 10,
            name: "esp-1",
            features: 0,
        },
        Body::Subscribe {
            from: "*",
            name: "led.*",
        },
        Body::Unsubscribe {
            from: "*",
            name: "led.*",
        },
        Body::Event {
            from: "",
            name: "temp",
            payload: b"21.5",
        },
        Body::Command {
            peer: "n1/esp-2",
            name: "blink",
            payload: b"3",
        },
        Body::Reply {
            call_id: 1,
            ok: true,
            payload: b"42",
        },
        Body::Ack { seq: 3, status: 0 },
        Body::Ping,
    ];
    let mut out: Vec<Vec<u8>> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| proto::encode(&key, Dir::DeviceToBridge, &[2; 8], FLAG_ACK, i as u32, b))
        .collect();
    let line: Vec<u8> = out
        .iter()
        .flat_map(|f| covey_firmware_bridge::serial_codec::encode(f))
        .collect();
    out.push(line);
    out
}
