//! Waiting for the signal to stop (SIGINT or SIGTERM).

use std::future::Future;

/// Starts listening at once — a signal that arrives before the returned
/// future is awaited (say, while the node is still starting) is not lost —
/// and resolves on Ctrl-C (SIGINT) or SIGTERM. Call inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
