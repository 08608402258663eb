//! The MQTT bridge against a real broker (Debian's `mosquitto`, started
//! here on a free loopback port), checked with `mosquitto_pub` and
//! `mosquitto_sub` as another system on the broker would see it.

use std::process::Stdio;
use std::time::Duration;

use covey_firmware_bridge::mqtt::MqttConfig;
use tokio::process::Command;

use crate::common::{eventually, start_named};
use crate::lua::load;

#[path = "../support/mosquitto.rs"]
mod mosquitto;
use mosquitto::Broker;

const SCRIPT: &str = r#"
covey.on("*", "temp", function(msg)
  covey.kv.set("mqtt/last", msg.from .. "|" .. msg.payload)
end)
covey.handle("*", "mqtt.cmd", function(msg)
  covey.kv.set("mqtt/cmd", msg.payload)
end)
"#;

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

use crate::pki;

/// `mqtts://` against Debian's mosquitto with a TLS listener on loopback:
/// a CA made here (`mqtt_ca`), a client certificate the broker requires
/// (`mqtt_cert`, `mqtt_key`); events cross both ways. A node that trusts
/// another CA never connects, and says why in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca_and_a_client_certificate() {
    super::http::covey_logging();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = pki::Ca::new("covey test broker CA");
    let ca_file = ca.write(d, "ca.pem");
    let server = ca.leaf(d, "broker", &["127.0.0.1", "localhost"]);
    let node = ca.leaf(d, "node", &["node-a"]);
    let tools = ca.leaf(d, "tools", &["mosquitto-clients"]);
    let extra = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca_file.display(),
        server.cert.display(),
        server.key.display()
    );
    let client_tls = [
        "--cafile",
        &ca_file.display().to_string(),
        "--cert",
        &tools.cert.display().to_string(),
        "--key",
        &tools.key.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let broker = Broker::start_tls(d, &extra, client_tls).await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let files = covey_firmware_bridge::mqtt::TlsFiles {
        ca: Some(ca_file.clone()),
        cert: Some(node.cert.clone()),
        key: Some(node.key.clone()),
    };
    let cfg = MqttConfig::parse_with(&url, &files).unwrap();
    let a = start_named("a", &[], |c| c.bridge.mqtt = Some(cfg)).await;
    load(&a, "m.lua", SCRIPT).await;
    eventually(10, "status online over TLS", || async {
        broker.retained("covey/a/status").await == "online"
    })
    .await;
    assert!(broker.publish("covey/sensor9/event/temp", "19").await);
    eventually(10, "the script saw the MQTT event", || async {
        a.kv_string("mqtt/last").as_deref() == Some("a/sensor9|19")
    })
    .await;

    // The wrong CA: the broker's certificate is refused.
    let other = pki::Ca::new("someone else's CA");
    let files = covey_firmware_bridge::mqtt::TlsFiles {
        ca: Some(other.write(d, "other-ca.pem")),
        ..files
    };
    let cfg = MqttConfig::parse_with(&url, &files).unwrap();
    let b = start_named("b", &[], |c| c.bridge.mqtt = Some(cfg)).await;
    eventually(10, "the wrong CA reported", || async {
        let all = covey::logring::LogQuery {
            script: None,
            since_ms: None,
        };
        (covey::logring::LOGS.recent(&all).iter()).any(|l| {
            l.message.contains("MQTT")
                && l.message.contains("UnknownIssuer")
                && l.message.contains("mqtt_ca")
        })
    })
    .await;
    assert_eq!(broker.retained("covey/b/status").await, "");
    drop(b);
}
