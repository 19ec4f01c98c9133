//! The agent's log output, and its level changed at runtime through the admin API.
//!
//! Lines go to stderr through a bounded queue and a thread of their own: a stalled stderr (a full
//! pipe, a stuck log collector) costs lines, counted in `ambit_log_lines_dropped_total`, and never
//! blocks a proxy that logs a connection.

use std::io::{IsTerminal, Write};

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// The environment variable with the initial filter (default `info`).
const FILTER_ENV: &str = "AMBIT_LOG";

/// How many lines wait for stderr before new ones are dropped: a few MiB of access-log lines.
const QUEUED_LINES: usize = 16_384;

/// The installed logger, less the guard that flushes it.
#[derive(Debug)]
pub(crate) struct Logging {
    pub(crate) level: LogLevel,
    pub(crate) dropped: DroppedLines,
}

/// Lines dropped because the queue to stderr was full.
#[derive(Debug, Clone)]
pub(crate) struct DroppedLines(ErrorCounter);

/// Changes the filter of the installed logger.
#[derive(Debug, Clone)]
pub(crate) struct LogLevel(reload::Handle<EnvFilter, Registry>);

/// Why a new filter was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LogLevelError {
    #[error("{0:?} is not a log filter (such as `info` or `warn,access=info`)")]
    Invalid(String, #[source] tracing_subscriber::filter::ParseError),
    #[error("the logger is gone")]
    Reload(#[source] reload::Error),
}

/// Logs to stderr as text or JSON, filtered by `AMBIT_LOG`. The guard writes out the queued lines
/// when dropped (waiting a second at most): hold it until the process exits.
pub(crate) fn init(format: LogFormat) -> (Logging, WorkerGuard) {
    let (writer, flush) = queue(std::io::stderr());
    let dropped = DroppedLines(writer.error_counter());
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: log collectors store escape codes as they are.
    let colour = std::io::stderr().is_terminal();
    let text = (format == LogFormat::Text)
        .then(|| fmt::layer().with_ansi(colour).with_writer(writer.clone()));
    let json = (format == LogFormat::Json)
        .then(|| fmt::layer().json().flatten_event(true).with_writer(writer));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    let level = LogLevel(handle);
    (Logging { level, dropped }, flush)
}

/// A writer that hands lines to a thread writing them to `sink`, dropping them when
/// [`QUEUED_LINES`] already wait.
fn queue(sink: impl Write + Send + 'static) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("ambit-log")
        .finish(sink)
}

impl DroppedLines {
    /// How many lines were dropped since the start.
    pub(crate) fn count(&self) -> u64 {
        u64::try_from(self.0.dropped_lines()).unwrap_or(u64::MAX)
    }
}

impl LogLevel {
    /// The current filter, as `AMBIT_LOG` would write it.
    pub(crate) fn get(&self) -> String {
        self.0.with_current(ToString::to_string).unwrap_or_default()
    }

    pub(crate) fn set(&self, filter: &str) -> Result<(), LogLevelError> {
        let parsed = EnvFilter::try_new(filter)
            .map_err(|error| LogLevelError::Invalid(filter.to_owned(), error))?;
        self.0.reload(parsed).map_err(LogLevelError::Reload)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::telemetry::Metrics;

    /// A sink whose every write waits until its sender is dropped.
    struct Stalled(mpsc::Receiver<()>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs `lines` lines through a queue to a stalled sink on another thread, and tells how many
    /// were dropped, or `None` if logging did not return within 10 s.
    fn log_to_stalled_sink(lines: usize) -> Option<DroppedLines> {
        let (release, stalled) = mpsc::channel();
        let (writer, flush) = queue(Stalled(stalled));
        let dropped = DroppedLines(writer.error_counter());
        let subscriber = fmt().with_writer(writer).finish();
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            tracing::subscriber::with_default(subscriber, || {
                for line in 0..lines {
                    tracing::info!(line, "connection closed");
                }
            });
            let _ = done.send(());
        });
        let returned = finished.recv_timeout(Duration::from_secs(10)).is_ok();
        drop(release);
        drop(flush);
        returned.then_some(dropped)
    }

    #[test]
    fn a_stalled_stderr_costs_lines_not_time() {
        let dropped = log_to_stalled_sink(QUEUED_LINES + 10_000)
            .expect("logging blocked on a stalled writer");
        // The writing thread holds one line, the queue the next QUEUED_LINES.
        assert!(
            (9_999..=10_000).contains(&dropped.count()),
            "{}",
            dropped.count()
        );
    }

    #[test]
    fn dropped_lines_are_exported() {
        let dropped = log_to_stalled_sink(QUEUED_LINES + 10).expect("logging returned");
        assert!(dropped.count() > 0);
        let mut metrics = Metrics::new();
        metrics.register_logging(dropped.clone());
        let text = metrics.encode();
        let expected = format!("ambit_log_lines_dropped_total {}\n", dropped.count());
        assert!(text.contains(&expected), "{text}");
    }
}
