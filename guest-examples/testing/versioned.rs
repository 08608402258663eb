// Shared body of `version-a` and `version-b` (included with VERSION set):
// two versions of one script for the hot-reload tests. Counts `tick`
// events in `seen/<VERSION>`, answers `version`, and bumps
// `timer/<VERSION>` from a 10 ms timer (to show old timers stop).

use covey_guest::{Event, Message, Script, events, kv, timers};

struct Versioned;

impl Script for Versioned {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "tick")?;
        events::handle("*", "version")?;
        timers::every(10)?;
        Ok(Versioned)
    }

    fn on_event(&mut self, _msg: Event<'_>) {
        let _ = kv::incr(&format!("seen/{VERSION}"), 1);
    }

    fn on_command(&mut self, _msg: Message) -> Option<Vec<u8>> {
        Some(VERSION.as_bytes().to_vec())
    }

    fn on_timer(&mut self, _id: u64) -> bool {
        let _ = kv::incr(&format!("timer/{VERSION}"), 1);
        true
    }
}

covey_guest::export_script!(Versioned);
