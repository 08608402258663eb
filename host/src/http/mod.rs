//! The HTTP API: the operator's verbs for other programs — webhooks
//! pushing events in, dashboards, scripts in other languages, Prometheus.
//! Same operations as the control socket ([`crate::control::ops`]); the
//! routes are in [`routes`], the reference in `docs/http-api.md`.
//!
//! Off unless configured (`http: 127.0.0.1:7467`). On a loopback address
//! it needs no credentials (like the control socket: whoever is on this
//! machine); on any other address every request needs the bearer token
//! from `covey http token`, and the node refuses to start without one.
//! Either way, what a web page could make a browser send is refused first
//! ([`guard`]: a foreign `Host`, a request from another origin).
//! Bodies are capped at the cluster's payload limit, and a request that
//! takes longer than [`REQUEST_TIMEOUT`] to answer is cut off (streams are
//! not: their answer starts at once).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::control::StatusSource;
use crate::files;

pub mod guard;
mod metrics;
mod routes;

pub use guard::HostName;

pub const TOKEN_FILE: &str = "http-token";
/// Longest time to answer a request (a call's own timeout is capped below
/// it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(75);
/// Longest call timeout a client may ask for.
pub const MAX_CALL_TIMEOUT_MS: u64 = 60_000;

/// A bound HTTP API, not yet answering (bound before the node loads
/// anything, so a taken port or a missing token stops it at once).
pub struct HttpBinding {
    listener: TcpListener,
    token: Option<String>,
    hosts: Vec<HostName>,
}

/// An answering HTTP API; stops when dropped.
pub struct HttpServer {
    task: JoinHandle<()>,
    addr: SocketAddr,
}

impl HttpServer {
    /// Bind `addr`; besides its own addresses the API answers to `hosts`
    /// (names a reverse proxy forwards).
    pub async fn bind(
        addr: SocketAddr,
        hosts: Vec<HostName>,
        data_dir: &Path,
    ) -> Result<HttpBinding> {
        let token = load_token(data_dir)?;
        if !addr.ip().is_loopback() && token.is_none() {
            bail!(
                "the HTTP API on {addr} would be reachable from other machines without \
                 credentials: create its token first with `covey http token` (then send \
                 `Authorization: Bearer TOKEN`), or listen on 127.0.0.1"
            );
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP API to {addr}"))?;
        // On loopback the token is not asked for, even when one exists.
        let token = token.filter(|_| !addr.ip().is_loopback());
        Ok(HttpBinding {
            listener,
            token,
            hosts,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl HttpBinding {
    /// Answer for the node behind `source`.
    pub fn serve(self, source: Arc<StatusSource>) -> Result<HttpServer> {
        let addr = self.listener.local_addr()?;
        let guard = guard::Guard::new(addr, self.hosts);
        let app = routes::router(source, self.token, guard);
        let listener = self.listener;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("HTTP API stopped: {e}");
            }
        });
        tracing::info!("HTTP API on http://{addr}");
        Ok(HttpServer { task, addr })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// The API's bearer token, if one was made.
pub fn load_token(data_dir: &Path) -> Result<Option<String>> {
    let path = token_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_string())),
        Ok(_) => bail!(
            "{} is empty: delete it and run `covey http token`",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `covey http token`: the token, made (256 random bits, owner-only file)
/// if there is none yet. A running node reads it when it starts.
pub fn token_command(data_dir: &Path) -> Result<String> {
    if let Some(token) = load_token(data_dir)? {
        return Ok(token);
    }
    files::create_private_dir(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = files::hex(&crate::random::bytes::<32>());
    let path = token_path(data_dir);
    files::write_atomic(&path, format!("{token}\n").as_bytes(), files::Mode::Private)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}
