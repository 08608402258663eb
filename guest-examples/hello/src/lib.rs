//! `hello`: logs, and emits a `hello` event every few seconds (interval from
//! the node config's `extras.hello_interval_ms`, default 3000). It also logs
//! every `hello` it hears, its own included.

use covey_guest::{Event, Script, config, events, log, node, timers};

struct Hello {
    sent: u64,
}

impl Script for Hello {
    fn init() -> Result<Self, String> {
        let interval = config::get("hello_interval_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        events::subscribe("*", "hello")?;
        timers::every(interval)?;
        log::info(&format!("hello from {}, every {interval} ms", node::name()));
        Ok(Hello { sent: 0 })
    }

    fn on_timer(&mut self, _id: u64) -> bool {
        self.sent += 1;
        let text = format!("hello #{} from {}", self.sent, node::name());
        if let Err(e) = events::emit_str("hello", &text) {
            log::warn(&format!("emit failed: {e:?}"));
        }
        true
    }

    fn on_event(&mut self, msg: Event<'_>) {
        log::info(&format!("heard from {}: {}", msg.from, msg.text()));
    }
}

covey_guest::export_script!(Hello);
