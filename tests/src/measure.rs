//! Measurements the benchmarks share. Each works on connected streams, so that the benchmark
//! decides the path (direct, tunneled, captured) and the same code measures every one.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The number on the `name` line (`VmRSS`, `Threads`, ...) of a process's `/proc/<pid>/status`
/// text, without its unit (KiB for sizes).
pub fn status_field(status: &str, name: &str) -> Option<u64> {
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
    value.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The request and response size of the latency and connection-rate measurements.
pub const MESSAGE: usize = 1024;

/// Serves `listener` as a sink: reads each connection until EOF, then answers with the byte
/// count (8 bytes, big endian).
pub async fn serve_sink(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0; 256 * 1024];
            let mut total = 0u64;
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = tcp.write_all(&total.to_be_bytes()).await;
        });
    }
}

/// Sends `bytes` to a sink and waits for its count; returns MiB/s.
pub async fn bulk_send(tcp: &mut TcpStream, bytes: u64) -> f64 {
    let chunk = vec![0x5a; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        tcp.write_all(&chunk).await.expect("send to the sink");
        sent += chunk.len() as u64;
    }
    tcp.shutdown().await.expect("close towards the sink");
    let mut count = [0; 8];
    tcp.read_exact(&mut count).await.expect("the sink's count");
    assert_eq!(u64::from_be_bytes(count), sent, "the sink got every byte");
    sent as f64 / (1024.0 * 1024.0) / start.elapsed().as_secs_f64()
}

/// `MESSAGE`-byte request/response round trips with an echo server, after `warmup` unmeasured
/// ones; sorted.
pub async fn round_trips(tcp: &mut TcpStream, warmup: usize, count: usize) -> Vec<Duration> {
    let request = [0x42; MESSAGE];
    let mut response = [0; MESSAGE];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        tcp.write_all(&request).await.expect("send a request");
        tcp.read_exact(&mut response).await.expect("read the echo");
        if i >= warmup {
            samples.push(start.elapsed());
        }
    }
    samples.sort();
    samples
}

/// Connections per second, each: `connect` (which hands back a stream ready to echo), one
/// round trip, close.
pub async fn connection_rate<F, Fut>(count: usize, mut connect: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = TcpStream>,
{
    let start = Instant::now();
    for _ in 0..count {
        let mut tcp = connect().await;
        round_trips(&mut tcp, 0, 1).await;
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// The value at `quantile` of sorted samples, in microseconds.
pub fn percentile_us(sorted: &[Duration], quantile: f64) -> f64 {
    let index = ((sorted.len().saturating_sub(1)) as f64 * quantile).round() as usize;
    sorted
        .get(index)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A table of measurements of subjects against a baseline, each with its ratio to it.
#[derive(Debug)]
pub struct Comparison {
    baseline: &'static str,
    subjects: Vec<&'static str>,
    rows: Vec<Row>,
}

/// One metric: the baseline's value (one per subject when each had its own), and each subject's
/// with its ratio.
#[derive(Debug)]
struct Row {
    metric: String,
    baselines: Vec<f64>,
    subjects: Vec<(f64, f64)>,
}

impl Comparison {
    pub fn new(baseline: &'static str, subjects: &[&'static str]) -> Self {
        Self {
            baseline,
            subjects: subjects.to_vec(),
            rows: Vec::new(),
        }
    }

    /// One metric: the baseline's value and each subject's, in the order of `new`.
    pub fn row(&mut self, metric: &str, baseline: f64, subjects: &[f64]) {
        assert_eq!(
            subjects.len(),
            self.subjects.len(),
            "a value for each subject"
        );
        self.rows.push(Row {
            metric: metric.to_owned(),
            baselines: vec![baseline],
            subjects: subjects.iter().map(|&s| (s, s / baseline)).collect(),
        });
    }

    /// One metric where each subject was measured with a baseline of its own, as (baseline,
    /// subject) in the order of `new`: each ratio is to the subject's own baseline, and the
    /// baseline column shows them all, in that order (a mean would hide a baseline that moved).
    pub fn paired_row(&mut self, metric: &str, pairs: &[(f64, f64)]) {
        assert_eq!(pairs.len(), self.subjects.len(), "a value for each subject");
        self.rows.push(Row {
            metric: metric.to_owned(),
            baselines: pairs.iter().map(|&(b, _)| b).collect(),
            subjects: pairs.iter().map(|&(b, s)| (s, s / b)).collect(),
        });
    }

    /// The table, one row a metric; each ratio is subject / baseline.
    pub fn render(&self) -> String {
        let mut table = format!("{:<44} {:>12}", "metric", self.baseline);
        for subject in &self.subjects {
            let _ = write!(table, " {subject:>12}");
        }
        for subject in &self.subjects {
            let _ = write!(table, " {:>10}", format!("{subject}/b"));
        }
        table.push('\n');
        for Row {
            metric,
            baselines,
            subjects,
        } in &self.rows
        {
            let baseline: Vec<String> = baselines.iter().map(|b| format!("{b:.1}")).collect();
            let _ = write!(table, "{metric:<44} {:>12}", baseline.join("/"));
            for (subject, _) in subjects {
                let _ = write!(table, " {subject:>12.1}");
            }
            for (_, ratio) in subjects {
                let _ = write!(table, " {ratio:>10.2}");
            }
            table.push('\n');
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_row_shows_each_baseline_and_ratios_to_it() {
        let mut table = Comparison::new("direct", &["a", "b"]);
        table.row("shared", 10.0, &[20.0, 5.0]);
        table.paired_row("paired", &[(10.0, 20.0), (40.0, 20.0)]);
        let rendered = table.render();
        let cells = |metric: &str| -> Vec<String> {
            let line = rendered.lines().find(|l| l.starts_with(metric)).unwrap();
            line.split_whitespace().skip(1).map(str::to_owned).collect()
        };
        assert_eq!(cells("shared"), ["10.0", "20.0", "5.0", "2.00", "0.50"]);
        assert_eq!(
            cells("paired"),
            ["10.0/40.0", "20.0", "20.0", "2.00", "0.50"]
        );
    }
}
