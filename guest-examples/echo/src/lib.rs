//! `echo`: answers calls. `echo` replies with the payload unchanged,
//! `echo.upper` with it upper-cased.

use covey_guest::{Message, Script, events};

struct Echo;

impl Script for Echo {
    fn init() -> Result<Self, String> {
        events::handle("*", "echo")?;
        events::handle("*", "echo.upper")?;
        Ok(Echo)
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        match msg.name.as_str() {
            "echo" => Some(msg.payload),
            "echo.upper" => Some(msg.text().to_uppercase().into_bytes()),
            _ => None,
        }
    }
}

covey_guest::export_script!(Echo);
