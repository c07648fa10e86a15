//! Stopping cleanly on Ctrl-C or SIGTERM, for the binaries.

use std::future::Future;

/// Completes on Ctrl-C (SIGINT) or SIGTERM with the name of what came:
/// "interrupted" or "terminated". The handlers are installed when this is
/// called, not when it is first polled, so a signal sent right after (say,
/// as soon as a server says it is listening) is never missed. Must be
/// called inside a Tokio runtime.
pub fn on_signal() -> impl Future<Output = &'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                // No handler could be installed: never complete.
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => "interrupted",
            () = wait(terminate) => "terminated",
        }
    }
}

/// A stream of SIGHUPs (the conventional "reload"), or `None` if the
/// handler cannot be installed. Installing it also keeps SIGHUP from
/// killing the process, its default. Must be called inside a Tokio runtime.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
