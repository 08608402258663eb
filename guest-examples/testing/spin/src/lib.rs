//! `spin`: a runaway loop on demand (command or event `spin`); `alive`
//! answers `yes` so tests can see it was restarted and still works.

use covey_guest::{Event, Message, Script, events};

struct Spin;

fn forever() {
    let mut x = 0u64;
    loop {
        x = core::hint::black_box(x.wrapping_add(1));
    }
}

impl Script for Spin {
    fn init() -> Result<Self, String> {
        events::handle("*", "spin")?;
        events::handle("*", "alive")?;
        events::subscribe("*", "spin")?;
        Ok(Spin)
    }

    fn on_event(&mut self, _msg: Event<'_>) {
        forever()
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        if msg.name == "spin" {
            forever()
        }
        Some(b"yes".to_vec())
    }
}

covey_guest::export_script!(Spin);
