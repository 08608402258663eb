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

use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Func, Instance};
use wasmtime::{Result, Store};

use crate::bindings::covey::script::types::Message;
use crate::capabilities::ScriptState;

/// The most events one `on-events` call carries.
pub const MAX_BATCH: usize = 256;

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

/// Call `on-events` with `msgs`. The messages are lowered from behind
/// their `Arc`s (the router shares one message among its subscribers), which
/// the generated bindings, taking `&[Message]`, would need copies for.
pub async fn call_on_events(
    store: &mut Store<ScriptState>,
    func: Func,
    msgs: &[Arc<Message>],
) -> Result<()> {
    // The type check walks the signature once per batch, not per event.
    let typed = func.typed::<(&[Arc<Message>],), ()>(&*store)?;
    typed.call_async(store, (msgs,)).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
