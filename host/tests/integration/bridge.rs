//! Microcontrollers on the bus: the `covey-device` simulator (the C
//! library devices run) against real nodes, over UDP on loopback and over
//! a serial line (a `socat` pty pair), in a two-node cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use covey::bindings::CallError;
use covey::cluster::credentials::ClusterToken;

use crate::cluster::{addr, join, wait_up};
use crate::common::{TestNode, eventually};
use crate::lua::load;

#[path = "../support/device.rs"]
pub(crate) mod device;
use device::{Device, run};

/// Counts `temp` events by sender, answers `ask` by calling the device
/// named in the payload, and commands it on `go`.
const WATCHER: &str = r#"
covey.on("*", "temp", function(msg)
  -- Per node: scripts sync runs this on every node of the cluster.
  covey.kv.incr("temp/" .. self() .. "/" .. msg.from)
  covey.kv.set("last/" .. msg.from, msg.payload)
end)
covey.handle("*", "ask", function(msg)
  local reply, err = covey.call(msg.payload, "read", "x", 2000)
  return reply or ("err:" .. tostring(err))
end)
covey.handle("*", "go", function(msg)
  covey.command(msg.payload, "blink", "led3")
  return "ok"
end)
-- System events: devices coming and going on any node's bridge.
for _, kind in ipairs({ "attached", "detached" }) do
  covey["on_device_" .. kind](function(info)
    covey.kv.set("device/" .. self() .. "/" .. info.node .. "/" .. info.device, kind)
  end)
end
"#;

/// Nodes `a` (the bridge on UDP, on loopback) and `b`, linked; `b` runs
/// the watcher script. Device `esp-1` is registered on `a`.
async fn pair() -> (TestNode, TestNode, SocketAddr, String) {
    let token = ClusterToken::generate();
    let a = join("a", &token, &[], &[], |c| {
        c.bridge.udp = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let b = join("b", &token, &[addr(&a)], &[], |_| {}).await;
    wait_up(&[&a, &b]).await;
    load(&b, "watcher.lua", WATCHER).await;
    let key = a.node().devices().registry.add("esp-1").unwrap();
    let udp = a.node().devices().udp.unwrap();
    (a, b, udp, covey::files::hex(&key))
}

/// Wait until `device`'s session on `t` is confirmed (the device's first
/// frame after the welcome arrived).
async fn attached(t: &TestNode, device: &str) {
    eventually(10, &format!("{device} attached"), || async {
        t.node().devices().bridge.attached(device)
    })
    .await;
}

fn udp_args<'a>(udp: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--udp", udp, "--name", "esp-1", "--wait-ms", "3000"];
    v.extend_from_slice(rest);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_udp_talks_with_scripts_on_another_node() {
    let (a, b, udp, key) = pair().await;
    let udp = udp.to_string();
    // An acked event reaches the script on the other node, from a/esp-1.
    let (ok, out) = run(
        &key,
        &udp_args(&udp, &["--qos", "1", "emit", "temp", "21.5"]),
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("acked 1/1"), "{out}");
    eventually(10, "b's script saw the event", || async {
        b.kv_string("last/a/esp-1").as_deref() == Some("21.5")
    })
    .await;

    // A listening device: events it subscribed to, commands and calls
    // from a script on the other node.
    let mut dev = Device::spawn(&key, &udp_args(&udp, &["listen", "led.*"]));
    assert_eq!(dev.expect("connected", 10).await, "connected a");
    // b's script heard of it (`covey.device.attached`, from a).
    eventually(10, "b saw esp-1 attach on a", || async {
        b.kv_string("device/b/a/esp-1").as_deref() == Some("attached")
    })
    .await;
    let mut seen = false;
    for _ in 0..100 {
        // Until the subscription is in place.
        b.node().router().emit("led.on", b"1".to_vec()).unwrap();
        if tokio::time::timeout(Duration::from_millis(100), dev.expect("event", 1))
            .await
            .is_ok()
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the device never received its subscribed event");
    b.node().router().emit("other", b"1".to_vec()).unwrap();
    b.node().router().emit("led.off", b"2".to_vec()).unwrap();
    assert_eq!(dev.expect("event", 5).await, "event b led.off 2");

    // Every node's status lists the devices of every node.
    eventually(20, "b's status lists a's device", || async {
        let s = covey::control::fetch_status(&b.data).await.unwrap();
        s.other_devices
            .get("a")
            .is_some_and(|l| l.iter().any(|d| d.name == "esp-1" && d.transport == "udp"))
    })
    .await;

    assert_eq!(b.call("go", "a/esp-1").await.unwrap(), "ok");
    assert_eq!(dev.expect("command", 5).await, "command b blink led3");
    assert_eq!(b.call("ask", "a/esp-1").await.unwrap(), "x");
    assert_eq!(dev.expect("call", 5).await, "call b read x");
    // Locally too, and an error reply is the handler's failure.
    let r = a
        .node()
        .router()
        .call(None, "a/esp-1", "fail", vec![], Duration::from_secs(2))
        .await;
    assert_eq!(r, Err(CallError::HandlerFailed("asked to fail".into())));

    let status = covey::control::fetch_status(&a.data).await.unwrap();
    let d = &status.devices.devices[0];
    assert_eq!((d.name.as_str(), d.transport.as_str()), ("esp-1", "udp"));
    assert!(d.frames_in >= 3 && d.frames_out >= 3, "{d:?}");
    assert_eq!(status.bridge_udp, Some(udp.clone()));
    let text = covey::control::render(&status);
    assert!(text.contains("esp-1") && !text.contains(&key), "{text}");

    // Unknown names and devices get clear errors.
    let r = b
        .node()
        .router()
        .call(None, "a/nope", "read", vec![], Duration::from_secs(1))
        .await;
    assert_eq!(r, Err(CallError::UnknownNode("a/nope".into())));
    // The device vanishes mid-call: the caller times out.
    dev.kill().await;
    let r = b.call("ask", "a/esp-1").await.unwrap();
    assert_eq!(r, "err:timeout", "{r}");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_unknown_and_removed_devices_are_refused_everywhere() {
    let (a, b, udp, key) = pair().await;
    let udp = udp.to_string();
    let wrong = "00".repeat(32);
    let (ok, out) = run(&wrong, &udp_args(&udp, &["emit", "temp", "1"])).await;
    assert!(!ok && out.contains("no welcome"), "{out}");
    let (ok, _) = run(
        &key,
        &[
            "--udp",
            &udp,
            "--name",
            "ghost",
            "--wait-ms",
            "1500",
            "emit",
            "t",
            "1",
        ],
    )
    .await;
    assert!(!ok);
    let errors = a.node().devices().bridge.status().errors;
    assert!(
        errors["bad-tag"] >= 1 && errors["unknown-device"] >= 1,
        "{errors:?}"
    );

    // The registry replicates: b knows the device and its key.
    eventually(10, "registry replicated", || async {
        b.node().devices().registry.key("esp-1").is_some()
    })
    .await;
    // Removal cuts a live session off and is refused on every node.
    let mut dev = Device::spawn(&key, &udp_args(&udp, &["serve"]));
    dev.expect("connected", 10).await;
    attached(&a, "esp-1").await;
    eventually(10, "b's script heard it attach", || async {
        b.kv_string("device/b/a/esp-1").as_deref() == Some("attached")
    })
    .await;
    b.node().devices().registry.remove("esp-1").unwrap();
    eventually(10, "a ends it, b hears", || async {
        !a.node().devices().bridge.attached("esp-1")
            && b.kv_string("device/b/a/esp-1").as_deref() == Some("detached")
    })
    .await;
    let (ok, _) = run(&key, &udp_args(&udp, &["emit", "temp", "1"])).await;
    assert!(!ok, "a removed device is refused");
    dev.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_events_survive_loss_exactly_once() {
    let (_a, b, udp, key) = pair().await;
    let udp = udp.to_string();
    // A fifth of the device's frames, each way, are lost.
    // The handshake suffers the loss too: allow it many hellos.
    let args = [
        "--udp",
        &udp,
        "--name",
        "esp-1",
        "--wait-ms",
        "60000",
        "--qos",
        "1",
        "--drop",
        "20",
        "--count",
        "40",
        "emit",
        "temp",
        "x",
    ];
    let (ok, out) = run(&key, &args).await;
    assert!(ok, "{out}");
    assert!(out.contains("acked 40/40"), "{out}");
    eventually(10, "every event counted", || async {
        b.kv_i64("temp/b/a/esp-1") == 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.kv_i64("temp/b/a/esp-1"), 40, "no event twice");
}

/// A `socat` pty pair in `dir`: (the node's end, the device's end).
async fn pty_pair(dir: &Path) -> (tokio::process::Child, PathBuf, PathBuf) {
    let (node, dev) = (dir.join("tty-node"), dir.join("tty-dev"));
    let child = tokio::process::Command::new("socat")
        // ignoreeof: either end may close and reopen (a node restart, a
        // board reset) without ending the pair.
        .arg(format!("pty,raw,echo=0,ignoreeof,link={}", node.display()))
        .arg(format!("pty,raw,echo=0,ignoreeof,link={}", dev.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("socat (Debian package `socat`)");
    for _ in 0..500 {
        if node.exists() && dev.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (child, node, dev)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_on_a_serial_line_survives_resets_noise_and_a_node_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_socat, tty_node, tty_dev) = pty_pair(dir.path()).await;
    let port = format!("{}@115200", tty_node.display());
    let mut a = crate::common::start_named("a", &[], |c| {
        c.bridge.serial = vec![port.parse().unwrap()];
    })
    .await;
    load(&a, "watcher.lua", WATCHER).await;
    let key = covey::files::hex(&a.node().devices().registry.add("uno").unwrap());
    let serial = format!("{}@115200", tty_dev.display());
    let args = |rest: &[&'static str]| {
        let mut v = vec![
            "--serial".to_string(),
            serial.clone(),
            "--name".into(),
            "uno".into(),
        ];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let spawn = |rest: &[&'static str]| {
        let v = args(rest);
        Device::spawn(&key, &v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut dev = spawn(&["--ping", "1", "serve"]);
    assert_eq!(dev.expect("connected", 10).await, "connected a");
    attached(&a, "uno").await;
    assert_eq!(a.call("ask", "a/uno").await.unwrap(), "x");

    // Line noise: counted, and the line keeps working.
    std::fs::write(
        &tty_dev,
        [0x55u8; 300]
            .iter()
            .chain(&[0, 7, 7, 0])
            .copied()
            .collect::<Vec<_>>(),
    )
    .unwrap();
    eventually(10, "noise counted", || async {
        let e = a.node().devices().bridge.status().errors;
        e.get("crc").copied().unwrap_or(0) + e.get("framing").copied().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(a.call("ask", "a/uno").await.unwrap(), "x");

    // The board resets (a new process on the same line): a new session.
    dev.kill().await;
    let mut dev = spawn(&["--ping", "1", "serve"]);
    dev.expect("connected", 10).await;
    eventually(10, "the new session is live", || async {
        a.call_timeout("ask", "a/uno", Duration::from_secs(3))
            .await
            .as_deref()
            == Ok("x")
    })
    .await;
    assert_eq!(a.call("ask", "a/uno").await.unwrap(), "x");

    // The node restarts under a running device: the device hears a reset
    // at its next ping and says hello again, by itself.
    let cfg = {
        let mut c = a.config();
        c.bridge.serial = vec![port.parse().unwrap()];
        c
    };
    a.restart(cfg).await;
    dev.expect("connected", 20).await;
    eventually(10, "calls work after the restart", || async {
        a.call_timeout("ask", "a/uno", Duration::from_secs(3))
            .await
            .as_deref()
            == Ok("x")
    })
    .await;

    // QoS 1 events over the line.
    dev.kill().await;
    let (ok, out) = run(
        &key,
        &args(&["--qos", "1", "--count", "5", "emit", "temp", "t"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(ok, "{out}");
    eventually(10, "events counted", || async {
        a.kv_i64("temp/a/a/uno") == 5
    })
    .await;
}

/// A device that talks as soon as the node starts is not talking to
/// nobody: the bridge is heard from only once the scripts have started.
/// The witness script takes a while in `init` before it subscribes (as a
/// script loading a large table would); the device, already waiting when
/// the node starts, emits at once when welcomed, fire-and-forget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_events_sent_while_the_node_starts_reach_its_scripts() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let udp: SocketAddr = ([127, 0, 0, 1], port).into();
    let with_bridge = |c: &mut covey::config::NodeConfig| {
        c.bridge.udp = Some(udp);
        c.limits.cpu_budget = Duration::from_secs(30);
    };
    let mut t = crate::common::start_with(&[], with_bridge).await;
    let key = covey::files::hex(&t.node().devices().registry.add("esp-1").unwrap());
    let slow = r#"
local t0 = os.clock()
while os.clock() - t0 < 2 do end
covey.on("*", "temp", function(msg) covey.kv.set("early/" .. msg.from, msg.payload) end)
"#;
    std::fs::write(t.scripts.join("witness.lua"), slow).unwrap();
    t.stop().await;

    let addr = udp.to_string();
    let args = [
        "--udp",
        &addr,
        "--name",
        "esp-1",
        "--wait-ms",
        "30000",
        "emit",
        "temp",
        "7",
    ];
    let device = tokio::spawn({
        let key = key.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&key, &args).await
        }
    });
    let mut cfg = t.config();
    with_bridge(&mut cfg);
    t.restart(cfg).await;
    let (ok, out) = device.await.unwrap();
    assert!(ok, "{out}");
    eventually(10, "the witness got the device's first event", || async {
        t.kv_string("early/n1/esp-1").as_deref() == Some("7")
    })
    .await;
}

/// A UDP relay between a device and the bridge that keeps every datagram
/// it carries: what someone on the device's Wi-Fi would see.
async fn sniffing_relay(
    bridge: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use std::sync::{Arc, Mutex};
    let outside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let inside = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = outside.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let device = Arc::new(Mutex::new(None::<SocketAddr>));
    let (o, i, s, d) = (
        outside.clone(),
        inside.clone(),
        seen.clone(),
        device.clone(),
    );
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = o.recv_from(&mut buf).await {
            *d.lock().unwrap() = Some(from);
            s.lock().unwrap().push(buf[..n].to_vec());
            let _ = i.send_to(&buf[..n], bridge).await;
        }
    });
    let (o, s) = (outside, seen.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = inside.recv_from(&mut buf).await {
            s.lock().unwrap().push(buf[..n].to_vec());
            let to = *device.lock().unwrap();
            if let Some(to) = to {
                let _ = o.send_to(&buf[..n], to).await;
            }
        }
    });
    (addr, seen)
}

/// Sealed sessions (new devices): the payloads never cross the network in
/// clear, both ways — checked on the wire through a relay — while scripts
/// and the device see them as before. A device added with `--no-seal`
/// may still use tagged frames (and its payloads show); a device that must
/// seal and does not offer it is refused. The mode is in `covey status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_sessions_hide_payloads_on_the_wire() {
    let t = crate::common::start_with(&[], |c| {
        c.bridge.udp = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let echo = r#"
covey.on("*", "reading", function(msg)
  covey.kv.set("got/" .. msg.from, msg.payload)
  covey.command(msg.from, "reply", "answer-" .. msg.payload)
end)
"#;
    load(&t, "echo.lua", echo).await;
    let registry = &t.node().devices().registry;
    let sealed_key = covey::files::hex(&registry.add("esp-s").unwrap());
    let open_key = covey::files::hex(&registry.add_with("esp-o", false).unwrap());
    let udp = t.node().devices().udp.unwrap();

    for (name, key, seal, mode) in [
        ("esp-s", &sealed_key, "1", "sealed"),
        ("esp-o", &open_key, "0", "tagged"),
    ] {
        let (relay, seen) = sniffing_relay(udp).await;
        let relay = relay.to_string();
        let secret = format!("secret-{name}-42");
        let args = [
            "--udp", &relay, "--name", name, "--seal", seal, "listen", "nothing",
        ];
        let mut dev = Device::spawn(key, &args);
        assert_eq!(dev.expect("connected", 10).await, "connected n1");
        assert_eq!(dev.expect("mode", 5).await, format!("mode {mode}"));
        attached(&t, name).await;
        // The device's event reaches the script; the script's command
        // reaches the device.
        let (ok, out) = run(
            key,
            &[
                "--udp", &relay, "--name", name, "--seal", seal, "--qos", "1", "emit", "reading",
                &secret,
            ],
        )
        .await;
        assert!(ok, "{out}");
        let from = format!("got/n1/{name}");
        eventually(10, "the script got the reading", || async {
            t.kv_string(&from).as_deref() == Some(secret.as_str())
        })
        .await;
        dev.kill().await;
        let wire: Vec<u8> = seen.lock().unwrap().concat();
        let shows = |s: &str| wire.windows(s.len()).any(|w| w == s.as_bytes());
        match mode {
            "sealed" => {
                assert!(
                    !shows(&secret) && !shows("reading"),
                    "{name}: in clear on the wire"
                );
                assert!(!shows(&format!("answer-{secret}")));
            }
            _ => assert!(
                shows(&secret),
                "{name}: tagged frames carry the payload in clear"
            ),
        }
        let status = covey::control::fetch_status(&t.data).await.unwrap();
        let d = status.devices.devices.iter().find(|d| d.name == name);
        // Gone after the kill, or still listed: either way not the other mode.
        assert!(d.is_none_or(|d| d.sealed == (mode == "sealed")), "{d:?}");
    }

    // A device that must seal, offering tagged frames only: no session.
    let (ok, out) = run(
        &sealed_key,
        &[
            "--udp",
            &udp.to_string(),
            "--name",
            "esp-s",
            "--seal",
            "0",
            "--wait-ms",
            "1500",
            "emit",
            "reading",
            "x",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    let status = covey::control::fetch_status(&t.data).await.unwrap();
    assert!(
        status
            .devices
            .errors
            .get("unsealed")
            .is_some_and(|n| *n > 0)
            || status
                .devices
                .devices
                .iter()
                .any(|d| d.errors.contains_key("unsealed")),
        "{:?}",
        status.devices
    );
    let list = registry.list();
    let sealed: Vec<(&str, bool)> = list.iter().map(|d| (d.name.as_str(), d.sealed)).collect();
    assert_eq!(sealed, [("esp-o", false), ("esp-s", true)]);
}
