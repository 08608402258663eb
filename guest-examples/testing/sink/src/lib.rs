//! `sink`: the benchmark's receiver. Counts `bench` events in memory (no
//! host calls per event, so the figure is the bus and call overhead);
//! `count` answers with the number seen. For the tests: `order` answers
//! whether every `numbered` event's payload (a decimal number) was one
//! more than the last's and how many events had arrived when `mark` came,
//! `batches` how many `on-events` calls the host made and the largest,
//! `batch-bytes` the most payload bytes one call carried.

use covey_guest::{Event, Message, Script, events};

struct Sink {
    seen: u64,
    last: Option<u64>,
    in_order: bool,
    batches: u64,
    largest: usize,
    largest_bytes: usize,
    marked_at: Option<u64>,
}

impl Script for Sink {
    fn init() -> Result<Self, String> {
        events::subscribe("*", "bench")?;
        events::subscribe("*", "numbered")?;
        events::handle("*", "count")?;
        events::handle("*", "order")?;
        events::handle("*", "batches")?;
        events::handle("*", "batch-bytes")?;
        events::handle("*", "mark")?;
        Ok(Sink {
            seen: 0,
            last: None,
            in_order: true,
            batches: 0,
            largest: 0,
            largest_bytes: 0,
            marked_at: None,
        })
    }

    fn on_event(&mut self, msg: Event<'_>) {
        self.seen += 1;
        if msg.name == "numbered" {
            let n: u64 = msg.text().parse().unwrap_or(u64::MAX);
            if self.last.is_some_and(|last| n != last + 1) {
                self.in_order = false;
            }
            self.last = Some(n);
        }
        core::hint::black_box(&msg.payload);
    }

    fn on_events(&mut self, events: &[Event<'_>]) {
        self.batches += 1;
        self.largest = self.largest.max(events.len());
        let bytes = events.iter().map(|m| m.payload.len()).sum();
        self.largest_bytes = self.largest_bytes.max(bytes);
        for &msg in events {
            self.on_event(msg);
        }
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        let reply = match msg.name.as_str() {
            "order" => format!("{} {:?} {:?}", self.in_order, self.last, self.marked_at),
            "mark" => {
                self.marked_at = Some(self.seen);
                return None;
            }
            "batches" => format!("{} {}", self.batches, self.largest),
            "batch-bytes" => self.largest_bytes.to_string(),
            _ => self.seen.to_string(),
        };
        Some(reply.into_bytes())
    }
}

covey_guest::export_script!(Sink);
