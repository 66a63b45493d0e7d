//! Passwords never show (issue 6): the real binary, with `DATABASE_URL`,
//! `AMQP_URL` and `SMTP_URL` each carrying a password of its own, pointed at
//! servers that take it (RabbitMQ with a user of the test's, PostgreSQL) and
//! at servers that refuse it (RabbitMQ with a wrong password, a PostgreSQL
//! and an SMTP server that ask for the password and fail it), with the most
//! verbose logs (`RUST_LOG=trace`). No password, in clear, percent-encoded or
//! in the base64 of an SMTP `AUTH`, appears on stdout or stderr, nor in the
//! bodies of `/metrics`, `/healthz` and `/readyz`, nor in the one-line error
//! of any command, nor in a configuration error.
//!
//! Each scenario also proves the password was really used (the fake server
//! received it, or the real one let the worker in), so that a password that
//! never left the process cannot make a test pass.

use crate::support as common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::{BrokerUser, Client, Vhost, eventually, http_get};
use common::events::event;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const PG_PASSWORD: &str = "pg-S3cret-7f1d9a";
const AMQP_PASSWORD: &str = "amqp-S3cret-2b8e4c";
const SMTP_PASSWORD: &str = "smtp-S3cret-9c0a5e";
/// A password with characters a URL must percent-encode.
const ODD_PASSWORD: &str = "p@ss:w/rd%S3cret?#";

/// Standard base64 with padding, as SMTP `AUTH` sends credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0_u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn the_leak_detector_knows_every_form_of_a_password() {
    assert_eq!(base64(b"hello"), "aGVsbG8=");
    assert_eq!(base64(b"\0mailer\0pw"), "AG1haWxlcgBwdw==");
    assert_eq!(percent_encoded("p@ss:w/rd%"), "p%40ss%3Aw%2Frd%25");
    let plain = base64(format!("\0mailer\0{SMTP_PASSWORD}").as_bytes());
    assert!(!plain.contains("S3cret"));
    assert!(find_secret(&format!("C: AUTH PLAIN {plain}")).is_some());
    assert!(find_secret(&format!("amqp://u:{}@h/", percent_encoded(ODD_PASSWORD))).is_some());
    assert!(find_secret("amqp://u:***@h/ and postgres://tc@h/db?password=***").is_none());
}

fn percent_encoded(password: &str) -> String {
    url::form_urlencoded::byte_serialize(password.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Every form in which `password` (of `user`) could leak.
fn forms(user: &str, password: &str) -> Vec<String> {
    vec![
        password.to_owned(),
        percent_encoded(password),
        // SMTP AUTH PLAIN and AUTH LOGIN.
        base64(format!("\0{user}\0{password}").as_bytes()),
        base64(password.as_bytes()),
    ]
}

/// The first form of any of the passwords that shows in `text`.
fn find_secret(text: &str) -> Option<String> {
    let users = ["postgres", "tc", "mailer", "guest"];
    let passwords = [PG_PASSWORD, AMQP_PASSWORD, SMTP_PASSWORD, ODD_PASSWORD];
    passwords
        .iter()
        .flat_map(|password| users.iter().flat_map(|user| forms(user, password)))
        // The distinctive part alone, should a password be cut or re-encoded.
        .chain(std::iter::once("S3cret".to_owned()))
        .find(|form| text.contains(form.as_str()))
}

/// Asserts that none of the passwords shows in `text`, in any form.
fn assert_no_secret(text: &str, what: &str) {
    if let Some(form) = find_secret(text) {
        panic!("{what} shows {form:?}:\n{}", around(text, &form));
    }
}

fn around(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(300)
        .map_or(0, |(i, _)| i);
    text[start..].chars().take(700).collect()
}

// ---------------------------------------------------------------------------
// Servers that ask for the password and refuse it.

/// A local server that holds each connection's conversation with
/// `converse`, which keeps what it is to keep in the shared list.
struct KeepingServer {
    port: u16,
    kept: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepingServer {
    async fn start<C, F>(converse: C) -> KeepingServer
    where
        C: Fn(tokio::net::TcpStream, Arc<Mutex<Vec<String>>>) -> F + Send + 'static,
        F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let port = listener.local_addr().expect("an address").port();
        let kept = Arc::new(Mutex::new(Vec::new()));
        let shared = kept.clone();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let conversation = converse(socket, shared.clone());
                tokio::spawn(async move {
                    let _ = conversation.await;
                });
            }
        });
        KeepingServer { port, kept, task }
    }

    fn kept(&self) -> Vec<String> {
        self.kept.lock().expect("the lock").clone()
    }
}

impl Drop for KeepingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PostgreSQL server as far as authentication: it asks for the password
/// in clear, keeps it, and fails it (`28P01`).
struct FakePostgres {
    port: u16,
    server: KeepingServer,
}

impl FakePostgres {
    async fn start() -> FakePostgres {
        let server = KeepingServer::start(Self::converse).await;
        FakePostgres {
            port: server.port,
            server,
        }
    }

    async fn converse(
        mut socket: tokio::net::TcpStream,
        kept: Arc<Mutex<Vec<String>>>,
    ) -> std::io::Result<()> {
        // SSLRequest / GSSENCRequest first, answered "no"; then the startup.
        loop {
            let length = socket.read_u32().await? as usize;
            let mut body = vec![0; length.saturating_sub(4)];
            socket.read_exact(&mut body).await?;
            let code = u32::from_be_bytes(body[..4].try_into().expect("a code"));
            if code == 80_877_103 || code == 80_877_104 {
                socket.write_all(b"N").await?;
                continue;
            }
            break;
        }
        // AuthenticationCleartextPassword.
        socket.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3]).await?;
        let tag = socket.read_u8().await?;
        let length = socket.read_u32().await? as usize;
        let mut body = vec![0; length.saturating_sub(4)];
        socket.read_exact(&mut body).await?;
        if tag == b'p' {
            let password = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body));
            kept.lock().expect("the lock").push(password.into_owned());
        }
        let mut fields = Vec::new();
        for (field, value) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', "28P01"),
            (b'M', "password authentication failed for user \"tc\""),
        ] {
            fields.push(field);
            fields.extend_from_slice(value.as_bytes());
            fields.push(0);
        }
        fields.push(0);
        let mut message = vec![b'E'];
        message.extend_from_slice(
            &u32::try_from(fields.len() + 4)
                .expect("short")
                .to_be_bytes(),
        );
        message.extend_from_slice(&fields);
        socket.write_all(&message).await?;
        socket.shutdown().await
    }

    fn passwords(&self) -> Vec<String> {
        self.server.kept()
    }
}

/// An SMTP server that offers `AUTH PLAIN LOGIN`, keeps what the client
/// sends for it, and refuses it (`535`).
struct RefusingSmtp {
    port: u16,
    server: KeepingServer,
}

impl RefusingSmtp {
    async fn start() -> RefusingSmtp {
        let server = KeepingServer::start(Self::converse).await;
        RefusingSmtp {
            port: server.port,
            server,
        }
    }

    async fn converse(
        socket: tokio::net::TcpStream,
        kept: Arc<Mutex<Vec<String>>>,
    ) -> std::io::Result<()> {
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read);
        write.write_all(b"220 refusing ESMTP\r\n").await?;
        let mut line = String::new();
        loop {
            line.clear();
            if lines.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let upper = line.trim_end().to_ascii_uppercase();
            if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                write
                    .write_all(b"250-refusing\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
                    .await?;
            } else if upper.starts_with("AUTH LOGIN") {
                kept.lock()
                    .expect("the lock")
                    .push(line.trim_end().to_owned());
                for prompt in [&b"334 VXNlcm5hbWU6\r\n"[..], b"334 UGFzc3dvcmQ6\r\n"] {
                    write.write_all(prompt).await?;
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    kept.lock()
                        .expect("the lock")
                        .push(line.trim_end().to_owned());
                }
                write
                    .write_all(b"535 5.7.8 Authentication credentials invalid\r\n")
                    .await?;
            } else if upper.starts_with("AUTH") {
                kept.lock()
                    .expect("the lock")
                    .push(line.trim_end().to_owned());
                write
                    .write_all(b"535 5.7.8 Authentication credentials invalid\r\n")
                    .await?;
            } else if upper.starts_with("QUIT") {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            } else {
                write.write_all(b"250 ok\r\n").await?;
            }
        }
    }

    /// Whether the client sent `password` of `user` in an `AUTH`.
    fn received(&self, user: &str, password: &str) -> bool {
        let lines = self.server.kept();
        let plain = base64(format!("\0{user}\0{password}").as_bytes());
        let login = base64(password.as_bytes());
        lines
            .iter()
            .any(|line| line.contains(&plain) || line.trim() == login)
    }
}

// ---------------------------------------------------------------------------
// Running the binary.

/// A free local address for `HTTP_ADDR`.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
    listener.local_addr().expect("an address")
}

/// What a run of the binary printed.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// A command of the binary with only `env` (and `RUST_LOG=trace`) set, in a
/// folder of its own.
fn command(folder: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    let mut command = std::process::Command::new(common::BINARY);
    command.args(args).current_dir(folder);
    for variable in common::contract_variables() {
        command.env_remove(variable);
    }
    command.env("RUST_LOG", "trace");
    command.env("MAIL_DIR", folder.join("mail"));
    command.env("REPORTS_DIR", folder.join("reports"));
    command.envs(env.iter().copied());
    command
}

/// Runs a command that ends by itself.
async fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let folder = tempfile::tempdir().expect("a folder");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let output = command(folder.path(), &args, &env)
            .output()
            .expect("the binary runs");
        Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    })
    .await
    .expect("the run finishes")
}

/// `training-credits run` in the background, its output going to files.
struct Worker {
    child: std::process::Child,
    folder: tempfile::TempDir,
    http: SocketAddr,
}

impl Worker {
    fn start(env: &[(&str, &str)]) -> Worker {
        let folder = tempfile::tempdir().expect("a folder");
        let http = free_addr();
        let http_text = http.to_string();
        let mut env = env.to_vec();
        env.push(("HTTP_ADDR", &http_text));
        let stdout = std::fs::File::create(folder.path().join("stdout")).expect("a file");
        let stderr = std::fs::File::create(folder.path().join("stderr")).expect("a file");
        let child = command(folder.path(), &["run"], &env)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("the worker starts");
        Worker {
            child,
            folder,
            http,
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.folder.path().join("stderr")).expect("the stderr file"),
        )
        .into_owned()
    }

    /// Whether its HTTP server accepts connections yet.
    async fn listening(&self) -> bool {
        tokio::net::TcpStream::connect(self.http).await.is_ok()
    }

    /// `/healthz`, `/readyz` and `/metrics`: (path, status, body).
    async fn endpoints(&self) -> Vec<(&'static str, u16, String)> {
        let mut bodies = Vec::new();
        for path in ["/healthz", "/readyz", "/metrics"] {
            let (status, body) = http_get(self.http, path).await;
            bodies.push((path, status, body));
        }
        bodies
    }

    /// Stops it with SIGTERM, as an operator would, and returns its output.
    async fn stop(self) -> Output {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let mut child = self.child;
        let code = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.try_wait().expect("the worker's status") {
                    return status.code();
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("the worker did not stop within a minute of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .await
        .expect("waiting for the worker");
        let read = |name: &str| {
            String::from_utf8_lossy(
                &std::fs::read(self.folder.path().join(name)).expect("an output file"),
            )
            .into_owned()
        };
        Output {
            code,
            stdout: read("stdout"),
            stderr: read("stderr"),
        }
    }
}

// ---------------------------------------------------------------------------
// The worker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_with_passwords_everywhere_never_shows_one_in_logs_or_endpoints() {
    let vhost = Vhost::new();
    let user = BrokerUser::with(&vhost, "worker", AMQP_PASSWORD, BrokerUser::WORKER);
    let (pg_url, _keep) = common::empty_pg_url().await;
    // Trust authentication ignores the password, but it is in the URL the
    // worker parses, keeps and connects with.
    let database_url = pg_url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PG_PASSWORD}@"),
        1,
    );
    assert!(database_url.contains(PG_PASSWORD));
    let amqp_url = user.url();
    let smtp = RefusingSmtp::start().await;
    let smtp_url = format!("smtp://mailer:{SMTP_PASSWORD}@127.0.0.1:{}", smtp.port);
    let worker = Worker::start(&[
        ("DATABASE_URL", &database_url),
        ("AMQP_URL", &amqp_url),
        ("SMTP_URL", &smtp_url),
        ("RETRY_DELAYS", "100ms,200ms"),
    ]);
    eventually(Duration::from_secs(60), "the worker is ready", || async {
        worker.listening().await && http_get(worker.http, "/readyz").await.0 == 200
    })
    .await;

    // Work that makes it log at every level: applied events, a dead letter,
    // and emails the SMTP server refuses to authenticate.
    let client = Client::new(&vhost).await;
    client
        .publish(&event(
            "open-1",
            "portal",
            "credits.account.opened",
            json!({"account_id": "acme", "owners": [{"email": "boss@acme.test", "name": "Boss"}],
                   "approval_mode": "automatic", "code": "ACME-1234"}),
        ))
        .await;
    client
        .publish(&event(
            "buy-1",
            "shop",
            "credits.purchase.completed",
            json!({"account_id": "acme", "purchase_id": "p1", "credits": "100",
                   "purchased_at": "2026-01-01T09:00:00Z", "expires_at": "2099-01-01T00:00:00Z"}),
        ))
        .await;
    client.publish_bytes("credits.nonsense", b"{not json").await;
    // Retried through the delay queues, then dead-lettered: the worker's
    // permissions cover the whole retry plumbing.
    client
        .publish(&event(
            "ghost-1",
            "shop",
            "credits.purchase.completed",
            json!({"account_id": "ghost", "purchase_id": "p1", "credits": "1",
                   "purchased_at": "2026-01-01T09:00:00Z"}),
        ))
        .await;
    client
        .await_outbound("training-credits.purchase.recorded", 1)
        .await;
    eventually(
        Duration::from_secs(30),
        "two dead letters, one after its retries",
        || async { client.dead_letter_count().await >= 2 },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the SMTP password was tried",
        || async { smtp.received("mailer", SMTP_PASSWORD) },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the SMTP failure is logged",
        || async { worker.stderr().contains("535") },
    )
    .await;

    let endpoints = worker.endpoints().await;
    let output = worker.stop().await;
    assert_eq!(output.code, Some(0), "a clean stop:\n{}", output.stderr);
    for (path, status, body) in &endpoints {
        assert_eq!(*status, 200, "{path}: {body}");
        assert_no_secret(body, path);
    }
    assert!(
        endpoints[2].2.contains("training_credits_messages_total"),
        "/metrics has the worker's metrics"
    );
    assert_no_secret(&output.stdout, "stdout");
    assert_no_secret(&output.stderr, "stderr");
    // The logs were as verbose as they get, and name what failed.
    assert!(
        output.stderr.contains("TRACE") && output.stderr.len() > 10_000,
        "trace logs were written"
    );
    eprintln!(
        "worker with real services: {} KiB of trace logs, /metrics {} bytes; no password",
        output.stderr.len() / 1024,
        endpoints[2].2.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_the_password_never_gets_it_shown() {
    let vhost = Vhost::new();
    let folder = tempfile::tempdir().expect("a folder");
    let database_url = format!("sqlite://{}", folder.path().join("ledger.db").display());
    for password in [AMQP_PASSWORD, ODD_PASSWORD] {
        let amqp_url = format!(
            "amqp://guest:{}@127.0.0.1:5672/{}",
            percent_encoded(password),
            vhost.name
        );
        let worker = Worker::start(&[
            ("DATABASE_URL", &database_url),
            ("AMQP_URL", &amqp_url),
            ("RETRY_DELAYS", "100ms"),
        ]);
        eventually(Duration::from_secs(60), "the refusal is logged", || async {
            let stderr = worker.stderr();
            worker.listening().await
                && (stderr.contains("ACCESS_REFUSED") || stderr.contains("Lost the broker"))
        })
        .await;
        // Let it retry a few times.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let endpoints = worker.endpoints().await;
        let output = worker.stop().await;
        assert_eq!(output.code, Some(0), "a clean stop:\n{}", output.stderr);
        assert_eq!(endpoints[0].1, 200, "/healthz");
        assert_eq!(endpoints[1].1, 503, "/readyz: {}", endpoints[1].2);
        assert!(endpoints[1].2.contains("\"broker_connected\":false"));
        for (path, _, body) in &endpoints {
            assert_no_secret(body, path);
        }
        assert_no_secret(&output.stdout, "stdout");
        assert_no_secret(&output.stderr, "stderr");
    }
}

// ---------------------------------------------------------------------------
// Commands that fail.

/// Exit 1 with one line on stderr (the cause chain), apart from the logs.
fn assert_failed(output: &Output, what: &str) {
    assert_eq!(output.code, Some(1), "{what}: exit code\n{}", output.stderr);
    let error = output
        .stderr
        .lines()
        .filter(|l| l.starts_with("training-credits:"))
        .count();
    assert_eq!(error, 1, "{what}: one error line\n{}", output.stderr);
    assert_no_secret(&output.stdout, &format!("{what}: stdout"));
    assert_no_secret(&output.stderr, &format!("{what}: stderr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_on_a_database_that_fails_the_password_keeps_it_hidden() {
    let postgres = FakePostgres::start().await;
    let folder = tempfile::tempdir().expect("a folder");
    let out = folder.path().join("report.csv").display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["run"],
        vec!["migrate"],
        vec!["verify"],
        vec!["sweep"],
        vec!["account", "show", "acme"],
        vec!["report", "balances", "--format", "csv", "--out", &out],
    ];
    for url in [
        format!(
            "postgres://tc:{PG_PASSWORD}@127.0.0.1:{}/ledger",
            postgres.port
        ),
        format!(
            "postgres://tc:{}@127.0.0.1:{}/ledger",
            percent_encoded(ODD_PASSWORD),
            postgres.port
        ),
        // sqlx also takes the password as a query parameter.
        format!(
            "postgres://tc@127.0.0.1:{}/ledger?password={PG_PASSWORD}",
            postgres.port
        ),
    ] {
        for args in &commands {
            let before = postgres.passwords().len();
            let output = run_to_end(args, &[("DATABASE_URL", &url)]).await;
            let what = format!("{args:?} with {}", url.replace("S3cret", "…"));
            assert_failed(&output, &what);
            let sent = postgres.passwords();
            assert!(
                sent.len() > before,
                "{what}: the password reached the server"
            );
            assert!(
                sent[before..]
                    .iter()
                    .all(|p| p == PG_PASSWORD || p == ODD_PASSWORD),
                "{what}: {sent:?}"
            );
            assert!(
                output.stderr.contains("password authentication failed"),
                "{what}: the error says why\n{}",
                output.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_command_with_a_refused_password_keeps_it_hidden() {
    let vhost = Vhost::new();
    let folder = tempfile::tempdir().expect("a folder");
    let file = folder.path().join("events.jsonl");
    std::fs::write(
        &file,
        event(
            "e1",
            "shop",
            "credits.purchase.completed",
            json!({"account_id": "acme", "purchase_id": "p1", "credits": "1",
                   "purchased_at": "2026-01-01T09:00:00Z"}),
        )
        .to_string(),
    )
    .expect("the events file");
    let file = file.display().to_string();
    let database_url = format!("sqlite://{}", folder.path().join("ledger.db").display());
    for password in [AMQP_PASSWORD, ODD_PASSWORD] {
        let amqp_url = format!(
            "amqp://guest:{}@127.0.0.1:5672/{}",
            percent_encoded(password),
            vhost.name
        );
        for args in [
            vec!["publish", file.as_str()],
            vec!["dlq", "list"],
            vec!["dlq", "list", "--json"],
            vec!["dlq", "replay", "--all"],
        ] {
            let output = run_to_end(
                &args,
                &[
                    ("AMQP_URL", &amqp_url),
                    ("DATABASE_URL", &database_url),
                    ("RETRY_DELAYS", "100ms"),
                ],
            )
            .await;
            let what = format!("{args:?}");
            assert_failed(&output, &what);
            assert!(
                output.stderr.contains("ACCESS_REFUSED")
                    || output.stderr.to_lowercase().contains("refused"),
                "{what}: the broker refused it\n{}",
                output.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_with_a_password_is_named_without_it() {
    let folder = tempfile::tempdir().expect("a folder");
    let sqlite = format!("sqlite://{}", folder.path().join("ledger.db").display());
    let odd = percent_encoded(ODD_PASSWORD);
    // (arguments, environment, the variable the error must name, if any)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["verify"],
            vec![("DATABASE_URL", format!("mysql://tc:{PG_PASSWORD}@db/x"))],
            "DATABASE_URL",
        ),
        (
            vec!["verify"],
            vec![("DATABASE_URL", format!("postgres://tc:{odd}@db:port/x"))],
            "",
        ),
        (
            vec!["verify"],
            vec![(
                "DATABASE_URL",
                format!("postgres://tc@db:port/x?password={PG_PASSWORD}"),
            )],
            "",
        ),
        (
            vec!["dlq", "list"],
            vec![("AMQP_URL", format!("http://guest:{AMQP_PASSWORD}@broker/"))],
            "AMQP_URL",
        ),
        (
            vec!["dlq", "list"],
            vec![(
                "AMQP_URL",
                format!("amqp://guest:{AMQP_PASSWORD}@broker:99999/"),
            )],
            "AMQP_URL",
        ),
        (
            vec!["dlq", "list"],
            vec![(
                "AMQP_URL",
                format!("amqp://guest:{odd}@127.0.0.1:5672/one/two"),
            )],
            "",
        ),
        (
            vec!["run"],
            vec![
                ("DATABASE_URL", sqlite.clone()),
                ("SMTP_URL", format!("http://mailer:{SMTP_PASSWORD}@mail/")),
            ],
            "SMTP_URL",
        ),
        (
            vec!["run"],
            vec![
                ("DATABASE_URL", sqlite.clone()),
                ("SMTP_URL", format!("smtp://mailer:{odd}@:25")),
            ],
            "SMTP_URL",
        ),
    ];
    for (args, env, variable) in cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let output = run_to_end(&args, &env).await;
        let what = format!("{args:?} with {:?}", env[env.len() - 1].0);
        assert_failed(&output, &what);
        assert!(
            output.stderr.contains(variable),
            "{what}: the error names {variable}\n{}",
            output.stderr
        );
    }
}

// ---------------------------------------------------------------------------
// The broker permissions SECURITY.md recommends.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_may_publish_to_the_inbound_exchange_and_nowhere_else() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
    let vhost = Vhost::new();
    // The topology exists (the worker declares it).
    let _client = Client::new(&vhost).await;
    let shop = BrokerUser::with(&vhost, "shop", AMQP_PASSWORD, BrokerUser::PUBLISHER);
    let url = shop.url();
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("the publisher connects");
    let publish = |exchange: &'static str| {
        let connection = &connection;
        async move {
            let channel = connection.create_channel().await.expect("a channel");
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirms");
            let body = event("e1", "shop", "credits.purchase.completed", json!({})).to_string();
            match channel
                .basic_publish(
                    exchange.into(),
                    "credits.purchase.completed".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default(),
                )
                .await
            {
                Ok(confirm) => confirm.await.map(|c| c.is_ack()).unwrap_or(false),
                Err(_) => false,
            }
        }
    };
    assert!(
        publish("training-credits.in").await,
        "to the inbound exchange"
    );
    assert!(
        !publish("training-credits.out").await,
        "not to the outbound one"
    );
    assert!(!publish("").await, "not straight to a queue");
    let channel = connection.create_channel().await.expect("a channel");
    let declared = channel
        .exchange_declare(
            "training-credits.in".into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "no declaring");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_may_list_and_replay_dead_letters() {
    let vhost = Vhost::new();
    let _client = Client::new(&vhost).await;
    let operator = BrokerUser::with(&vhost, "operator", AMQP_PASSWORD, BrokerUser::OPERATOR);
    let url = operator.url();
    let folder = tempfile::tempdir().expect("a folder");
    let database_url = format!("sqlite://{}", folder.path().join("ledger.db").display());
    for args in [vec!["dlq", "list"], vec!["dlq", "replay", "--all"]] {
        let output = run_to_end(
            &args,
            &[("AMQP_URL", &url), ("DATABASE_URL", &database_url)],
        )
        .await;
        assert_eq!(output.code, Some(0), "{args:?}: {}", output.stderr);
        assert_no_secret(&output.stderr, "stderr");
    }
}
