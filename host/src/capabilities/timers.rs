//! `covey:script/timers`: one-shot and repeating timers per instance.
//!
//! Each timer is a tokio task that posts into the script's mailbox, so timer
//! callbacks are serialised with every other callback of the script. All of
//! an instance's timers are aborted when its store is dropped (reload,
//! restart, stop); a stale firing already queued is recognised by its
//! generation and ignored.

use std::collections::HashMap;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::LimitExceeded;
use crate::bindings::covey::script::timers as wit;
use crate::router::{Delivery, MailboxTx};

/// Timers one script may have at once; more is almost certainly a leak.
pub const MAX_TIMERS: usize = 10_000;

pub struct TimersCtx {
    generation: u64,
    mailbox: MailboxTx,
    next_id: u64,
    timers: HashMap<u64, Timer>,
}

struct Timer {
    task: JoinHandle<()>,
    repeating: bool,
}

impl TimersCtx {
    /// Is `id` live? Called before delivering a firing.
    pub fn is_live(&self, id: u64) -> bool {
        self.timers.contains_key(&id)
    }

    /// After `on-timer` returned: forget one-shot timers and repeating
    /// timers whose callback asked to stop.
    pub fn fired(&mut self, id: u64, keep: bool) {
        if let Some(t) = self.timers.get(&id)
            && (!t.repeating || !keep)
        {
            self.cancel_timer(id);
        }
    }

    pub fn count(&self) -> usize {
        self.timers.len()
    }

    fn start(&mut self, ms: u32, repeating: bool) -> Result<u64, LimitExceeded> {
        if self.timers.len() >= MAX_TIMERS {
            return Err(LimitExceeded::new("timers", MAX_TIMERS));
        }
        let id = self.next_id;
        self.next_id += 1;
        let mailbox = self.mailbox.clone();
        let generation = self.generation;
        let period = Duration::from_millis(ms.max(u32::from(repeating)).into());
        let task = tokio::spawn(async move {
            if repeating {
                let mut interval =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    if !mailbox.send(Delivery::Timer { generation, id }).await {
                        break;
                    }
                }
            } else {
                tokio::time::sleep(period).await;
                mailbox.send(Delivery::Timer { generation, id }).await;
            }
        });
        self.timers.insert(id, Timer { task, repeating });
        Ok(id)
    }

    fn cancel_timer(&mut self, id: u64) -> bool {
        match self.timers.remove(&id) {
            Some(t) => {
                t.task.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for TimersCtx {
    fn drop(&mut self) {
        for (_, t) in self.timers.drain() {
            t.task.abort();
        }
    }
}

impl Capability for TimersCtx {
    fn new(env: &ScriptEnv) -> Self {
        TimersCtx {
            generation: env.generation,
            mailbox: env.mailbox.clone(),
            next_id: 1,
            timers: HashMap::new(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl wit::Host for TimersCtx {
    async fn after(&mut self, ms: u32) -> Result<u64, LimitExceeded> {
        self.start(ms, false)
    }

    async fn every(&mut self, ms: u32) -> Result<u64, LimitExceeded> {
        self.start(ms, true)
    }

    async fn cancel(&mut self, id: u64) -> bool {
        self.cancel_timer(id)
    }
}
