//! Covey host: runs sandboxed WebAssembly scripts and lets them talk.
//!
//! Module map (data paths: watcher → supervisor → instance;
//! instance → router → instance; instance → router → cluster → network;
//! network → cluster → router → instance):
//!
//! - [`config`] — command line, `COVEY_*` environment and YAML file, merged.
//! - [`exec`] — `covey exec`: run one script once, output to the terminal.
//! - [`compile`] — `covey compile`: precompile a component for a Pi.
//! - [`node`] — one running host, wiring everything below together.
//! - [`engine`] — the wasmtime engine (memory layout and allocator chosen
//!   by the address space, Cranelift or Pulley by target, epoch ticker),
//!   the on-disk cache of compiled components and precompiled artifacts.
//! - [`bindings`] — host bindings generated from `wit/covey.wit`.
//! - [`capabilities`] — one module per WIT interface (log, node, events, kv,
//!   timers, config, http, lua-source) plus the sandboxed WASI; each owns
//!   its per-instance state, links itself and is registered by one line.
//! - [`grants`] — which capabilities beyond the base API the operator
//!   gives which scripts (config `grants:`).
//! - [`script`] — `ScriptSupervisor` (which scripts run, hot reload) and
//!   `ScriptInstance` (one store, one mailbox, CPU budget, crash restart).
//! - [`scriptdir`] — the rule for names in the scripts directory and file
//!   operations confined to it (what peers' manifest entries may touch).
//! - [`scriptsync`] — `ScriptsSync`: the scripts directory replicated (a
//!   manifest document + content-addressed blobs fetched from peers).
//! - [`watcher`] — debounced file-system notifications → supervisor (and
//!   scripts sync).
//! - [`lifecycle`] — system events (`covey.node.up`, `covey.script.failed`,
//!   …): names, scopes, JSON payloads, the reserved `covey.` prefix (the
//!   `covey-lifecycle` crate in `lifecycle/`, shared with the guest SDK).
//! - [`router`] — subscriptions and delivery of events, commands, calls and
//!   key-value change notifications.
//! - [`cluster`] — QUIC links with mutual TLS to the other nodes,
//!   membership, mDNS discovery; the router's way to other nodes.
//! - [`devices`] — the firmware bridge beside the cluster: device
//!   registry (replicated), microcontrollers as the router's peers.
//! - [`control`] — the local control socket behind `covey status` and the
//!   operator's verbs (`covey emit|send|call|kv|nodes|logs|events`).
//! - [`http`] — the HTTP API (axum): the same verbs for other programs,
//!   Server-Sent Events streams, Prometheus metrics, the live dashboard.
//! - [`logring`] — the node's recent log lines in memory, for `covey logs`.
//! - [`memory`] — the process heap: glibc's thresholds for a small
//!   machine, freed memory given back, heap figures for the status.
//! - [`docstore`] — `DocStore`: an Automerge document in a file, durable
//!   writes, compaction, recovery; under the key-value store and the
//!   scripts manifest.
//! - [`docsync`] — `DocReplicator`: a document kept in sync with every peer.
//! - [`kvdoc`] — the key-value store (keys, counters, limits) on a `DocStore`.
//! - [`pattern`] — esc-style `*` patterns.
//! - [`files`] — crash-safe whole-file writes; owner-only directories; hex.
//! - [`clock`] — wall-clock milliseconds (`now_ms`), a leaf.
//! - [`logtext`] — outside text made safe for a log line (`for_log`), a leaf.
//! - [`random`] — random bytes and ids, from the system's source.
//! - `fuzz` — fuzz targets (peer frames, manifest entries, sync messages,
//!   config files, the WIT boundary), shared by `host/fuzz` and the corpus
//!   replay test.
//! - [`shutdown`] — SIGINT/SIGTERM.

pub mod bindings;
pub mod capabilities;
pub mod clock;
pub mod cluster;
pub mod compile;
pub mod config;
pub mod control;
pub mod devices;
pub mod docstore;
pub mod docsync;
pub mod engine;
pub mod exec;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod grants;
pub mod http;
pub mod kvdoc;
pub mod logring;
pub mod logtext;
pub mod memory;
pub mod node;
pub mod pattern;
pub mod random;
pub mod router;
pub mod script;
pub mod scriptdir;
pub mod scriptsync;
pub mod services;
pub mod shutdown;
pub mod watcher;

pub use config::NodeConfig;
/// System events: the `covey-lifecycle` crate, shared with the guest SDK.
pub use covey_lifecycle as lifecycle;
pub use node::Node;
