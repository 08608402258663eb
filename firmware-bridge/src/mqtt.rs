//! The node on an MQTT broker (Tasmota, ESPHome, anything with
//! PubSubClient), through rumqttc.
//!
//! Topics, under a prefix (`covey` by default):
//! - `PREFIX/FROM/event/NAME` ← every event that starts on this node (from
//!   its scripts: `FROM` is the node; from its devices: `NODE/DEVICE`).
//! - `PREFIX/SOURCE/event/NAME` → a Covey event from `NODE/SOURCE`, for
//!   any `SOURCE` that is not a node of the cluster (or one of their
//!   devices): what other systems publish. Events that came from MQTT are
//!   never published back (they are not from this node's scripts or
//!   registered devices), so two bridges on one broker do not loop.
//! - `PREFIX/NODE/cmd/NAME` → a command to this node's scripts.
//! - `PREFIX/NODE/status`: `online`, retained; the broker's last will sets
//!   it to `offline` when the node vanishes, and a clean stop does too.
//!
//! rumqttc reconnects by itself but forgets subscriptions with a clean
//! session, so every connection acknowledgement subscribes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

/// What the MQTT side needs of the node.
pub trait MqttBus: Send + Sync + 'static {
    fn node(&self) -> &str;
    fn max_payload(&self) -> usize;
    /// Is `name` a node of the cluster (this one included)?
    fn is_node(&self, name: &str) -> bool;
    /// Is `name` a registered device?
    fn is_device(&self, name: &str) -> bool;
    /// An event from an MQTT source, as `NODE/SOURCE`.
    fn emit(&self, source: &str, name: &str, payload: Vec<u8>);
    /// A command to this node's scripts.
    fn command(&self, name: &str, payload: Vec<u8>);
}

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub prefix: String,
    /// TLS to the broker (`mqtts://`): whom to trust, and this node's
    /// certificate if the broker asks for one.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl MqttConfig {
    /// `mqtt://HOST[:PORT]` (1883 by default) or `mqtts://HOST[:PORT]`
    /// (8883, trusting the system's roots).
    pub fn parse(url: &str) -> Result<MqttConfig, String> {
        MqttConfig::parse_with(url, &TlsFiles::default())
    }

    /// The same, with TLS from PEM files (`mqtts://` only): `ca` instead of
    /// the system's roots, a client certificate and key.
    pub fn parse_with(url: &str, files: &TlsFiles) -> Result<MqttConfig, String> {
        let (rest, tls, default_port) = match url.strip_prefix("mqtts://") {
            Some(rest) => (rest, true, 8883),
            None => match url.strip_prefix("mqtt://") {
                Some(rest) => (rest, false, 1883),
                None => return Err(format!("{url}: expected mqtt://HOST[:PORT] or mqtts://")),
            },
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(['[', ']']),
                p.parse().map_err(|_| format!("{url}: bad port"))?,
            ),
            _ => (rest, default_port),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        MqttConfig {
            host: host.to_string(),
            port,
            username: None,
            password: None,
            prefix: "covey".into(),
            tls: None,
        }
        .with_tls(tls, files)
    }

    fn with_tls(mut self, on: bool, files: &TlsFiles) -> Result<MqttConfig, String> {
        let any = files.ca.is_some() || files.cert.is_some() || files.key.is_some();
        self.tls = match on {
            true => Some(Arc::new(crate::tls::client_config(files)?)),
            false if any => {
                return Err("mqtt_ca, mqtt_cert and mqtt_key need an mqtts:// broker".into());
            }
            false => None,
        };
        Ok(self)
    }
}

pub use crate::tls::TlsFiles;

/// A running MQTT connection (clones share it).
#[derive(Clone)]
pub struct Mqtt {
    client: AsyncClient,
    cfg: Arc<MqttConfig>,
    node: Arc<str>,
    /// Messages not published (queue full, invalid topic) or not taken.
    pub dropped: Arc<AtomicU64>,
}

impl Mqtt {
    /// Connect (in the background, retrying) and serve until aborted.
    pub fn start(cfg: MqttConfig, bus: Arc<dyn MqttBus>) -> (Mqtt, JoinHandle<()>) {
        let node: Arc<str> = bus.node().into();
        let status = format!("{}/{}/status", cfg.prefix, node);
        let mut opts = MqttOptions::new(format!("covey-{node}"), &cfg.host, cfg.port);
        // The broker marks the node offline (its last will) 1.5 keep-alives
        // after it vanishes.
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(true);
        opts.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
        let limit = bus.max_payload() + 1024;
        opts.set_max_packet_size(limit, limit);
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            opts.set_credentials(u, p);
        }
        if let Some(tls) = &cfg.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        let mqtt = Mqtt {
            client,
            cfg: Arc::new(cfg),
            node,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let task = tokio::spawn(mqtt.clone().run(eventloop, bus));
        (mqtt, task)
    }

    async fn run(self, mut eventloop: EventLoop, bus: Arc<dyn MqttBus>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff = Duration::from_millis(200);
                    tracing::info!(broker = %self.cfg.host, port = self.cfg.port, "MQTT connected");
                    self.on_connect();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.incoming(&*bus, &p.topic, p.payload.to_vec())
                }
                Ok(_) => {}
                Err(e) => {
                    let e = explain(&e);
                    tracing::warn!(broker = %self.cfg.host, "MQTT: {e}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// (Re)subscribe and say this node is online.
    fn on_connect(&self) {
        let p = &self.cfg.prefix;
        let subs = [format!("{p}/+/event/#"), format!("{p}/{}/cmd/#", self.node)];
        for topic in subs {
            if let Err(e) = self.client.try_subscribe(topic, QoS::AtMostOnce) {
                tracing::warn!("MQTT subscribe: {e}");
            }
        }
        let status = format!("{p}/{}/status", self.node);
        let _ = self
            .client
            .try_publish(status, QoS::AtLeastOnce, true, "online");
    }

    fn incoming(&self, bus: &dyn MqttBus, topic: &str, payload: Vec<u8>) {
        let Some(rest) = topic
            .strip_prefix(self.cfg.prefix.as_str())
            .and_then(|t| t.strip_prefix('/'))
        else {
            return;
        };
        if payload.len() > bus.max_payload() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Some(name) = rest
            .strip_prefix(&*self.node)
            .and_then(|r| r.strip_prefix("/cmd/"))
        {
            bus.command(name, payload);
            return;
        }
        let Some((source, name)) = rest.split_once("/event/") else {
            return;
        };
        // Our own and other nodes' publications (they reach their scripts
        // through the cluster) are not taken back in.
        let (first, device) = source.split_once('/').unwrap_or((source, ""));
        if bus.is_node(first) || (device.is_empty() && bus.is_device(first)) {
            return;
        }
        if !crate::proto::valid_device_name(source) || name.is_empty() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        bus.emit(source, name, payload);
    }

    /// An event seen on this node: published if it started here.
    pub fn event(&self, bus: &dyn MqttBus, from: &str, name: &str, payload: &[u8]) {
        let (node, device) = from.split_once('/').unwrap_or((from, ""));
        if node != &*self.node || (!device.is_empty() && !bus.is_device(device)) {
            return;
        }
        if name.is_empty() || name.contains(['+', '#', '\0']) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let topic = format!("{}/{from}/event/{name}", self.cfg.prefix);
        if self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload.to_vec())
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A clean stop: `offline`, then disconnect.
    pub async fn stop(&self) {
        let status = format!("{}/{}/status", self.cfg.prefix, self.node);
        let _ = self
            .client
            .publish(status, QoS::AtLeastOnce, true, "offline")
            .await;
        let _ = self.client.disconnect().await;
    }
}

/// A connection error, with what to do about the TLS ones.
fn explain(e: &rumqttc::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("invalid peer certificate") {
        format!(
            "{text} (the broker's certificate is not one this node trusts for that name: \
             name the broker's CA with mqtt_ca, or connect by the name it was issued for)"
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let c = MqttConfig::parse("mqtt://broker.lan:1884").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("broker.lan", 1884));
        let c = MqttConfig::parse("mqtt://10.0.0.2").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("10.0.0.2", 1883));
        let c = MqttConfig::parse("mqtt://[::1]:1885/").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 1885));
        assert!(MqttConfig::parse("http://x").is_err());
        assert!(MqttConfig::parse("mqtt://").is_err());
        // TLS on 8883 by default; the system's roots (Debian's
        // ca-certificates here) unless a CA is named.
        let c = MqttConfig::parse("mqtts://broker.lan").unwrap();
        assert_eq!((c.port, c.tls.is_some()), (8883, true));
        assert!(MqttConfig::parse("mqtt://x").unwrap().tls.is_none());
    }
}
