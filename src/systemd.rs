//! Glue to the service manager: readiness and status notifications, the watchdog, and where
//! logs go.
//!
//! Pure Rust (`sd-notify`, `tracing-journald`) rather than libsystemd: the notification and
//! journal protocols are datagrams on a socket, and keeping C out of the link keeps the arm64
//! cross build simple. Every call is a no-op when the daemon does not run under systemd.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sends logs to journald when stderr is connected to the journal (systemd sets
/// `JOURNAL_STREAM` to stderr's device and inode then), to stderr otherwise. `RUST_LOG`,
/// when set, overrides `level`.
pub fn init_logging(level: &str) {
    let filter = log_filter(level);
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald).init();
        return;
    }
    // Colours only for a person at a terminal: a log file or a pipe gets plain text.
    let ansi = std::io::stderr().is_terminal();
    registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr),
        )
        .init();
}

/// tract warns at every load that the model's ONNX operator set (23) is newer than the ones
/// it tests (9 to 18). Bundles are opset 23 by design and the engine is tested on them against
/// onnxruntime, so the warning says nothing a user can act on; it is dropped unless `RUST_LOG`
/// names `tract_onnx` itself.
const QUIET_TRACT: &str = "tract_onnx::model=error";

/// `RUST_LOG` when set (else `level`), without tract's operator-set warning.
pub fn log_filter(level: &str) -> EnvFilter {
    match std::env::var("RUST_LOG") {
        Ok(spec) if spec.contains("tract_onnx") => EnvFilter::new(spec),
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(format!("{spec},{QUIET_TRACT}")),
        _ => EnvFilter::new(format!("{level},{QUIET_TRACT}")),
    }
}

/// `JOURNAL_STREAM` is `device:inode` of the stream systemd connected; it is inherited by
/// children whose stderr may have been redirected since, so compare it with stderr itself.
fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", meta.dev(), meta.ino())
}

/// Tells the service manager the daemon is ready: the model is mapped and the bus name owned.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the one-line status `systemctl status` shows.
pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells the service manager the daemon is shutting down, so a slow exit is not a hang.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// The interval at which to send [`notify_watchdog`]: half of `WatchdogSec=`, as
/// `sd_watchdog_enabled(3)` advises, or `None` when no watchdog is set.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}
