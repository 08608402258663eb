//! `counter`: counts every event it sees in the key-value store:
//! `counter/total` and `counter/by-name/<event name>`.

use covey_guest::{Event, Script, events, kv, log};

struct Counter;

impl Script for Counter {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "*")?;
        Ok(Counter)
    }

    fn on_event(&mut self, msg: Event<'_>) {
        let total = kv::incr("counter/total", 1);
        let by_name = kv::incr(&format!("counter/by-name/{}", msg.name), 1);
        if let Err(e) = total.and(by_name) {
            log::error(&format!("counting failed: {e:?}"));
        }
    }
}

covey_guest::export_script!(Counter);
