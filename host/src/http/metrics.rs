//! `GET /metrics`: the node in Prometheus' text format.
//!
//! Names follow Prometheus' conventions (`covey_` prefix, `_total` for
//! counters, base units: `_seconds`, `_bytes`). Label values are script
//! paths, peer and device names only: bounded by what the operator runs.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::guard::Guard;
use crate::clock::now_ms;
use crate::control::StatusSource;
use crate::router::{Outcome, RouterStats};
use crate::script::instance::DURATION_BUCKETS;

/// The exposition text.
pub async fn render(source: &StatusSource, guard: &Guard) -> String {
    let mut m = Metrics::default();
    let report = source.report();
    m.family("covey_build_info", "gauge", "Covey's version (value 1).");
    m.sample(
        "covey_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("node", &report.node),
        ],
        1.0,
    );
    m.family(
        "covey_uptime_seconds",
        "gauge",
        "Time since the node started.",
    );
    m.sample(
        "covey_uptime_seconds",
        &[],
        report.uptime_ms as f64 / 1000.0,
    );

    let stats = &source.router.stats;
    m.counter(
        "covey_bus_deliveries_total",
        "Messages queued into scripts' mailboxes.",
        stats.delivered.load(Ordering::Relaxed),
    );
    m.counter(
        "covey_bus_dropped_total",
        "Messages dropped because a script's mailbox was full.",
        stats.dropped.load(Ordering::Relaxed),
    );

    bus(&mut m, stats);
    scripts(&mut m, source).await;
    peers(&mut m, &report);

    stores(&mut m, source);
    if let Some(h) = report.heap {
        let gauges = [
            (
                "covey_heap_in_use_bytes",
                "Heap in live allocations.",
                h.in_use,
            ),
            (
                "covey_heap_held_bytes",
                "Heap taken from the system (live and kept free).",
                h.held,
            ),
        ];
        for (name, help, value) in gauges {
            m.family(name, "gauge", help);
            m.sample(name, &[], value as f64);
        }
    }
    devices(&mut m, &report.devices);
    refused(&mut m, guard);
    m.text
}

/// Requests refused as a browser's (see [`super::guard`]): someone's page
/// tried this node.
fn refused(m: &mut Metrics, guard: &Guard) {
    let name = "covey_http_refused_total";
    m.family(
        name,
        "counter",
        "HTTP requests refused: a Host this API does not answer to, or from a page of another origin.",
    );
    for (rule, n) in [
        ("host", &guard.refused_host),
        ("origin", &guard.refused_origin),
    ] {
        m.sample(name, &[("rule", rule)], n.load(Ordering::Relaxed) as f64);
    }
}

/// The key-value store, replication and scripts sync.
fn stores(m: &mut Metrics, source: &StatusSource) {
    let kv = &source.kv;
    let gauges = [
        (
            "covey_kv_keys",
            "Keys in the replicated key-value store.",
            kv.len() as u64,
        ),
        (
            "covey_kv_bytes",
            "Bytes of the store's keys and values.",
            kv.bytes(),
        ),
    ];
    for (name, help, value) in gauges {
        m.family(name, "gauge", help);
        m.sample(name, &[], value as f64);
    }
    let stats = kv.store_stats();
    m.counter(
        "covey_kv_writes_total",
        "Writes made on this node (scripts, operators).",
        stats.writes,
    );
    if let Some(bytes) = stats.file_bytes {
        m.family(
            "covey_kv_file_bytes",
            "gauge",
            "Size of the store's file on disk.",
        );
        m.sample("covey_kv_file_bytes", &[], bytes as f64);
    }
    type Field = fn(&crate::docsync::SyncCounters) -> &AtomicU64;
    let families: [(&str, &str, Field); 2] = [
        (
            "covey_sync_sent_bytes_total",
            "Bytes of sync messages sent, per replicated document.",
            |c| &c.sent_bytes,
        ),
        (
            "covey_sync_received_bytes_total",
            "Bytes of sync messages received, per replicated document.",
            |c| &c.received_bytes,
        ),
    ];
    for (name, help, field) in families {
        m.family(name, "counter", help);
        for (doc, c) in &source.sync_counters {
            m.sample(
                name,
                &[("doc", doc)],
                field(c).load(Ordering::Relaxed) as f64,
            );
        }
    }
    let Some(sync) = &source.scripts_sync else {
        return;
    };
    let t = sync.transfers();
    let counters = [
        (
            "covey_scripts_sync_fetched_total",
            "Script files fetched from peers.",
            &t.fetched,
        ),
        (
            "covey_scripts_sync_fetched_bytes_total",
            "Bytes of script files fetched from peers.",
            &t.fetched_bytes,
        ),
        (
            "covey_scripts_sync_served_total",
            "Script files sent to peers that asked.",
            &t.served,
        ),
        (
            "covey_scripts_sync_served_bytes_total",
            "Bytes of script files sent to peers.",
            &t.served_bytes,
        ),
    ];
    for (name, help, n) in counters {
        m.counter(name, help, n.load(Ordering::Relaxed));
    }
}

fn devices(m: &mut Metrics, d: &covey_firmware_bridge::BridgeStatus) {
    m.family(
        "covey_devices_attached",
        "gauge",
        "Microcontrollers attached to this node.",
    );
    m.sample("covey_devices_attached", &[], d.devices.len() as f64);
    type Field = fn(&covey_firmware_bridge::DeviceStatus) -> u64;
    let families: [(&str, &str, Field); 2] = [
        (
            "covey_device_frames_in_total",
            "Frames in per device.",
            |x| x.frames_in,
        ),
        (
            "covey_device_frames_out_total",
            "Frames out per device.",
            |x| x.frames_out,
        ),
    ];
    for (name, help, value) in families {
        m.family(name, "counter", help);
        for x in &d.devices {
            m.sample(name, &[("device", &x.name)], value(x) as f64);
        }
    }
}

async fn scripts(m: &mut Metrics, source: &StatusSource) {
    let list = source.supervisor.list().await;
    let now = now_ms();
    type Field = fn(&crate::script::supervisor::ScriptInfo, u64) -> f64;
    let families: [(&str, &str, &str, Field); 7] = [
        (
            "covey_script_up",
            "gauge",
            "1 while the script runs, 0 while it waits to restart.",
            |s, _| f64::from(u8::from(s.state == "running")),
        ),
        (
            "covey_script_running_seconds",
            "gauge",
            "Time since the running version started.",
            |s, now| {
                if s.state == "running" {
                    now.saturating_sub(s.started_ms) as f64 / 1000.0
                } else {
                    0.0
                }
            },
        ),
        (
            "covey_script_restarts_total",
            "counter",
            "Restarts after a failure (trap, CPU budget, memory).",
            |s, _| s.restarts as f64,
        ),
        (
            "covey_script_memory_bytes",
            "gauge",
            "Linear memory of the running version.",
            |s, _| s.memory_bytes as f64,
        ),
        (
            "covey_script_messages_handled_total",
            "counter",
            "Messages taken from the script's mailbox.",
            |s, _| s.handled as f64,
        ),
        (
            "covey_script_messages_dropped_total",
            "counter",
            "Messages dropped: the script's mailbox was full.",
            |s, _| s.dropped as f64,
        ),
        (
            "covey_script_log_lines_dropped_total",
            "counter",
            "Log lines over the script's log rate.",
            |s, _| s.log_dropped as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        m.family(name, kind, help);
        for s in &list {
            m.sample(name, &[("script", &s.script)], value(s, now));
        }
    }
    let name = "covey_script_failures_total";
    m.family(
        name,
        "counter",
        "Failures that restarted the script, by kind.",
    );
    for s in &list {
        for (kind, n) in &s.failures {
            m.sample(name, &[("script", &s.script), ("kind", kind)], *n as f64);
        }
    }
    let name = "covey_script_callback_duration_seconds";
    m.family(name, "histogram", "How long the script's callbacks took.");
    for s in &list {
        let mut below = 0;
        for (i, n) in s.callback_durations.iter().enumerate() {
            below += n;
            let le = DURATION_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            m.sample(
                &format!("{name}_bucket"),
                &[("script", &s.script), ("le", &le)],
                below as f64,
            );
        }
        m.sample(
            &format!("{name}_sum"),
            &[("script", &s.script)],
            s.busy_ms as f64 / 1000.0,
        );
        m.sample(
            &format!("{name}_count"),
            &[("script", &s.script)],
            below as f64,
        );
    }
}

/// Events, commands and calls sent from this node, by outcome.
fn bus(m: &mut Metrics, stats: &RouterStats) {
    for (what, outcomes) in [
        ("events", &stats.events),
        ("commands", &stats.commands),
        ("calls", &stats.calls),
    ] {
        let name = format!("covey_bus_{what}_total");
        m.family(
            &name,
            "counter",
            &format!("{what} sent from this node, by outcome."),
        );
        for o in Outcome::ALL {
            let n = outcomes.get(o);
            if n > 0 || o == Outcome::Ok {
                m.sample(&name, &[("outcome", o.name())], n as f64);
            }
        }
    }
}

fn peers(m: &mut Metrics, report: &crate::control::StatusReport) {
    let peers = report
        .cluster
        .as_ref()
        .map(|c| c.peers.as_slice())
        .unwrap_or_default();
    type Field = fn(&crate::cluster::members::PeerReport) -> Option<f64>;
    let families: [(&str, &str, &str, Field); 5] = [
        (
            "covey_peer_up",
            "gauge",
            "1 while the link to the peer is up.",
            |p| Some(f64::from(u8::from(p.up))),
        ),
        (
            "covey_peer_rtt_seconds",
            "gauge",
            "Smoothed round-trip time of the link.",
            |p| p.rtt_us.map(|us| us as f64 / 1e6),
        ),
        (
            "covey_peer_frames_sent_total",
            "counter",
            "Frames sent to the peer.",
            |p| Some(p.frames_sent as f64),
        ),
        (
            "covey_peer_frames_received_total",
            "counter",
            "Frames received from the peer.",
            |p| Some(p.frames_received as f64),
        ),
        (
            "covey_peer_frames_dropped_total",
            "counter",
            "Frames to the peer dropped (link down or full).",
            |p| Some(p.frames_dropped as f64),
        ),
    ];
    for (name, kind, help, value) in families {
        m.family(name, kind, help);
        for p in peers {
            if let Some(v) = value(p) {
                m.sample(name, &[("peer", &p.name)], v);
            }
        }
    }
}

#[derive(Default)]
struct Metrics {
    text: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value as f64);
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_label_escaping() {
        let mut m = Metrics::default();
        m.family("covey_x_total", "counter", "X.");
        m.sample("covey_x_total", &[("script", "a\"b\\c\nd.lua")], 3.0);
        m.sample("covey_x_total", &[], 0.5);
        assert_eq!(
            m.text,
            "# HELP covey_x_total X.\n# TYPE covey_x_total counter\n\
             covey_x_total{script=\"a\\\"b\\\\c\\nd.lua\"} 3\ncovey_x_total 0.5\n"
        );
    }
}
