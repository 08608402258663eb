//! `crash`: panics on command `crash`; counts its starts in `crash/inits`;
//! `alive` answers `yes`.

use covey_guest::{Message, Script, events, kv};

struct Crash;

impl Script for Crash {
    fn init() -> Result<Self, String> {
        let _ = kv::incr("crash/inits", 1);
        events::handle("*", "crash")?;
        events::handle("*", "alive")?;
        Ok(Crash)
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        if msg.name == "crash" {
            panic!("crash requested");
        }
        Some(b"yes".to_vec())
    }
}

covey_guest::export_script!(Crash);
