//! The MQTT bridge against a real broker (Debian's `mosquitto`, started
//! here on a free loopback port), checked with `mosquitto_pub` and
//! `mosquitto_sub` as another system on the broker would see it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use covey_firmware_bridge::mqtt::MqttConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::{eventually, start_named};
use crate::lua::load;

const SCRIPT: &str = r#"
covey.on("*", "temp", function(msg)
  covey.kv.set("mqtt/last", msg.from .. "|" .. msg.payload)
end)
covey.handle("*", "mqtt.cmd", function(msg)
  covey.kv.set("mqtt/cmd", msg.payload)
end)
"#;

/// A running broker; killed when dropped.
struct Broker {
    _process: Child,
    port: u16,
}

impl Broker {
    async fn start(dir: &Path, port: Option<u16>) -> Broker {
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        });
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto (Debian package `mosquitto`)");
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Broker {
            _process: child,
            port,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Publish; false if the broker refused (it may be restarting).
    async fn publish(&self, topic: &str, payload: &str) -> bool {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-m",
                payload,
            ])
            .status()
            .await
            .expect("mosquitto_pub (Debian package `mosquitto-clients`)")
            .success()
    }

    /// The retained message on `topic` (waits up to 2 s for one).
    async fn retained(&self, topic: &str) -> String {
        let out = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic])
            .args(["-C", "1", "-W", "2"])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A subscriber printing `TOPIC PAYLOAD` lines (killed when dropped).
    fn subscribe(
        &self,
        topic: &str,
    ) -> (
        Child,
        tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) {
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-v",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    }
}

fn mqtt_config(url: &str) -> MqttConfig {
    MqttConfig::parse(url).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_both_ways_commands_status_and_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), None).await;
    let url = broker.url();
    let mut a = start_named("a", &[], |c| c.bridge.mqtt = Some(mqtt_config(&url))).await;
    load(&a, "m.lua", SCRIPT).await;
    eventually(10, "status online", || async {
        broker.retained("covey/a/status").await == "online"
    })
    .await;

    // Node events reach the broker; MQTT events reach scripts, and are
    // not published back.
    let (_sub_process, mut sub) = broker.subscribe("covey/#");
    tokio::time::sleep(Duration::from_millis(300)).await; // the subscriber connects
    a.node().router().emit("hello", b"1".to_vec()).unwrap();
    assert!(broker.publish("covey/tasmota1/event/temp", "22").await);
    eventually(10, "the script saw the MQTT event", || async {
        a.kv_string("mqtt/last").as_deref() == Some("a/tasmota1|22")
    })
    .await;
    a.node().router().emit("marker", b"m".to_vec()).unwrap();
    let mut seen = Vec::new();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), sub.next_line())
            .await
            .expect("the marker reaches the broker")
            .unwrap()
            .unwrap();
        if line.starts_with("covey/a/event/marker") {
            break;
        }
        seen.push(line);
    }
    assert!(
        seen.contains(&"covey/a/event/hello 1".to_string()),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("covey/a/tasmota1")),
        "an MQTT event went back to the broker: {seen:?}"
    );

    // Commands to this node.
    assert!(broker.publish("covey/a/cmd/mqtt.cmd", "on").await);
    eventually(10, "the command reached the script", || async {
        a.kv_string("mqtt/cmd").as_deref() == Some("on")
    })
    .await;

    // The broker restarts: the node reconnects and subscribes again.
    let port = broker.port;
    drop(broker);
    let broker = Broker::start(dir.path(), Some(port)).await;
    eventually(30, "resubscribed after the broker restart", || async {
        broker.publish("covey/sensor2/event/temp", "23").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        a.kv_string("mqtt/last").as_deref() == Some("a/sensor2|23")
    })
    .await;

    // A clean stop says offline.
    a.stop().await;
    assert_eq!(broker.retained("covey/a/status").await, "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_marks_a_killed_node_offline() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), None).await;
    let mut node = Command::new(env!("CARGO_BIN_EXE_covey"))
        .args(["run", "--node", "lw", "--mqtt", &broker.url(), "--data"])
        .arg(dir.path().join("data"))
        .arg("--scripts")
        .arg(dir.path().join("scripts"))
        .env_remove("COVEY_CLUSTER_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(20, "status online", || async {
        broker.retained("covey/lw/status").await == "online"
    })
    .await;
    node.kill().await.unwrap(); // SIGKILL: no clean stop
    // The broker publishes the will after 1.5 keep-alive intervals.
    eventually(30, "status offline (the last will)", || async {
        broker.retained("covey/lw/status").await == "offline"
    })
    .await;
}
