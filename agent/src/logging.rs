//! The agent's log output, and its level changed at runtime through the admin API.
//!
//! Lines go to stderr through a bounded queue and a thread of their own: a stalled stderr (a full
//! pipe, a stuck log collector) costs lines, counted in `ambit_log_lines_dropped_total`, and never
//! blocks a proxy that logs a connection. The thread writes lines out in batches: the first line
//! of a batch wakes it, the others only append, so that logging a connection costs no wake-up of
//! another thread and no system call.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::LogFormat;

/// The environment variable with the initial filter (default `info`).
const FILTER_ENV: &str = "AMBIT_LOG";

/// How many lines wait for stderr before new ones are dropped: a few MiB of access-log lines,
/// and as many again in the batch being written.
const QUEUED_LINES: usize = 16_384;
/// How many bytes of lines wait, at most, whatever their number: long lines (error chains) fill
/// the queue sooner.
const QUEUED_BYTES: usize = 8 * 1024 * 1024;
/// How long the writing thread lets a batch gather once its first line woke it: the delay of a
/// line on its way to stderr, at most, while stderr keeps up.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// How long lines still queued at exit may take to be written out.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);
/// Lines queue in chunks of this size: a burst adds chunks rather than moving the lines already
/// queued into a larger buffer, under the lock every logging thread takes.
const CHUNK: usize = 64 * 1024;
/// How many written chunks are kept for the next lines (a burst's others are freed).
const KEPT_CHUNKS: usize = 16;

/// The installed logger, less the guard that flushes it.
#[derive(Debug)]
pub(crate) struct Logging {
    pub(crate) level: LogLevel,
    pub(crate) dropped: DroppedLines,
}

/// Lines dropped because the queue to stderr was full.
#[derive(Debug, Clone)]
pub(crate) struct DroppedLines(Arc<LogQueue>);

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
pub(crate) fn init(format: LogFormat) -> (Logging, FlushOnDrop) {
    let (writer, flush) = queue(std::io::stderr());
    let dropped = DroppedLines(writer.0.clone());
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
/// [`QUEUED_LINES`] or [`QUEUED_BYTES`] already wait.
fn queue(sink: impl Write + Send + 'static) -> (QueueWriter, FlushOnDrop) {
    let queue = Arc::new(LogQueue::default());
    let writing = queue.clone();
    let thread = std::thread::Builder::new()
        .name("ambit-log".to_owned())
        .spawn(move || writing.write_out(sink));
    let thread = match thread {
        Ok(thread) => Some(thread),
        Err(error) => {
            // Nothing can say so but stderr itself, which is all the queue was for.
            let _ = writeln!(std::io::stderr(), "no thread to write the log: {error}");
            None
        }
    };
    (QueueWriter(queue.clone()), FlushOnDrop { queue, thread })
}

/// Lines on their way to stderr.
#[derive(Debug, Default)]
struct LogQueue {
    queued: Mutex<Queued>,
    /// Signalled by the first line of a batch, and at exit.
    woken: Condvar,
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Queued {
    /// Whole lines, as the formatter wrote them.
    chunks: Vec<Vec<u8>>,
    bytes: usize,
    lines: usize,
    closing: bool,
    /// Chunks written out and emptied, for the next lines.
    spare: Vec<Vec<u8>>,
}

impl LogQueue {
    fn lock(&self) -> MutexGuard<'_, Queued> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: &[u8]) {
        let mut queued = self.lock();
        if queued.lines >= QUEUED_LINES || queued.bytes + line.len() > QUEUED_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let queued = &mut *queued;
        match queued.chunks.last_mut() {
            Some(chunk) if chunk.capacity() - chunk.len() >= line.len() => {
                chunk.extend_from_slice(line);
            }
            _ => {
                let spare = (line.len() <= CHUNK).then(|| queued.spare.pop()).flatten();
                let mut chunk = spare.unwrap_or_else(|| Vec::with_capacity(line.len().max(CHUNK)));
                chunk.extend_from_slice(line);
                queued.chunks.push(chunk);
            }
        }
        queued.bytes += line.len();
        queued.lines += 1;
        if queued.lines == 1 {
            self.woken.notify_one();
        }
    }

    /// The writing thread: batch after batch until the process is exiting and none is left.
    fn write_out(&self, mut sink: impl Write) {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut queued = self.lock();
            while queued.lines == 0 && !queued.closing {
                queued = self
                    .woken
                    .wait(queued)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if !queued.closing {
                drop(queued);
                std::thread::sleep(BATCH_DELAY);
                queued = self.lock();
            }
            if queued.lines == 0 {
                return;
            }
            std::mem::swap(&mut batch, &mut queued.chunks);
            queued.bytes = 0;
            queued.lines = 0;
            drop(queued);
            // A line stderr refuses is lost either way: there is nowhere else to say so.
            let _ = batch
                .iter()
                .try_for_each(|chunk| sink.write_all(chunk))
                .and_then(|()| sink.flush());
            let mut queued = self.lock();
            for mut chunk in batch.drain(..) {
                if queued.spare.len() < KEPT_CHUNKS && chunk.capacity() == CHUNK {
                    chunk.clear();
                    queued.spare.push(chunk);
                }
            }
        }
    }
}

/// What the formatter writes each line into.
#[derive(Debug, Clone)]
struct QueueWriter(Arc<LogQueue>);

impl Write for &QueueWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.0.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = &'a QueueWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Writes out the queued lines when dropped, waiting [`FLUSH_AT_EXIT`] at most.
#[derive(Debug)]
pub(crate) struct FlushOnDrop {
    queue: Arc<LogQueue>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.queue.lock().closing = true;
        self.queue.woken.notify_one();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + FLUSH_AT_EXIT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl DroppedLines {
    /// How many lines were dropped since the start.
    pub(crate) fn count(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
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

    use ambit_test_support::SharedBuffer;

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
        let dropped = DroppedLines(writer.0.clone());
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
        let lines = 3 * QUEUED_LINES;
        let dropped = log_to_stalled_sink(lines).expect("logging blocked on a stalled writer");
        // The writing thread holds one batch (a line at least, QUEUED_LINES at most), the queue
        // the next QUEUED_LINES.
        let kept = lines as u64 - dropped.count();
        assert!(
            (QUEUED_LINES as u64 + 1..=2 * QUEUED_LINES as u64).contains(&kept),
            "{kept} lines kept"
        );
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_the_last_ones_at_exit() {
        let sink = SharedBuffer::default();
        let (writer, flush) = queue(sink.clone());
        let subscriber = fmt().with_writer(writer).with_ansi(false).finish();
        tracing::subscriber::with_default(subscriber, || {
            for line in 0..1000 {
                tracing::info!(line, "connection closed");
                if line == 500 {
                    // A batch goes out meanwhile.
                    std::thread::sleep(BATCH_DELAY * 3);
                }
            }
        });
        drop(flush);
        let numbers: Vec<usize> = sink
            .text()
            .lines()
            .map(|l| {
                let (_, number) = l.rsplit_once("line=").expect("a whole line");
                number.parse().expect("a line number")
            })
            .collect();
        assert_eq!(numbers, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn the_queue_is_bounded_in_lines_and_in_bytes() {
        let queue = LogQueue::default();
        for _ in 0..QUEUED_LINES + 5 {
            queue.push(b"short\n");
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 5);

        let queue = LogQueue::default();
        let long = vec![b'x'; QUEUED_BYTES / 4];
        for _ in 0..6 {
            queue.push(&long);
        }
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(queue.lock().bytes, QUEUED_BYTES);
    }

    #[test]
    fn lines_across_chunks_and_longer_than_one_arrive_whole_and_in_order() {
        let queue = LogQueue::default();
        let mut expected = Vec::new();
        // Two chunks' worth of 1,000-byte lines, then a line of two chunks.
        let lines = (0..2 * (CHUNK / 1000)).map(|n| format!("{n:>999}\n").into_bytes());
        for line in lines.chain([vec![b'x'; 2 * CHUNK]]) {
            queue.push(&line);
            expected.extend_from_slice(&line);
        }
        queue.lock().closing = true;
        let mut written = Vec::new();
        queue.write_out(&mut written);
        assert!(written == expected, "{} bytes written", written.len());
        // The chunks are kept for the next lines, but not the long line's.
        let spare = &queue.lock().spare;
        assert_eq!(spare.len(), 2);
        assert!(spare.iter().all(|c| c.is_empty() && c.capacity() == CHUNK));
    }

    #[test]
    fn dropped_lines_are_exported() {
        let dropped = log_to_stalled_sink(3 * QUEUED_LINES).expect("logging returned");
        assert!(dropped.count() > 0);
        let mut metrics = Metrics::new();
        metrics.register_logging(dropped.clone());
        let text = metrics.encode();
        let expected = format!("ambit_log_lines_dropped_total {}\n", dropped.count());
        assert!(text.contains(&expected), "{text}");
    }
}
