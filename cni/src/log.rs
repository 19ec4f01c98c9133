//! Diagnostics: to the configured `logFile`, else stderr. Never stdout, which is the runtime's.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where diagnostic lines go.
#[derive(Debug)]
pub(crate) struct Log {
    file: Option<File>,
}

impl Log {
    pub(crate) fn stderr() -> Self {
        Self { file: None }
    }

    /// Appends to `path`; falls back to stderr, saying so, when it cannot be opened.
    pub(crate) fn open(path: Option<&Path>) -> Self {
        let Some(path) = path else {
            return Self::stderr();
        };
        match File::options().create(true).append(true).open(path) {
            Ok(file) => Self { file: Some(file) },
            Err(error) => {
                let log = Self::stderr();
                log.line(format_args!(
                    "cannot open logFile {}: {error}",
                    path.display()
                ));
                log
            }
        }
    }

    /// Writes one line; a log that cannot be written is not a reason to fail the command.
    pub(crate) fn line(&self, message: fmt::Arguments<'_>) {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let line = format!(
            "{}.{:03} ambit-cni[{}] {message}\n",
            since_epoch.as_secs(),
            since_epoch.subsec_millis(),
            std::process::id()
        );
        let _ = match &self.file {
            Some(file) => (&*file).write_all(line.as_bytes()),
            None => std::io::stderr().write_all(line.as_bytes()),
        };
    }
}
