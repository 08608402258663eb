//! `ScriptInstance`: the task that owns one script's store and feeds it its
//! mailbox, one callback at a time.
//!
//! Each export call runs under a CPU budget counted in epoch ticks; every
//! tick the call yields to tokio (so a busy script never starves other
//! scripts or timers) and, past the budget, it is interrupted. A failed call
//! (trap, budget, host error) poisons the instance: it is dropped — which
//! aborts its timers — and re-instantiated after a backoff, while its old
//! subscriptions keep routing messages into the mailbox so none is lost.
//! A hot reload is the same swap with new code, requested over the control
//! channel; if the new code fails to start, the old instance keeps running.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wasmtime::{Result, Store, StoreContextMut, Trap, UpdateDeadline};

use crate::bindings::{CallError, Script, ScriptPre};
use crate::capabilities::log::LogRate;
use crate::capabilities::lua::LuaScript;
use crate::capabilities::{CpuBudget, ScriptEnv, ScriptState};
use crate::engine::EPOCH_TICK;
use crate::lifecycle::{self, ScriptEvent, StartKind};
use crate::router::{Delivery, MailboxRx, MailboxTx, Message, ScriptId};
use crate::services::Services;

use super::batch::{self, BatchSize};

/// Compiled and linked code of one version of a script.
pub struct LoadedScript {
    pub pre: ScriptPre<ScriptState>,
    pub hash: blake3::Hash,
    /// For `.lua` scripts (run by the built-in Lua guest): their source.
    pub lua: Option<LuaScript>,
}

/// Requests from the supervisor.
pub enum Control {
    /// Swap in new code; the old version keeps running if it fails to start.
    Replace {
        code: Arc<LoadedScript>,
        done: oneshot::Sender<Result<(), String>>,
    },
    Stop,
}

/// What `covey status` shows of a script.
#[derive(Clone, Debug, Default)]
pub struct ScriptStatus {
    pub running: bool,
    pub generation: u64,
    /// When the live generation started (ms since the Unix epoch).
    pub started_ms: u64,
    pub restarts: u64,
    pub last_error: Option<String>,
}

/// A script's counters across its generations, updated on every delivery
/// without a lock (read by `covey scripts` and the metrics).
#[derive(Debug, Default)]
pub struct ScriptCounters {
    /// Deliveries taken from the mailbox (handled, or skipped as stale).
    pub handled: AtomicU64,
    /// Time spent in callbacks, ns: CPU time, plus what a callback waits
    /// for (a call to another node).
    pub busy_ns: AtomicU64,
    /// Linear memory of the live generation, bytes.
    pub memory_bytes: AtomicU64,
    /// Deliveries by how long they took: slot `i` counts those within
    /// [`DURATION_BUCKETS`]`[i]` seconds and above the bound before; the
    /// last slot, those above every bound.
    pub durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    /// Failures (a generation dropped) by kind, see [`failure_kind`].
    pub failures: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// Upper bounds, in seconds, of the callback duration histogram.
pub const DURATION_BUCKETS: [f64; 10] = [1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

impl ScriptCounters {
    fn count_failure(&self, err: &wasmtime::Error) {
        *self
            .failures
            .lock()
            .unwrap()
            .entry(failure_kind(err))
            .or_default() += 1;
    }
}

/// `init` gets this many times the per-callback CPU budget.
pub const INIT_BUDGET_FACTOR: u32 = 10;

/// The error a call fails with when it runs out of CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("CPU budget of {0:?} per call exceeded")]
pub struct BudgetExceeded(Duration);

/// A running generation of a script.
pub struct Live {
    store: Store<ScriptState>,
    bindings: Script,
    on_events: wasmtime::component::Func,
    generation: u64,
    since: Instant,
}

pub struct ScriptInstance {
    script: ScriptId,
    services: Arc<Services>,
    mailbox_tx: MailboxTx,
    mailbox: MailboxRx,
    batch_size: BatchSize,
    /// `on-events`' two buffers, reused.
    batch_buffers: batch::Buffers,
    control: mpsc::UnboundedReceiver<Control>,
    code: Arc<LoadedScript>,
    live: Option<Live>,
    next_generation: u64,
    consecutive_failures: u32,
    restart_at: Option<Instant>,
    status: Arc<Mutex<ScriptStatus>>,
    counters: Arc<ScriptCounters>,
    log_rate: Arc<LogRate>,
}

/// Deliveries handled per wake-up before control requests are looked at.
const PER_WAKEUP: usize = 256;
/// A generation that ran this long without failing resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

impl ScriptInstance {
    pub fn new(
        script: ScriptId,
        services: Arc<Services>,
        code: Arc<LoadedScript>,
        mailbox: (MailboxTx, MailboxRx),
        control: mpsc::UnboundedReceiver<Control>,
        status: (Arc<Mutex<ScriptStatus>>, Arc<ScriptCounters>),
        log_rate: Arc<LogRate>,
    ) -> Self {
        let batch_size = BatchSize::new(services.limits.cpu_budget);
        ScriptInstance {
            script,
            services,
            mailbox_tx: mailbox.0,
            mailbox: mailbox.1,
            batch_size,
            batch_buffers: batch::Buffers::default(),
            control,
            code,
            live: None,
            next_generation: 1,
            consecutive_failures: 0,
            restart_at: None,
            status: status.0,
            counters: status.1,
            log_rate,
        }
    }

    /// Run until stopped. `started` learns whether the first `init` worked.
    pub async fn run(mut self, started: oneshot::Sender<Result<(), String>>) {
        let first = self.start_code(self.code.clone(), StartKind::Loaded).await;
        if let Err(e) = &first {
            self.schedule_restart("init", e);
        }
        let _ = started.send(first);
        loop {
            let restart_at = self.restart_at;
            tokio::select! {
                biased;
                ctl = self.control.recv() => match ctl {
                    Some(Control::Replace { code, done }) => {
                        let r = self.start_code(code.clone(), StartKind::Reloaded).await;
                        match &r {
                            Ok(()) => self.code = code,
                            // The running version (if any) stays.
                            Err(e) => self.announce_failure(&code, "init", e, None),
                        }
                        let _ = done.send(r);
                    }
                    Some(Control::Stop) | None => break,
                },
                // Disabled unless a restart is pending (the sleep is then never polled).
                _ = tokio::time::sleep_until(restart_at.unwrap_or_else(Instant::now)), if restart_at.is_some() && self.live.is_none() => {
                    self.restart_at = None;
                    if let Err(e) = self.start_code(self.code.clone(), StartKind::Restarted).await {
                        self.schedule_restart("init", &e);
                    }
                }
                d = self.mailbox.recv(), if self.live.is_some() => {
                    let Some(d) = d else { break };
                    self.drain(d).await;
                }
            }
        }
        self.live = None;
        self.services.router.unregister(&self.script);
        self.status.lock().unwrap().running = false;
        tracing::info!(script = &*self.script, "script stopped");
        let event = self.event(&self.code, None);
        (self.services.router).emit_system(lifecycle::SCRIPT_STOPPED, lifecycle::payload(&event));
    }

    /// A `covey.script.*` payload about version `code` of this script.
    fn event(&self, code: &LoadedScript, start: Option<StartKind>) -> ScriptEvent {
        ScriptEvent {
            node: self.services.router.node_name().to_string(),
            script: self.script.to_string(),
            version: code.hash.to_hex().to_string(),
            restarts: self.status.lock().unwrap().restarts,
            start,
            callback: None,
            error: None,
            retry_in_ms: None,
        }
    }

    /// `covey.script.failed` for version `code`.
    fn announce_failure(
        &self,
        code: &LoadedScript,
        callback: &str,
        error: &str,
        retry: Option<Duration>,
    ) {
        let event = ScriptEvent {
            callback: Some(callback.to_string()),
            error: Some(error.to_string()),
            retry_in_ms: retry.map(|d| d.as_millis() as u64),
            ..self.event(code, None)
        };
        (self.services.router).emit_system(lifecycle::SCRIPT_FAILED, lifecycle::payload(&event));
    }

    /// Instantiate `code` as a new generation and run its `init`. On
    /// success it replaces the live generation (if any) atomically; on
    /// failure nothing changes.
    async fn start_code(
        &mut self,
        code: Arc<LoadedScript>,
        start: StartKind,
    ) -> Result<(), String> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let env = ScriptEnv {
            script: self.script.clone(),
            generation,
            services: self.services.clone(),
            mailbox: self.mailbox_tx.clone(),
            lua: code.lua.clone(),
            log_rate: self.log_rate.clone(),
        };
        match instantiate(env, &code).await {
            Ok(live) => {
                self.services
                    .router
                    .retire_other_generations(&self.script, generation);
                let memory = live.store.data().limits.memory_bytes as u64;
                self.counters.memory_bytes.store(memory, Ordering::Relaxed);
                self.live = Some(live); // drops the previous generation
                self.restart_at = None;
                {
                    let mut st = self.status.lock().unwrap();
                    st.running = true;
                    st.generation = generation;
                    st.started_ms = crate::clock::now_ms();
                }
                let event = self.event(&code, Some(start));
                (self.services.router)
                    .emit_system(lifecycle::SCRIPT_STARTED, lifecycle::payload(&event));
                Ok(())
            }
            Err(err) => {
                self.services
                    .router
                    .drop_generation(&self.script, generation);
                let msg = describe_failure(&err);
                self.counters.count_failure(&err);
                self.status.lock().unwrap().last_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Deliver `first` and whatever follows it in the mailbox, up to
    /// [`PER_WAKEUP`] deliveries; runs of events go in batches.
    async fn drain(&mut self, first: Delivery) {
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(d) = next.take() {
            match d {
                Delivery::Event { msg, generation } => {
                    let room = PER_WAKEUP.saturating_sub(taken).max(1);
                    let (batch, skipped) = self.collect_events(msg, generation, room);
                    taken += batch.len() + skipped;
                    self.deliver_events(batch, skipped).await;
                }
                other => {
                    taken += 1;
                    self.deliver(other).await;
                }
            }
            // A stop or reload waits for no backlog: each delivery may wait
            // on an fsync (a KV write) or a peer, and the watcher waits on
            // the stop.
            if self.live.is_none() || !self.control.is_empty() || taken >= PER_WAKEUP {
                return;
            }
            next = self.mailbox.try_recv();
        }
    }

    /// `first` and the events right behind it in the mailbox, as many as
    /// the batch size and `room` allow, without those for an older
    /// generation's subscription the live one no longer has (counted as
    /// skipped). A delivery that is not an event ends the run, still queued.
    fn collect_events(
        &mut self,
        first: Message,
        generation: u64,
        room: usize,
    ) -> (Vec<Message>, usize) {
        let Some(live) = self.live.as_ref() else {
            return (Vec::new(), 1);
        };
        let limit = self.batch_size.limit().min(room);
        let mut bytes = batch::laid_out_len(&first);
        let mut batch = Vec::with_capacity(limit);
        let mut skipped = 0;
        let mut add = |d| match d {
            Delivery::Event { msg, generation } if live.wants_event(&msg, generation) => {
                batch.push(msg)
            }
            _ => skipped += 1,
        };
        add(Delivery::Event {
            msg: first,
            generation,
        });
        // The run ends at the first delivery that is not an event, which
        // stays queued for `drain`.
        let wanted = |d: &Delivery| match d {
            Delivery::Event { msg, .. } if bytes < batch::MAX_BATCH_BYTES => {
                bytes += batch::laid_out_len(msg);
                true
            }
            _ => false,
        };
        self.mailbox.take_while(limit - 1, wanted, &mut add);
        (batch, skipped)
    }

    /// Hand `batch` to the script: `on-event` for one, `on-events` for more.
    async fn deliver_events(&mut self, mut batch: Vec<Message>, skipped: usize) {
        let started = std::time::Instant::now();
        let n = batch.len();
        let result = match (n, self.live.as_mut()) {
            (0, _) | (_, None) => None,
            (1, Some(live)) => {
                let generation = live.generation;
                let msg = batch.pop().expect("one event");
                self.invoke(Delivery::Event { msg, generation }).await
            }
            (_, Some(live)) => {
                arm(&mut live.store, self.services.limits.cpu_budget * 2);
                let bufs = &mut self.batch_buffers;
                let r = batch::call_on_events(&mut live.store, live.on_events, &batch, bufs).await;
                Some(("on-events", r))
            }
        };
        let took = started.elapsed();
        if let Some(result) = result {
            self.settle(result);
            self.batch_size.record(n, took);
        }
        self.account(n + skipped, took);
    }

    /// Hand one delivery (not an event) to the script.
    async fn deliver(&mut self, d: Delivery) {
        let started = std::time::Instant::now();
        if let Some(result) = self.invoke(d).await {
            self.settle(result);
        }
        self.account(1, started.elapsed());
    }

    /// The counters after `n` deliveries that took `took` together.
    fn account(&self, n: usize, took: Duration) {
        let c = &self.counters;
        c.handled.fetch_add(n as u64, Ordering::Relaxed);
        c.busy_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let each = took.as_secs_f64() / n.max(1) as f64;
        let bucket = (DURATION_BUCKETS.iter())
            .position(|&b| each <= b)
            .unwrap_or(DURATION_BUCKETS.len());
        c.durations[bucket].fetch_add(n as u64, Ordering::Relaxed);
        if let Some(live) = &self.live {
            let memory = live.store.data().limits.memory_bytes as u64;
            c.memory_bytes.store(memory, Ordering::Relaxed);
        }
        let stats = &self.services.router.stats;
        stats.handled.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Run the callback for `d`, unless it is stale (for a generation,
    /// watch or timer that is gone): which callback, and how it went.
    async fn invoke(&mut self, d: Delivery) -> Option<(&'static str, Result<()>)> {
        let budget = self.services.limits.cpu_budget;
        let live = self.live.as_mut()?;
        Some(match d {
            Delivery::Event { msg, generation } => {
                if !live.wants_event(&msg, generation) {
                    return None;
                }
                let store = &mut live.store;
                arm(store, budget);
                let r = live
                    .bindings
                    .call_on_event(&mut *store, &msg.to_wit())
                    .await;
                ("on-event", r)
            }
            Delivery::Command {
                msg,
                generation,
                reply,
            } => {
                let store = &mut live.store;
                if generation != live.generation && !store.data().events.wants_command(&msg) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(CallError::NoHandler(format!(
                            "`{}` no longer handles `{}`",
                            self.script, msg.name
                        ))));
                    }
                    return None;
                }
                arm(store, budget);
                let r = live
                    .bindings
                    .call_on_command(&mut *store, &msg.to_wit())
                    .await;
                let outcome = match &r {
                    Ok(Some(p)) => Ok(p.clone()),
                    Ok(None) => Err(CallError::NoReply),
                    Err(e) => Err(CallError::HandlerFailed(format!(
                        "`{}` failed: {}",
                        self.script,
                        describe_failure(e)
                    ))),
                };
                if let Some(reply) = reply {
                    let _ = reply.send(outcome);
                }
                ("on-command", r.map(drop))
            }
            Delivery::KvChange { watch, key, value } => {
                let store = &mut live.store;
                if !store.data().kv.is_watching(watch) {
                    return None;
                }
                arm(store, budget);
                let value = value.map(|v| v.to_vec());
                let r = (live.bindings)
                    .call_on_kv_change(&mut *store, &key, value.as_ref())
                    .await;
                ("on-kv-change", r)
            }
            Delivery::Timer { generation, id } => {
                let store = &mut live.store;
                if generation != live.generation || !store.data().timers.is_live(id) {
                    return None;
                }
                arm(store, budget);
                let r = live.bindings.call_on_timer(&mut *store, id).await;
                if let Ok(keep) = r {
                    store.data_mut().timers.fired(id, keep);
                }
                ("on-timer", r.map(drop))
            }
        })
    }

    /// After a callback: a failure drops the generation and schedules its
    /// restart.
    fn settle(&mut self, (callback, result): (&'static str, Result<()>)) {
        let Err(err) = result else { return };
        let msg = describe_failure(&err);
        self.counters.count_failure(&err);
        tracing::debug!(script = &*self.script, "failure detail: {err:?}");
        if let Some(live) = self.live.take()
            && live.since.elapsed() > HEALTHY_AFTER
        {
            self.consecutive_failures = 0;
        }
        self.schedule_restart(callback, &msg);
    }

    /// Log the failure and arm the restart timer with exponential backoff:
    /// immediately the first time, then 100 ms doubling up to 30 s.
    fn schedule_restart(&mut self, callback: &str, msg: &str) {
        self.consecutive_failures += 1;
        let n = self.consecutive_failures;
        let delay = if n <= 1 {
            Duration::ZERO
        } else {
            Duration::from_millis(100u64 << (n - 2).min(9)).min(Duration::from_secs(30))
        };
        tracing::error!(
            script = &*self.script,
            callback,
            failures = n,
            "script failed: {msg}; restarting in {delay:?}"
        );
        {
            let mut st = self.status.lock().unwrap();
            st.running = false;
            st.restarts += 1;
            st.last_error = Some(format!("{callback}: {msg}"));
        }
        self.restart_at = Some(Instant::now() + delay);
        self.announce_failure(&self.code, callback, msg, Some(delay));
    }
}

impl Live {
    /// Whether an event a subscription of `generation` matched is still
    /// for this generation (its own, or one it subscribes to as well).
    fn wants_event(&self, msg: &Message, generation: u64) -> bool {
        generation == self.generation || self.store.data().events.wants_event(msg)
    }
}

/// Build a store for `env`, instantiate `code` in it and run `init`.
pub async fn instantiate(env: ScriptEnv, code: &LoadedScript) -> Result<Live> {
    // Instantiating and `init` build the script's whole state (for a Lua
    // script: a Lua state, the standard library, the file parsed and run),
    // a one-off cost well above a callback's.
    let budget = env.services.limits.cpu_budget * INIT_BUDGET_FACTOR;
    let generation = env.generation;
    let engine = code.pre.engine();
    let mut store = Store::new(engine, ScriptState::new(env));
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(budget_tick);
    arm(&mut store, budget);
    let instance = code
        .pre
        .instance_pre()
        .instantiate_async(&mut store)
        .await?;
    let bindings = Script::new(&mut store, &instance)?;
    let on_events = batch::on_events_export(&mut store, &instance)?;
    arm(&mut store, budget);
    bindings
        .call_init(&mut store)
        .await?
        .map_err(|e| wasmtime::format_err!("init returned an error: {e}"))?;
    Ok(Live {
        store,
        bindings,
        on_events,
        generation,
        since: Instant::now(),
    })
}

/// Reset the CPU budget before an export call.
fn arm(store: &mut Store<ScriptState>, budget: Duration) {
    let ticks = budget.as_millis().div_ceil(EPOCH_TICK.as_millis()).max(1) as u32;
    store.data_mut().budget = CpuBudget {
        used_ticks: 0,
        max_ticks: ticks,
        budget,
    };
    store.set_epoch_deadline(1);
}

/// Called by wasmtime each epoch tick while the script runs: yield to tokio
/// through `yield_now` (wasmtime's built-in yield can starve tokio timers),
/// or stop the call once its budget is spent.
fn budget_tick(mut ctx: StoreContextMut<'_, ScriptState>) -> Result<UpdateDeadline> {
    let state = ctx.data_mut();
    state.budget.used_ticks += 1;
    if state.budget.used_ticks >= state.budget.max_ticks {
        return Err(wasmtime::Error::new(BudgetExceeded(state.budget.budget)));
    }
    Ok(UpdateDeadline::YieldCustom(
        1,
        Box::pin(tokio::task::yield_now()),
    ))
}

/// What kind of failure `err` is, for the metrics: `cpu_budget`, a trap's
/// kind (`unreachable` is also what an out-of-memory abort looks like),
/// or `host_error`.
pub fn failure_kind(err: &wasmtime::Error) -> &'static str {
    if err.downcast_ref::<BudgetExceeded>().is_some() {
        return "cpu_budget";
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::UnreachableCodeReached) => "unreachable",
        Some(Trap::MemoryOutOfBounds) => "memory_out_of_bounds",
        Some(Trap::StackOverflow) => "stack_overflow",
        Some(Trap::Interrupt) => "interrupt",
        Some(
            Trap::IntegerDivisionByZero | Trap::IntegerOverflow | Trap::BadConversionToInteger,
        ) => "arithmetic",
        Some(Trap::TableOutOfBounds | Trap::IndirectCallToNull | Trap::BadSignature) => "bad_call",
        Some(_) => "other_trap",
        None => "host_error",
    }
}

/// One line saying what went wrong: budget, trap kind, or the error chain.
pub fn describe_failure(err: &wasmtime::Error) -> String {
    if let Some(b) = err.downcast_ref::<BudgetExceeded>() {
        return b.to_string();
    }
    if let Some(trap) = err.downcast_ref::<Trap>() {
        let what = match trap {
            Trap::UnreachableCodeReached => {
                "wasm trap: unreachable (the script panicked or aborted, e.g. out of memory)"
                    .to_string()
            }
            other => format!("wasm trap: {other}"),
        };
        return what;
    }
    format!("{err:#}")
}
