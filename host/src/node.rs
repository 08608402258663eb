//! `Node`: one running Covey host — engine, router, key-value store,
//! supervisor and watcher wired together, and taken down in order.

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

use crate::clock::now_ms;
use crate::cluster::Cluster;
use crate::cluster::frame::DocId;
use crate::config::NodeConfig;
use crate::control::ControlSocket;
use crate::devices::DeviceService;
use crate::docstore::DocStore;
use crate::docsync::DocReplicator;
use crate::engine::{ComponentCache, EngineLimits, ScriptEngine};
use crate::kvdoc::KvDoc;
use crate::memory;
use crate::router::Router;
use crate::script::ScriptSupervisor;
use crate::scriptsync::ScriptsSync;
use crate::services::Services;
use crate::watcher::ScriptsWatcher;

pub struct Node {
    services: Arc<Services>,
    supervisor: Arc<ScriptSupervisor>,
    engine: ScriptEngine,
    watcher: Option<ScriptsWatcher>,
    cluster: Option<Cluster>,
    control: Option<ControlSocket>,
    http: Option<crate::http::HttpServer>,
    flusher: JoinHandle<()>,
    /// Background tasks stopped at shutdown (replication, the heap trimmer).
    tasks: Vec<JoinHandle<()>>,
    scripts_sync: Option<Arc<ScriptsSync>>,
    devices: Option<DeviceService>,
    /// Per replicated document (`kv`, `scripts`, `devices`): sync bytes.
    sync_counters: Vec<(&'static str, Arc<crate::docsync::SyncCounters>)>,
}

impl Node {
    /// Start a node: open the store, load every script, start watching.
    pub async fn start(cfg: NodeConfig) -> Result<Node> {
        memory::tune();
        open_data_dir(&cfg.data_dir)?;
        std::fs::create_dir_all(&cfg.scripts_dir)
            .with_context(|| format!("creating scripts directory {}", cfg.scripts_dir.display()))?;
        // First, so a second node on the same data directory stops here,
        // before it touches the store.
        let control = ControlSocket::bind(&cfg.data_dir)?;
        let http = match cfg.http {
            Some(addr) => {
                let hosts = cfg.http_hosts.clone();
                Some(crate::http::HttpServer::bind(addr, hosts, &cfg.data_dir).await?)
            }
            None => None,
        };
        let scripts_dir = cfg.scripts_dir.canonicalize()?;
        let engine = ScriptEngine::new(EngineLimits {
            memory_bytes: cfg.limits.memory_bytes,
            max_scripts: cfg.max_scripts,
            target: cfg.engine_target.clone(),
        })?;
        let cache = ComponentCache::new(engine.clone(), Some(cfg.data_dir.join("cache")))
            .with_precompiled(cfg.precompiled);
        let router = Arc::new(Router::new(&cfg.name, cfg.max_payload));
        let kv = Arc::new(KvDoc::open(
            Some(cfg.data_dir.join("kv.automerge")),
            cfg.kv,
            router.clone(),
        )?);
        let flusher = kv.spawn_flusher();
        let mut devices = DeviceService::start(
            router.clone(),
            Arc::new(DocStore::open(
                Some(cfg.data_dir.join(crate::devices::cli::REGISTRY_FILE)),
                "device registry",
            )?),
            &cfg.bridge,
        )
        .await?;
        let services = Arc::new(Services {
            router,
            kv,
            extras: cfg.extras.clone(),
            grants: cfg.grants.clone(),
            limits: cfg.limits.clone(),
            started_ms: now_ms(),
            console: None,
        });
        // The scripts directory is replicated when this node is in a cluster.
        let scripts_sync = match &cfg.cluster {
            Some(_) => Some(ScriptsSync::open(
                services.router.clone(),
                &scripts_dir,
                &cfg.data_dir,
            )?),
            None => None,
        };
        let supervisor = Arc::new(ScriptSupervisor::new(services.clone(), cache, scripts_dir)?);
        // Watch before the first scan, so a file written in between is not
        // missed (a double report is harmless: same hash, no reload).
        let watcher = if cfg.watch {
            Some(ScriptsWatcher::start(
                supervisor.clone(),
                scripts_sync.clone(),
            )?)
        } else {
            None
        };
        supervisor.scan().await;
        // Devices are heard from once the scripts that listen to them run
        // (a device's first events are not dropped with nobody subscribed).
        devices.open_transports(&services.router);
        // Join after the first scan: peers' calls find the handlers ready.
        let mut tasks = vec![memory::spawn_trimmer()];
        let mut scripts_sync_handle = None;
        let mut sync_counters = Vec::new();
        let cluster = match (cfg.cluster.clone(), scripts_sync) {
            (Some(c), Some(sync)) => {
                tasks.extend(sync.spawn());
                // What changed here while the node was off is recorded
                // before peers are asked for their changes.
                sync.rescan().await?;
                let kv_sync = DocReplicator::new(DocId::Kv, services.kv.clone());
                let manifest_sync = DocReplicator::new(DocId::Scripts, sync.clone());
                let device_sync = DocReplicator::new(DocId::Devices, devices.registry.clone());
                tasks.push(kv_sync.spawn());
                let acks = kv_sync.clone();
                tasks.push(services.kv.spawn_compactor(move |heads| {
                    let acks = acks.clone();
                    async move { acks.holding(&heads).await }
                }));
                tasks.push(manifest_sync.spawn());
                tasks.push(device_sync.spawn());
                sync_counters = vec![
                    ("kv", kv_sync.counters.clone()),
                    ("scripts", manifest_sync.counters.clone()),
                    ("devices", device_sync.counters.clone()),
                ];
                let cluster = Cluster::start(
                    c,
                    services.router.clone(),
                    vec![kv_sync, manifest_sync, device_sync],
                    Some(sync.clone()),
                )
                .await?;
                sync.set_cluster(cluster.clone());
                scripts_sync_handle = Some(sync);
                Some(cluster)
            }
            _ => {
                tasks.push(services.kv.spawn_compactor(|_| async { Vec::new() }));
                tracing::info!(
                    "no cluster token: running as a single node \
                     (`covey cluster init` / `covey cluster join` to form a cluster)"
                );
                None
            }
        };
        let mut node = Node {
            services,
            supervisor,
            engine,
            watcher,
            cluster,
            control: None,
            http: None,
            flusher,
            tasks,
            scripts_sync: scripts_sync_handle,
            devices: Some(devices),
            sync_counters,
        };
        let system = crate::control::fleet::NodeSystem {
            node: cfg.name.clone(),
            supervisor: Arc::downgrade(&node.supervisor),
            max_payload: node.services.router.max_payload(),
        };
        node.services.router.set_system(Arc::new(system));
        let source = Arc::new(node.status_source());
        node.control = Some(control.serve(source.clone()));
        if let Some(http) = http {
            node.http = Some(http.serve(source)?);
        }
        node.log_summary(&cfg).await;
        Ok(node)
    }

    /// The one start-up line: what runs, where to reach it.
    async fn log_summary(&self, cfg: &NodeConfig) {
        let scripts = self.supervisor.list().await;
        let failed = scripts.iter().filter(|s| s.state != "running").count();
        let cluster = match &self.cluster {
            Some(c) => format!("{} on {}", c.fingerprint(), c.local_addr()),
            None => "none (single node)".into(),
        };
        let http = self
            .http_addr()
            .map_or("off".into(), |a| format!("http://{a}/"));
        tracing::info!(
            node = cfg.name,
            cluster,
            scripts_running = scripts.len() - failed,
            scripts_failed = failed,
            http,
            scripts = %self.supervisor.dir().display(),
            data = %cfg.data_dir.display(),
            allocator = ?self.engine.allocator(),
            memory = ?self.engine.layout(),
            "node started"
        );
    }

    /// What `covey status` reads; holds no strong reference to the node.
    fn status_source(&self) -> crate::control::StatusSource {
        crate::control::StatusSource {
            router: self.services.router.clone(),
            supervisor: self.supervisor.clone(),
            kv: self.services.kv.clone(),
            scripts_sync: self.scripts_sync.clone(),
            cluster: self.cluster.clone(),
            devices: self.devices.as_ref().map(|d| crate::control::DevicesView {
                registry: d.registry.clone(),
                bridge: d.bridge.clone(),
                udp: d.udp,
            }),
            started_ms: self.services.started_ms,
            sync_counters: self.sync_counters.clone(),
        }
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    pub fn scripts_sync(&self) -> Option<&Arc<ScriptsSync>> {
        self.scripts_sync.as_ref()
    }

    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.services.router
    }

    pub fn kv(&self) -> &Arc<KvDoc> {
        &self.services.kv
    }

    pub fn supervisor(&self) -> &Arc<ScriptSupervisor> {
        &self.supervisor
    }

    /// The firmware bridge and the device registry.
    pub fn devices(&self) -> &DeviceService {
        self.devices.as_ref().expect("devices run until shutdown")
    }

    /// The HTTP API's address, when it listens.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(|h| h.local_addr())
    }

    pub fn engine(&self) -> &ScriptEngine {
        &self.engine
    }

    /// Stop watching, leave the cluster, stop every script, then flush the
    /// store.
    pub async fn shutdown(mut self) -> Result<()> {
        self.watcher.take();
        self.control.take();
        self.http.take();
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(d) = self.devices.take() {
            d.shutdown().await?;
        }
        if let Some(sync) = self.scripts_sync.take() {
            tokio::task::spawn_blocking(move || sync.flush()).await??;
        }
        self.supervisor.shutdown().await;
        self.flusher.abort();
        let kv = self.services.kv.clone();
        tokio::task::spawn_blocking(move || kv.flush()).await??;
        tracing::info!("node stopped");
        Ok(())
    }
}

/// Create the data directory owner-only, and take other accounts' access
/// off what an older Covey (or a hand) left readable in it: it holds the
/// device keys, the tokens and the whole store.
fn open_data_dir(dir: &std::path::Path) -> Result<()> {
    crate::files::create_private_dir(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let changed = crate::files::make_private(dir)
        .with_context(|| format!("making {} owner-only", dir.display()))?;
    if changed > 0 {
        tracing::warn!(
            "data directory {}: {changed} files and directories were readable by other \
             accounts; they are owner-only now",
            dir.display()
        );
    }
    Ok(())
}
