//! `pong`: the other half of ping-pong: answers every `ping` with a `pong`
//! carrying the same number.

use covey_guest::{Event, Script, events};

struct Pong;

impl Script for Pong {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "ping")?;
        Ok(Pong)
    }

    fn on_event(&mut self, msg: Event<'_>) {
        let _ = events::emit("pong", msg.payload);
    }
}

covey_guest::export_script!(Pong);
