//! A `mosquitto` broker on a free loopback port, started and stopped by a
//! test or benchmark, and its command-line clients.

#![allow(dead_code)] // each user takes a part

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running broker; killed when dropped.
pub struct Broker {
    _process: Child,
    pub port: u16,
    /// `mosquitto_pub`/`_sub` arguments for a TLS listener.
    client_tls: Vec<String>,
}

impl Broker {
    pub async fn start(dir: &Path, port: Option<u16>) -> Broker {
        Broker::start_with(dir, port, "", Vec::new()).await
    }

    /// A TLS listener (`extra` holds its `cafile`, `certfile`, ...
    /// lines); the clients connect with `client_tls`.
    pub async fn start_tls(dir: &Path, extra: &str, client_tls: Vec<String>) -> Broker {
        Broker::start_with(dir, None, extra, client_tls).await
    }

    async fn start_with(
        dir: &Path,
        port: Option<u16>,
        extra: &str,
        client_tls: Vec<String>,
    ) -> Broker {
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
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
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
            client_tls,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// A `mosquitto_pub`/`mosquitto_sub` on this broker and `topic`.
    fn client(&self, program: &str, topic: &str) -> Command {
        let mut c = Command::new(program);
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", topic]);
        c.args(&self.client_tls);
        c
    }

    /// Publish; false if the broker refused (it may be restarting).
    pub async fn publish(&self, topic: &str, payload: &str) -> bool {
        self.client("mosquitto_pub", topic)
            .args(["-m", payload])
            .status()
            .await
            .expect("mosquitto_pub (Debian package `mosquitto-clients`)")
            .success()
    }

    /// The retained message on `topic` (waits up to 2 s for one).
    pub async fn retained(&self, topic: &str) -> String {
        let out = self
            .client("mosquitto_sub", topic)
            .args(["-C", "1", "-W", "2"])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A subscriber printing `TOPIC PAYLOAD` lines (killed when dropped).
    pub fn subscribe(
        &self,
        topic: &str,
    ) -> (
        Child,
        tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) {
        let mut child = self
            .client("mosquitto_sub", topic)
            .arg("-v")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines)
    }
}
