//! `covey status` for people: the status report as a table.

use std::collections::BTreeMap;

use super::StatusReport;
use crate::clock::now_ms;

/// The human form of a status report.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {} (covey {}, pid {}, up {})",
        r.node,
        r.version,
        r.pid,
        human_duration(r.uptime_ms)
    );
    match &r.cluster {
        None => {
            let _ = writeln!(out, "cluster: none (single node)");
        }
        Some(c) => {
            let up = c.peers.iter().filter(|p| p.up).count();
            let _ = writeln!(
                out,
                "cluster {} listening on {}: {} of {} peers up",
                c.fingerprint,
                c.listen,
                up,
                c.peers.len()
            );
            if !c.peers.is_empty() {
                let _ = writeln!(
                    out,
                    "  {:<20} {:<5} {:>10} {:>9} {:<28} {:>8}",
                    "PEER", "STATE", "SINCE", "RTT", "ADDRESS", "DROPPED"
                );
            }
            let now = now_ms();
            for p in &c.peers {
                let rtt = rtt_text(p.rtt_us);
                let addr = p.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    out,
                    "  {:<20} {:<5} {:>10} {:>9} {:<28} {:>8}",
                    p.name,
                    if p.up { "up" } else { "down" },
                    human_duration(now.saturating_sub(p.since_ms)),
                    rtt,
                    addr,
                    p.frames_dropped
                );
            }
        }
    }
    let _ = writeln!(out, "scripts ({}):", r.scripts.len());
    for s in &r.scripts {
        let _ = writeln!(out, "  {s}");
    }
    let _ = writeln!(
        out,
        "messages: {} delivered, {} handled, {} dropped",
        r.messages_delivered, r.messages_handled, r.messages_dropped
    );
    if let Some(h) = r.heap {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(
            out,
            "heap: {:.1} MiB in use, {:.1} MiB held",
            mib(h.in_use),
            mib(h.held)
        );
    }
    render_devices(&mut out, r);
    if !r.scripts_refused.is_empty() {
        let by_reason: Vec<String> = r
            .scripts_refused
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        let _ = writeln!(
            out,
            "scripts sync: refused manifest entries from peers: {}",
            by_reason.join(", ")
        );
    }
    out
}

fn render_devices(out: &mut String, r: &StatusReport) {
    use std::fmt::Write;
    let d = &r.devices;
    if let Some(udp) = &r.bridge_udp {
        let _ = writeln!(out, "device bridge on UDP {udp}");
    }
    let now = now_ms();
    if d.devices.is_empty() && d.errors.is_empty() && r.other_devices.is_empty() {
        return;
    }
    let _ = writeln!(out, "devices ({}):", d.devices.len());
    let _ = writeln!(
        out,
        "  {:<20} {:<7} {:<6} {:<24} {:>8} {:>8} {:>9} {:>9}  ERRORS",
        "DEVICE", "VIA", "MODE", "ADDRESS", "SINCE", "SEEN", "IN", "OUT"
    );
    let errors = |m: &BTreeMap<String, u64>| {
        let v: Vec<String> = m.iter().map(|(k, n)| format!("{n} {k}")).collect();
        if v.is_empty() {
            "-".into()
        } else {
            v.join(", ")
        }
    };
    for x in &d.devices {
        let _ = writeln!(
            out,
            "  {:<20} {:<7} {:<6} {:<24} {:>8} {:>8} {:>9} {:>9}  {}",
            x.name,
            x.transport,
            if x.sealed { "sealed" } else { "tagged" },
            x.address,
            human_duration(now.saturating_sub(x.since_ms)),
            human_duration(now.saturating_sub(x.last_seen_ms)),
            x.frames_in,
            x.frames_out,
            errors(&x.errors)
        );
    }
    if !d.errors.is_empty() {
        let _ = writeln!(out, "  refused, no device known: {}", errors(&d.errors));
    }
    for (node, list) in &r.other_devices {
        let _ = writeln!(out, "devices on {node} ({}):", list.len());
        for x in list {
            let _ = writeln!(
                out,
                "  {:<20} {:<7} {:<24} {:>8}",
                x.name,
                x.transport,
                x.address,
                human_duration(now.saturating_sub(x.since_ms))
            );
        }
    }
}

/// A round-trip time for a table: `0.42 ms`, or `-` when unknown.
pub fn rtt_text(us: Option<u64>) -> String {
    us.map(|us| format!("{:.2} ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}
