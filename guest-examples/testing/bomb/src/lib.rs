//! `bomb`: allocates without end on command `bomb`; `alive` answers `yes`.

use covey_guest::{Message, Script, events};

struct Bomb;

impl Script for Bomb {
    fn init() -> Result<Self, String> {
        events::handle("*", "bomb")?;
        events::handle("*", "alive")?;
        Ok(Bomb)
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        if msg.name == "bomb" {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                core::hint::black_box(&hoard);
            }
        }
        Some(b"yes".to_vec())
    }
}

covey_guest::export_script!(Bomb);
