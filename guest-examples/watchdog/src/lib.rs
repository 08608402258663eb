//! `watchdog`: reacts to system events with the SDK's typed payloads. It
//! keeps the cluster's state in the key-value store for dashboards and
//! other scripts: `watchdog/<this node>/node/<node>` is `up` or
//! `down: <reason>`, `watchdog/<this node>/failed/<node>/<script>` the
//! last error of a script that failed there.

use covey_guest::system::{DownReason, SystemEvent};
use covey_guest::{Event, Script, events, kv, log, node};

struct Watchdog {
    me: String,
}

impl Script for Watchdog {
    fn init() -> Result<Self, String> {
        // System events are selected only by patterns naming `covey.`.
        events::subscribe("*", "covey.node.*")?;
        events::subscribe("*", "covey.script.failed")?;
        Ok(Watchdog { me: node::name() })
    }

    fn on_event(&mut self, msg: Event<'_>) {
        let (key, value) = match SystemEvent::parse(msg.name, msg.payload) {
            Some(SystemEvent::NodeUp(n)) => (format!("node/{}", n.node), "up".to_string()),
            Some(SystemEvent::NodeDown(n)) => {
                let reason = n.reason.unwrap_or(DownReason::Lost);
                if n.flaps > 0 {
                    log::info(&format!("{} flapped {} times before", n.node, n.flaps));
                }
                (
                    format!("node/{}", n.node),
                    format!("down: {reason:?}").to_lowercase(),
                )
            }
            Some(SystemEvent::ScriptFailed(s)) => (
                format!("failed/{}/{}", s.node, s.script),
                s.error.unwrap_or_default(),
            ),
            _ => return,
        };
        let key = format!("watchdog/{}/{key}", self.me);
        if let Err(e) = kv::set(&key, value.as_bytes()) {
            log::error(&format!("recording {key}: {e:?}"));
        }
    }
}

covey_guest::export_script!(Watchdog);
