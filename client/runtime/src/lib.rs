//! freshet-runtime: what every Freshet process needs, so that no role depends on another
//! role's internals for it.
//!
//! - [`shutdown_signal`]: SIGTERM or ctrl-c, installed before start-up.
//! - [`grpc`]: a bounded stop for a tonic server, reflection over every Freshet proto,
//!   and the client endpoint every role dials peers with (TCP_NODELAY on).
//! - [`metrics`]: the process-wide Prometheus recorder and its `/metrics` endpoint.
//! - [`exit_code`]: one line per error, exit code 1.
//! - [`lock`]: the exclusive lock on a data dir.

pub mod grpc;
pub mod lock;
pub mod metrics;

use std::future::Future;

pub use lock::{lock_dir, DirLock, LockError};

/// Installs the SIGTERM handler now (a signal during start-up then stops the role
/// cleanly instead of killing it) and resolves on SIGTERM or ctrl-c.
///
/// # Errors
/// The signal handler cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}

/// A binary's exit: success, or its error as one line with every cause (`{:#}`) and
/// exit code 1, never a backtrace (errors are the user's to act on).
pub fn exit_code(binary: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{binary}: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
