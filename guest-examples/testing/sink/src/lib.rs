//! `sink`: the benchmark's receiver. Counts `bench` events in memory (no
//! host calls per event, so the figure is the bus and call overhead);
//! `count` answers with the number seen.

use covey_guest::{Message, Script, events};

struct Sink {
    seen: u64,
}

impl Script for Sink {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "bench")?;
        events::handle("*", "count")?;
        Ok(Sink { seen: 0 })
    }

    fn on_event(&mut self, msg: Message) {
        self.seen += 1;
        core::hint::black_box(&msg.payload);
    }

    fn on_command(&mut self, _msg: Message) -> Option<Vec<u8>> {
        Some(self.seen.to_string().into_bytes())
    }
}

covey_guest::export_script!(Sink);
