//! The worker process (`training-credits run`) and the other commands of
//! the binary, and what its `/metrics` says.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::*;

/// Variables of the worker's configuration that pass through to it; the
/// bench sets or defaults every other one.
pub const PASSED_ON: [&str; 2] = ["PREFETCH", "BATCH_SIZE"];

pub fn binary(args: &[&str], database_url: &str, dir: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command.args(args).current_dir(dir);
    let variables = support::contract_variables().filter(|variable| !PASSED_ON.contains(variable));
    for variable in variables {
        command.env_remove(variable);
    }
    command
        .env("DATABASE_URL", database_url)
        .env("MAIL_DIR", dir.join("mail"))
        .env("REPORTS_DIR", dir.join("reports"))
        // BENCH_WORKER_LOG: the worker's log filter while profiling
        // (`sqlx::query=info` logs every statement and its time).
        .env(
            "RUST_LOG",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".to_owned()),
        )
        .env("NO_COLOR", "1");
    command
}

/// Runs a short command of the binary; `Ok(stderr)` if it exits 0.
pub fn run_command(args: &[&str], database_url: &str) -> BenchResult<String> {
    let dir = tempfile::tempdir().map_err(fail("a temporary folder"))?;
    let output = binary(args, database_url, dir.path())
        .output()
        .map_err(fail(BINARY))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "training-credits {} exited {}: {}",
            args.join(" "),
            output.status,
            text.trim()
        ))
    }
}

/// Peak resident set (`VmHWM`) of a process, in KiB.
pub fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// `training-credits run`, started as a child process.
pub struct Worker {
    pub child: Child,
    pub http: SocketAddr,
    pub peak_kib: Arc<AtomicU64>,
    pub polling: Arc<AtomicBool>,
    pub dir: tempfile::TempDir,
}

/// The worker's folder (its log, `MAIL_DIR`, `REPORTS_DIR`), on tmpfs where
/// there is one. Each run writes tens of thousands of `.eml` files and
/// deletes them after; on an ext4 without a journal (this machine's) every
/// later file creation then scans the recently deleted inodes
/// (`find_inode_bit`, `recently_deleted`), a fifth of the worker's CPU in
/// the next run: a cost of the bench's churn, not of the worker. The
/// database stays on disk.
pub fn worker_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
}

impl Worker {
    /// Starts the worker on `database_url` and `amqp_url`, with `env` set.
    pub fn start(database_url: &str, amqp_url: &str, env: &[(&str, &str)]) -> BenchResult<Worker> {
        let dir = worker_dir().map_err(fail("a temporary folder"))?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(fail("a free port"))?;
        let log = std::fs::File::create(dir.path().join("worker.log")).map_err(fail("log"))?;
        let child = binary(&["run"], database_url, dir.path())
            .env("AMQP_URL", amqp_url)
            .env("HTTP_ADDR", http.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(fail(BINARY))?;
        let peak = Arc::new(AtomicU64::new(0));
        let polling = Arc::new(AtomicBool::new(true));
        {
            let (peak, polling, pid) = (peak.clone(), polling.clone(), child.id());
            std::thread::spawn(move || {
                while polling.load(Ordering::Relaxed) {
                    peak.fetch_max(peak_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        Ok(Worker {
            child,
            http,
            peak_kib: peak,
            polling,
            dir,
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn ready(&mut self) -> BenchResult<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the worker exited at start ({status}): {}",
                    self.log_tail()
                ));
            }
            if let Ok((200, _)) = try_http_get(self.http, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the worker was not ready within 60 s".to_owned())
    }

    pub async fn metrics(&self) -> Option<Metrics> {
        let (status, body) = try_http_get(self.http, "/metrics").await.ok()?;
        (status == 200).then(|| Metrics::parse(&body))
    }

    /// SIGTERM, then waits (60 s at most) for a clean stop; returns the
    /// peak RSS in KiB and whether it stopped cleanly.
    pub async fn stop(mut self) -> (u64, bool, String, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut clean = false;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    clean = status.success();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => break,
            }
        }
        if !clean && self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.polling.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let log = std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default();
        // Dead letters of the malformed messages are expected and checked
        // by count; anything else is worth showing.
        let warnings: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("WARN") || line.contains("ERROR"))
            .filter(|line| !line.contains("Dead-lettered a message."))
            .collect();
        let summary = match warnings.len() {
            0 => String::new(),
            n => format!(
                "{n} warning/error lines besides dead letters, first: {}",
                warnings[0]
            ),
        };
        (
            self.peak_kib.load(Ordering::Relaxed),
            clean,
            summary,
            self.log_tail(),
        )
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Worker {
    /// A run that failed half-way leaves no worker behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.polling.store(false, Ordering::Relaxed);
    }
}

/// What the worker's `/metrics` says, as far as the bench uses it.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub messages: f64,
    pub outcomes: BTreeMap<String, f64>,
    pub batch_sum: f64,
    pub batch_count: f64,
    /// (upper bound, cumulative count) of each bucket.
    pub batch_buckets: Vec<(f64, f64)>,
    pub apply_sum: f64,
    pub backlog: BTreeMap<String, f64>,
    pub emails_sent: f64,
    pub retries: f64,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        let samples = support::metrics::samples(text);
        for sample in &samples {
            let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
            if let prometheus_parse::Value::Histogram(buckets) = &sample.value {
                if sample.metric == "training_credits_batch_size" {
                    metrics.batch_buckets.extend(
                        buckets
                            .iter()
                            .map(|bucket| (bucket.less_than, bucket.count)),
                    );
                }
                continue;
            }
            let Some(value) = support::metrics::value(sample) else {
                continue;
            };
            match sample.metric.as_str() {
                "training_credits_messages_total" => {
                    metrics.messages += value;
                    *metrics.outcomes.entry(label("outcome")).or_default() += value;
                }
                "training_credits_batch_size_sum" => metrics.batch_sum = value,
                "training_credits_batch_size_count" => metrics.batch_count = value,
                "training_credits_apply_seconds_sum" => metrics.apply_sum = value,
                "training_credits_outbox_backlog" => {
                    metrics.backlog.insert(label("kind"), value);
                }
                "training_credits_emails_total" if label("result") == "sent" => {
                    metrics.emails_sent += value;
                }
                "training_credits_retries_total" => metrics.retries += value,
                _ => {}
            }
        }
        metrics
    }

    /// Share of batches of at most `le` messages (a bucket bound of the
    /// worker's histograms: 1, 10, 100, 250, 1000…).
    pub fn batches_up_to(&self, le: f64) -> f64 {
        let count = self
            .batch_buckets
            .iter()
            .find(|(bound, _)| *bound == le)
            .map_or(0.0, |(_, n)| *n);
        if self.batch_count > 0.0 {
            count / self.batch_count
        } else {
            0.0
        }
    }
}
