//! `ping`: half of the ping-pong pair. Serves a `ping` when it receives a
//! `serve` event, and returns every `pong` with the next `ping` until
//! `rounds` (payload of `serve`, default 10) are done; counts rallies in
//! `pingpong/rallies`.

use covey_guest::{Event, Script, events, kv, log};

struct Ping {
    left: u32,
}

impl Script for Ping {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "serve")?;
        events::subscribe("*", "pong")?;
        Ok(Ping { left: 0 })
    }

    fn on_event(&mut self, msg: Event<'_>) {
        match msg.name {
            "serve" => {
                self.left = msg.text().trim().parse().unwrap_or(10);
                let _ = events::emit_str("ping", "1");
            }
            "pong" if self.left > 0 => {
                self.left -= 1;
                let _ = kv::incr("pingpong/rallies", 1);
                let n: u64 = msg.text().parse().unwrap_or(0);
                if self.left > 0 {
                    let _ = events::emit_str("ping", &(n + 1).to_string());
                } else {
                    log::info(&format!("game over after {n} rallies"));
                }
            }
            _ => {}
        }
    }
}

covey_guest::export_script!(Ping);
