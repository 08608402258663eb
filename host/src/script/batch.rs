//! Batched event delivery: the `on-events` export and how big a batch may
//! be.
//!
//! Entering a component costs more than lowering one message into it
//! (a fiber switch, the CPU-budget reset, trap handling), so when events
//! wait in a script's mailbox the instance hands over many in one call.
//! The budget still has to mean what it says — a runaway handler is
//! stopped soon, a handler that fits the budget alone is never stopped
//! for sharing a batch — so a batch is sized from the script's recent
//! cost per event to need at most an eighth of the budget, and runs under
//! twice the budget: any one event of it may take a whole budget.

use std::time::Duration;

use wasmtime::component::{Func, Instance};
use wasmtime::{Result, Store};

use crate::bindings::covey::script::types::EventHead;
use crate::capabilities::ScriptState;
use crate::router::Message;

/// The most events one `on-events` call carries.
pub const MAX_BATCH: usize = 256;

/// A batch takes no further event once its strings and payloads reach
/// this many bytes: the batch is copied into the guest's memory at once,
/// and 256 large payloads could exceed the script's memory cap.
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// A batch is sized to need at most 1/`BUDGET_SHARE` of the budget.
const BUDGET_SHARE: u64 = 8;

/// How many events the next batch may hold, from what events cost lately.
#[derive(Debug)]
pub struct BatchSize {
    /// Recent cost per event, ns (an average weighing the last few
    /// deliveries most).
    per_event_ns: u64,
    budget_ns: u64,
}

impl BatchSize {
    /// Starts at one event a call until the script's events show they are
    /// quick: a script is not trusted to fit many in a budget before that.
    pub fn new(budget: Duration) -> Self {
        let budget_ns = budget.as_nanos().max(1) as u64;
        BatchSize {
            per_event_ns: budget_ns / BUDGET_SHARE,
            budget_ns,
        }
    }

    /// Events the next call may carry (1 to [`MAX_BATCH`]).
    pub fn limit(&self) -> usize {
        let fit = self.budget_ns / (BUDGET_SHARE * self.per_event_ns.max(1));
        (fit as usize).clamp(1, MAX_BATCH)
    }

    /// A delivery of `events` events took `took`.
    pub fn record(&mut self, events: usize, took: Duration) {
        if events == 0 {
            return;
        }
        let sample = took.as_nanos() as u64 / events as u64;
        // A quarter of the way to each sample: from the starting guess to
        // full batches in ~20 quick deliveries, back to one event a call
        // after one slow one.
        self.per_event_ns = (3 * self.per_event_ns + sample).div_ceil(4);
    }
}

/// The script's `on-events` export (every component of this WIT version
/// has it: the bindings checked the world when the code was linked).
pub fn on_events_export(store: &mut Store<ScriptState>, instance: &Instance) -> Result<Func> {
    instance
        .get_func(&mut *store, "on-events")
        .ok_or_else(|| wasmtime::format_err!("the component does not export `on-events`"))
}

/// The two buffers of an `on-events` call (WIT 0.5.0's layout: one head
/// per event, every string and payload of the batch in one byte buffer),
/// kept by the instance and reused from batch to batch. Lowering a string
/// or a list is a call into the guest's allocator plus a lookup of its
/// memory per field; this way a batch makes two such calls, not four per
/// event.
#[derive(Default)]
pub struct Buffers {
    heads: Vec<EventHead>,
    bytes: Vec<u8>,
}

impl Buffers {
    /// Lay `msgs` out; the buffers keep their capacity, up to a bound.
    fn fill(&mut self, msgs: &[Message]) -> Result<()> {
        if self.bytes.capacity() > 4 * MAX_BATCH_BYTES {
            self.bytes = Vec::new();
        }
        self.heads.clear();
        self.bytes.clear();
        for m in msgs {
            self.heads.push(EventHead {
                id: m.id,
                timestamp_ms: m.timestamp_ms,
                from_len: len32(m.from.len())?,
                to_len: len32(m.to.len())?,
                name_len: len32(m.name.len())?,
                payload_len: len32(m.payload.len())?,
            });
            self.bytes.extend_from_slice(m.from.as_bytes());
            self.bytes.extend_from_slice(m.to.as_bytes());
            self.bytes.extend_from_slice(m.name.as_bytes());
            self.bytes.extend_from_slice(&m.payload);
        }
        Ok(())
    }
}

/// The bytes `msg` takes in a batch's byte buffer (what `MAX_BATCH_BYTES`
/// counts).
pub fn laid_out_len(msg: &Message) -> usize {
    msg.from.len() + msg.to.len() + msg.name.len() + msg.payload.len()
}

/// A field length as the head's `u32` (peers' frames and local payloads
/// are far below 4 GiB; this is the check that says so).
fn len32(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| wasmtime::format_err!("an event field of {n} bytes"))
}

/// Call `on-events` with `msgs`, laid out in `buffers`.
pub async fn call_on_events(
    store: &mut Store<ScriptState>,
    func: Func,
    msgs: &[Message],
    buffers: &mut Buffers,
) -> Result<()> {
    buffers.fill(msgs)?;
    // The type check walks the signature once per batch, not per event.
    let typed = func.typed::<(&[EventHead], &[u8]), ()>(&*store)?;
    typed
        .call_async(store, (&buffers.heads, &buffers.bytes))
        .await
}

/// The guests' reader of the layout (the Rust SDK's and the Lua guest's),
/// so that writer and reader are tested against each other.
#[cfg(test)]
#[path = "../../../guest-sdk/src/batch.rs"]
mod split;

/// Lengths alone (id and timestamp 0), for tests of the reader's bounds.
#[cfg(test)]
impl split::Head for [u32; 4] {
    fn id(&self) -> u64 {
        0
    }
    fn timestamp_ms(&self) -> u64 {
        0
    }
    fn lens(&self) -> [u32; 4] {
        *self
    }
}

#[cfg(test)]
split::impl_for_bindings!(split, EventHead, Message);

#[cfg(test)]
mod tests {
    use super::*;

    use super::split;

    fn message(id: u64, from: &str, name: &str, payload: &[u8]) -> Message {
        Message {
            id,
            from: from.into(),
            to: "*".into(),
            name: name.into(),
            payload: payload.to_vec().into(),
            timestamp_ms: 1_700_000_000_000 ^ id,
        }
    }

    #[test]
    fn a_batch_reads_back_as_the_messages_it_was_made_of() {
        let big = vec![0xA5; 70_000];
        let msgs = [
            message(1, "n1", "temp", b"21.5"),
            message(2, "pi-k\u{fc}che/esp32", "", b""),
            message(u64::MAX, "", "\u{1F321}.reading", &big),
            message(4, "n2", "bin", &[0, 255, 10, 13]),
        ];
        let mut bufs = Buffers::default();
        // Twice: the reused buffers hold only the second batch.
        bufs.fill(&msgs[..1]).unwrap();
        bufs.fill(&msgs).unwrap();
        assert_eq!(bufs.heads.len(), msgs.len());
        let mut reader = split::Split::new(&bufs.bytes);
        for (h, m) in bufs.heads.iter().zip(&msgs) {
            assert_eq!(reader.next(h).unwrap(), split::Event::from(m));
        }
        // Nothing left over: the next read of even one byte fails.
        assert!(reader.next(&[0, 0, 0, 1]).is_err());
        assert!(reader.next(&[0, 0, 0, 0]).is_ok());
    }

    #[test]
    fn a_reader_refuses_lengths_past_the_end_and_bad_utf8() {
        let bytes = b"n1*tempxx\xff\xfe";
        let mut r = split::Split::new(bytes);
        let e = r.next(&[2, 1, 4, 100]).unwrap_err();
        assert!(e.contains("run past"), "{e}");
        let e = r
            .next(&[u32::MAX, u32::MAX, u32::MAX, u32::MAX])
            .unwrap_err();
        assert!(e.contains("run past"), "{e}");
        let mut r = split::Split::new(bytes);
        assert_eq!(r.next(&[2, 1, 4, 2]).unwrap().name, "temp");
        let e = r.next(&[2, 0, 0, 0]).unwrap_err();
        assert!(e.contains("string"), "{e}");
        // A whole batch: the events before a bad one arrive, the error
        // counts the rest.
        let heads = [[2, 1, 4, 2], [2, 0, 0, 0], [0, 0, 0, 0]];
        let (seen, e) = split::collect(&heads, bytes);
        let e = e.unwrap_err();
        assert_eq!(seen.iter().map(|e| e.name).collect::<Vec<_>>(), ["temp"]);
        assert!(
            e.contains("string") && e.contains("last 2 events dropped"),
            "{e}"
        );
    }

    const BUDGET: Duration = Duration::from_millis(50);

    #[test]
    fn starts_at_one_and_grows_only_with_quick_events() {
        let mut size = BatchSize::new(BUDGET);
        assert_eq!(size.limit(), 1);
        for _ in 0..30 {
            size.record(size.limit(), Duration::from_micros(size.limit() as u64));
        }
        assert_eq!(size.limit(), MAX_BATCH);
    }

    #[test]
    fn one_slow_event_shrinks_the_next_batch_and_the_batch_fits_the_budget() {
        let mut size = BatchSize::new(BUDGET);
        for _ in 0..30 {
            size.record(MAX_BATCH, Duration::from_micros(MAX_BATCH as u64));
        }
        size.record(1, Duration::from_millis(20));
        let after = size.limit();
        assert!(after < 4, "{after}");
        // Whatever the history, a batch's expected time is within its share.
        for per_event_us in [1u64, 10, 100, 1_000, 6_000, 50_000] {
            let mut size = BatchSize::new(BUDGET);
            for _ in 0..40 {
                size.record(1, Duration::from_micros(per_event_us));
            }
            let n = size.limit() as u64;
            assert!(
                n == 1 || n * per_event_us * 1_000 <= BUDGET.as_nanos() as u64 / BUDGET_SHARE,
                "{per_event_us} us/event -> batches of {n}"
            );
        }
    }

    #[test]
    fn slow_scripts_get_one_event_a_call() {
        let mut size = BatchSize::new(BUDGET);
        for _ in 0..40 {
            size.record(1, Duration::from_millis(5));
        }
        assert_eq!(size.limit(), 1);
    }
}
