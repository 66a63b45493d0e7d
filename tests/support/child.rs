//! The real binary as a child process: a [`Site`] (a working folder, a
//! database, a broker URL and any extra variables) on which commands run to
//! their end ([`Site::output`]) and workers (`training-credits run`) start
//! and stop ([`Site::start_worker`], [`RunningWorker`]).
//!
//! Several workers may run on one site at once: each gets its own HTTP port
//! and its own log file, and they share the database, the broker URL and
//! the mail folder.
//!
//! ```ignore
//! let site = Site::new(&database_url, &vhost).with_env("PREFETCH", "50");
//! let mut worker = site.start_worker("the worker");
//! worker.await_ready().await;
//! // … publish, await outbound events …
//! worker.kill();                 // SIGKILL: no clean stop
//! let mut again = site.start_worker("the worker");
//! again.await_ready().await;
//! again.stop_with("TERM").await; // asserts a clean exit 0
//! let verified = site.output(&["verify"], Duration::from_secs(30)).await;
//! assert_eq!(verified.code(), Some(0), "{}", verified.stderr);
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::broker::Vhost;

/// How long a stopping worker may take to exit after SIGTERM or SIGINT.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// How long a starting worker may take to answer `/readyz` with 200.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// A port nobody listens on: bound by the OS, then released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free local port")
        .port()
}

/// Where one test's binary runs: its folder (working directory, mail,
/// reports, logs), its database, its broker URL, and extra variables given
/// to every command started on it.
pub struct Site {
    pub folder: tempfile::TempDir,
    pub database_url: String,
    pub amqp_url: String,
    /// Extra variables, set after (so overriding) the site's own.
    pub env: Vec<(String, String)>,
    started: AtomicUsize,
}

impl Site {
    /// A site on `database_url` and the test's vhost.
    pub fn new(database_url: &str, vhost: &Vhost) -> Site {
        Site::with_amqp_url(database_url, &vhost.url())
    }

    /// A site on `database_url` and any broker URL (a proxy in front of the
    /// broker, say).
    pub fn with_amqp_url(database_url: &str, amqp_url: &str) -> Site {
        Site {
            folder: tempfile::tempdir().expect("a working folder"),
            database_url: database_url.to_owned(),
            amqp_url: amqp_url.to_owned(),
            env: Vec::new(),
            started: AtomicUsize::new(0),
        }
    }

    /// The same site with one more variable for every command started on it
    /// (`SMTP_URL`, `PREFETCH`, `RUST_LOG`…).
    pub fn with_env(mut self, name: &str, value: &str) -> Site {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The folder where the workers write their `.eml` files (`MAIL_DIR`).
    pub fn mail_dir(&self) -> PathBuf {
        self.folder.path().join("mail")
    }

    /// The binary with `args`, in the folder, configured for this site and
    /// nothing else: `DATABASE_URL`, `AMQP_URL`, `MAIL_DIR`, `REPORTS_DIR`,
    /// `RETRY_DELAYS=200ms,400ms`, then [`Site::env`].
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(super::BINARY);
        command.args(args).current_dir(self.folder.path());
        for variable in super::contract_variables() {
            command.env_remove(variable);
        }
        command
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("MAIL_DIR", self.mail_dir())
            .env("REPORTS_DIR", self.folder.path().join("reports"))
            .env("RETRY_DELAYS", "200ms,400ms")
            .stdin(Stdio::null());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    /// Runs a command that ends by itself, within `limit` (panics if it
    /// does not), and returns its status and output.
    pub async fn output(&self, args: &[&str], limit: Duration) -> Finished {
        let name = args.join("_").replace(['/', '.'], "_");
        let out = self.folder.path().join(format!("{name}.out"));
        let err = self.folder.path().join(format!("{name}.err"));
        let mut child = self
            .command(args)
            .stdout(std::fs::File::create(&out).expect("a stdout file"))
            .stderr(std::fs::File::create(&err).expect("a stderr file"))
            .spawn()
            .expect("the binary starts");
        let status = exit_within(&mut child, limit).await;
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`training-credits {}` did not end within {limit:?}",
                args.join(" ")
            );
        };
        Finished {
            status,
            stdout: std::fs::read_to_string(&out).expect("stdout is UTF-8"),
            stderr: std::fs::read_to_string(&err).expect("stderr is UTF-8"),
        }
    }

    /// Runs `training-credits verify` (within `limit`) and asserts that it
    /// finds nothing wrong: exit code 0.
    pub async fn assert_verifies(&self, limit: Duration) {
        let verified = self.output(&["verify"], limit).await;
        assert_eq!(
            verified.code(),
            Some(0),
            "verify: {}{}",
            verified.stdout,
            verified.stderr
        );
    }

    /// Starts `training-credits run` on a free HTTP port, logging at `info`
    /// to a file of its own. `name` names it in panics and logs; it need
    /// not be unique (a worker restarted under the same name gets a new log).
    pub fn start_worker(&self, name: &str) -> RunningWorker {
        self.start_worker_with(name, &[])
    }

    /// [`Site::start_worker`] with extra variables for this worker only.
    pub fn start_worker_with(&self, name: &str, env: &[(&str, &str)]) -> RunningWorker {
        let port = free_port();
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        let file = name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let log = self.folder.path().join(format!("{number:03}-{file}.log"));
        let mut command = self.command(&["run"]);
        command
            .env("HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info");
        // The site's variables, then this worker's, win over these defaults.
        for (name, value) in &self.env {
            command.env(name, value);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("a log file"))
            .spawn()
            .expect("the worker starts");
        RunningWorker {
            child,
            port,
            log,
            name: name.to_owned(),
        }
    }
}

/// A command that has ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Polls `child` every 50 ms until it has exited or `limit` passes.
pub async fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `training-credits run` as a child process; killed if it is dropped while
/// it runs, with its log shown if a test is failing.
pub struct RunningWorker {
    pub child: Child,
    /// Its HTTP port (`/readyz`, `/metrics`) on 127.0.0.1.
    pub port: u16,
    pub log: PathBuf,
    pub name: String,
}

impl RunningWorker {
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Its HTTP address.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`, `STOP`, `CONT`) the way an
    /// operator or an orchestrator does.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Kills it with SIGKILL (no clean stop of any kind) and reaps it;
    /// returns its exit status (normally "signal: 9"). Panics if it had
    /// already exited by itself: a worker should not.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
            panic!(
                "{} had exited by itself ({status}) before SIGKILL:\n{}",
                self.name,
                self.log()
            );
        }
        self.child.kill().expect("SIGKILL is sent");
        self.child.wait().expect("the killed child is reaped")
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /readyz` answers 200: the broker is connected, the consumer runs
    /// and the database answers.
    pub async fn is_ready(&self) -> bool {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        if stream.write_all(request).await.is_err() {
            return false;
        }
        let mut response = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
        matches!(read, Ok(Ok(_))) && response.starts_with(b"HTTP/1.1 200")
    }

    /// Waits until it is ready ([`RunningWorker::is_ready`]), within
    /// [`READY_LIMIT`]; panics, with its log, if it exits or is not ready
    /// in time.
    pub async fn await_ready(&mut self) {
        self.await_ready_within(READY_LIMIT).await;
    }

    /// [`RunningWorker::await_ready`] within `limit`.
    pub async fn await_ready_within(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.is_ready().await {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("the child can be waited for") {
                panic!(
                    "{} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{} was not ready within {limit:?}:\n{}",
            self.name,
            self.log()
        );
    }

    /// Signals the worker (`TERM`, `INT`) and asserts that it exits 0
    /// within [`STOP_LIMIT`] after a clean stop; returns how long it took.
    pub async fn stop_with(self, signal: &str) -> Duration {
        self.signal(signal);
        self.await_exit(signal).await
    }

    /// Asserts that the worker, sent `signal` just now, exits 0 within
    /// [`STOP_LIMIT`] after a clean stop; returns how long it took.
    pub async fn await_exit(mut self, signal: &str) -> Duration {
        let started = Instant::now();
        let status = exit_within(&mut self.child, STOP_LIMIT).await;
        let took = started.elapsed();
        let log = self.log();
        let status = status.unwrap_or_else(|| {
            panic!(
                "{} did not exit within {STOP_LIMIT:?} of SIG{signal}:\n{log}",
                self.name
            )
        });
        assert_eq!(
            status.code(),
            Some(0),
            "{} exited with {status} on SIG{signal}:\n{log}",
            self.name
        );
        assert!(
            log.contains("The worker stopped."),
            "{} did not go through the clean stop:\n{log}",
            self.name
        );
        took
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("--- log of {} ---\n{}", self.name, self.log());
            }
        }
    }
}

/// Writes `text` to `path` and returns the path as a string (for a command
/// argument).
pub fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("the file is written");
    path.display().to_string()
}
