//! The agent's log output, and its level changed at runtime through the admin API.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// The environment variable with the initial filter (default `info`).
const FILTER_ENV: &str = "AMBIT_LOG";

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

/// Logs to stderr as text or JSON, filtered by `AMBIT_LOG`.
pub(crate) fn init(format: LogFormat) -> LogLevel {
    let filter = EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: log collectors store escape codes as they are.
    let colour = std::io::stderr().is_terminal();
    let text = (format == LogFormat::Text)
        .then(|| fmt::layer().with_ansi(colour).with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    LogLevel(handle)
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
