//! Broker-side test helpers: a RabbitMQ vhost per test (dropped after), an
//! in-process worker on it, a capture queue for outbound events, and an SMTP
//! server on a local socket that can be taken down and brought back.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use training_credits::broker::topology::{DEAD_QUEUE, INBOUND_EXCHANGE, OUTBOUND_EXCHANGE};
use training_credits::broker::{connect, persistent_cloudevent};
use training_credits::config::Config;
use training_credits::store::Store;

/// `rabbitmqctl`, or the command in `RABBITMQCTL` (for a broker in Docker:
/// `docker compose exec -T rabbitmq rabbitmqctl`).
pub fn rabbitmqctl_command() -> std::process::Command {
    let configured = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut words = configured.split_whitespace();
    let mut command = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    command.args(words);
    command
}

/// Runs `rabbitmqctl ARGS`; `Err` with its stderr if it fails.
pub fn try_rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let output = rabbitmqctl_command()
        .args(args)
        .output()
        .map_err(|error| format!("rabbitmqctl (is RabbitMQ installed? see README): {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Runs `rabbitmqctl ARGS`, which must succeed.
pub fn rabbitmqctl(args: &[&str]) {
    try_rabbitmqctl(args).unwrap_or_else(|error| panic!("{error}"));
}

/// The broker the tests use, without a vhost.
pub const AMQP_BASE: &str = "amqp://guest:guest@127.0.0.1:5672";

/// A RabbitMQ vhost of the test's own, deleted when the test ends.
pub struct Vhost {
    pub name: String,
    /// The broker's URL without a vhost.
    base: String,
}

impl Vhost {
    pub fn new() -> Vhost {
        let name = format!("tc_test_{}", uuid::Uuid::new_v4().simple());
        Vhost::create(name, AMQP_BASE).unwrap_or_else(|error| panic!("{error}"))
    }

    /// The vhost `name` on the broker at `base` (a URL without a vhost),
    /// with every permission for `guest`.
    pub fn create(name: String, base: &str) -> Result<Vhost, String> {
        try_rabbitmqctl(&["add_vhost", &name])?;
        let vhost = Vhost {
            name,
            base: base.trim_end_matches('/').to_owned(),
        };
        try_rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.base, self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl_command()
            .args(["delete_vhost", &self.name])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A RabbitMQ user of a test's vhost, with a password, deleted when dropped.
pub struct BrokerUser {
    pub name: String,
    password: String,
    vhost: String,
}

impl BrokerUser {
    /// The permissions SECURITY.md gives each kind of user (configure,
    /// write, read).
    pub const WORKER: [&str; 3] = [
        "^training-credits\\.",
        "^(training-credits\\.(out|worker|dead|retry\\..+|upgrade\\..+)|amq\\.default)$",
        "^training-credits\\.(in|worker|dead|retry\\..+|upgrade\\..+)$",
    ];
    pub const PUBLISHER: [&str; 3] = ["^$", "^training-credits\\.in$", "^$"];
    pub const OPERATOR: [&str; 3] = [
        "^training-credits\\.",
        "^(training-credits\\..+|amq\\.default)$",
        "^training-credits\\.",
    ];

    /// A new user named after `role` with `permissions` on `vhost`.
    pub fn with(vhost: &Vhost, role: &str, password: &str, permissions: [&str; 3]) -> BrokerUser {
        let name = format!("tc_{role}_{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_user", &name, password]);
        let mut args = vec!["set_permissions", "-p", &vhost.name, &name];
        args.extend(permissions);
        rabbitmqctl(&args);
        BrokerUser {
            name,
            password: password.to_owned(),
            vhost: vhost.name.clone(),
        }
    }

    /// The broker's URL for this user, on its vhost.
    pub fn url(&self) -> String {
        format!(
            "amqp://{}:{}@127.0.0.1:5672/{}",
            self.name, self.password, self.vhost
        )
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = try_rabbitmqctl(&["delete_user", &self.name]);
    }
}

/// Publishes `body` to the inbound exchange on `channel` (with publisher
/// confirms on), and waits for the broker to take it.
pub async fn publish_in(
    channel: &Channel,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) {
    let confirm = channel
        .basic_publish(
            INBOUND_EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack());
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The worker's configuration for a test: this vhost, short retry delays,
/// the given SMTP server (or `.eml` files in `mail_dir`).
pub fn config(
    vhost: &Vhost,
    database_url: &str,
    smtp: Option<&str>,
    mail_dir: &std::path::Path,
) -> Config {
    let amqp = vhost.url();
    let mail_dir = mail_dir.display().to_string();
    Config::from_vars(|name| match name {
        "DATABASE_URL" => Some(database_url.to_owned()),
        "AMQP_URL" => Some(amqp.clone()),
        "SMTP_URL" => smtp.map(str::to_owned),
        "MAIL_DIR" => Some(mail_dir.clone()),
        "HTTP_ADDR" => Some("127.0.0.1:0".to_owned()),
        "RETRY_DELAYS" => Some("200ms,400ms".to_owned()),
        "PORTAL_URL" => Some("http://portal.test".to_owned()),
        "ADMIN_SOURCES" => Some(super::STAFF.to_owned()),
        _ => None,
    })
    .expect("a valid test configuration")
}

/// A worker running in this process until [`TestWorker::stop`].
pub struct TestWorker {
    pub cancel: CancellationToken,
    pub http_addr: std::net::SocketAddr,
    task: JoinHandle<()>,
}

impl TestWorker {
    pub async fn start<S: Store>(store: S, config: Config) -> TestWorker {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let http_addr = listener.local_addr().expect("an address");
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            training_credits::worker::run(store, &config, listener, token)
                .await
                .expect("the worker runs");
        });
        TestWorker {
            cancel,
            http_addr,
            task,
        }
    }

    /// Stops it the way SIGTERM does and waits until it has.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the worker stops in time")
            .expect("the worker task ends cleanly");
    }
}

/// A client of the test's vhost: publishes inbound events and captures what
/// the worker publishes.
pub struct Client {
    pub connection: Connection,
    pub channel: Channel,
    captured: Arc<Mutex<Vec<Captured>>>,
}

/// An outbound message as it arrived: its event, routing key and AMQP
/// properties.
#[derive(Clone, Debug)]
pub struct Captured {
    pub event: Value,
    pub routing_key: String,
    pub properties: lapin::BasicProperties,
}

impl Client {
    /// Connects, declares the topology, and binds a capture queue to the
    /// outbound exchange before anything is published.
    pub async fn new(vhost: &Vhost) -> Client {
        let (connection, channel) = connect(
            &vhost.url(),
            &[Duration::from_millis(200), Duration::from_millis(400)],
        )
        .await
        .expect("the broker answers");
        let capture = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a capture queue");
        channel
            .queue_bind(
                capture.name().clone(),
                OUTBOUND_EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("the capture queue is bound");
        let consumer_channel = connection.create_channel().await.expect("a channel");
        let mut consumer = consumer_channel
            .basic_consume(
                capture.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consuming the capture queue");
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = captured.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) {
                    sink.lock().expect("the capture lock").push(Captured {
                        event,
                        routing_key: delivery.routing_key.to_string(),
                        properties: delivery.properties.clone(),
                    });
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Client {
            connection,
            channel,
            captured,
        }
    }

    pub async fn publish_bytes(&self, routing_key: &str, body: &[u8]) {
        publish_in(&self.channel, routing_key, body, persistent_cloudevent("")).await;
    }

    pub async fn publish(&self, event: &Value) {
        let routing_key = event["type"].as_str().unwrap_or("none").to_owned();
        self.publish_bytes(&routing_key, event.to_string().as_bytes())
            .await;
    }

    /// Every outbound event captured so far.
    pub fn outbound(&self) -> Vec<Value> {
        self.captured().into_iter().map(|c| c.event).collect()
    }

    /// Every outbound message captured so far, whole.
    pub fn captured(&self) -> Vec<Captured> {
        self.captured.lock().expect("the capture lock").clone()
    }

    /// How many outbound events with distinct ids were captured.
    pub fn distinct_outbound_ids(&self) -> usize {
        self.outbound()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    pub fn outbound_of(&self, type_name: &str) -> Vec<Value> {
        self.outbound()
            .into_iter()
            .filter(|e| e["type"] == type_name)
            .collect()
    }

    /// Waits until `count` outbound events of `type_name` have arrived.
    pub async fn await_outbound(&self, type_name: &str, count: usize) -> Vec<Value> {
        eventually(
            Duration::from_secs(30),
            &format!("{count} × {type_name}"),
            || async { self.outbound_of(type_name).len() >= count },
        )
        .await;
        self.outbound_of(type_name)
    }

    /// Takes every dead letter off the dead-letter queue: (headers, body).
    pub async fn dead_letters(&self) -> Vec<(FieldTable, Vec<u8>)> {
        let mut letters = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let delivery = message.delivery;
            letters.push((
                delivery.properties.headers().clone().unwrap_or_default(),
                delivery.data,
            ));
        }
        letters
    }

    /// How many messages wait in the dead-letter queue (without taking them).
    pub async fn dead_letter_count(&self) -> u32 {
        self.channel
            .queue_declare(
                DEAD_QUEUE.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the dead-letter queue exists")
            .message_count()
    }
}

/// The text of a header of a dead letter.
pub fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(text) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        other => Some(format!("{other:?}")),
    }
}

/// An SMTP server on a local socket that keeps every message it accepts.
/// `stop` takes it down (refusing connections, dropping open ones) and
/// `start` brings it back on the same port. [`SmtpSink::inject`] makes it
/// misbehave the way real servers do: refuse with a reply code, or stall in
/// the middle of a conversation until the client hangs up.
pub struct SmtpSink {
    pub port: u16,
    /// The messages accepted: kept once the server has said `250` to the
    /// end of their DATA (or, for [`SmtpFault::StallAfterData`], once it
    /// had them whole).
    pub messages: Arc<Mutex<Vec<String>>>,
    faults: Arc<Mutex<Faults>>,
    running: Option<CancellationToken>,
}

/// A way for the sink to misbehave, in one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpFault {
    /// Greets with this reply code (`421`: service not available) and
    /// hangs up.
    Greeting(u16),
    /// Never answers `MAIL FROM`: the conversation hangs there.
    StallAfterMailFrom,
    /// Says `354`, then stops answering in the middle of the message's
    /// lines; nothing is kept.
    StallInData,
    /// Keeps the whole message, then never answers the end of DATA: the
    /// client cannot know it was received.
    StallAfterData,
    /// Answers the end of DATA with this reply code (`451`: try again
    /// later, `554`: refused); nothing is kept.
    RejectData(u16),
}

/// The fault the next conversations meet, and what was injected so far.
#[derive(Debug, Default)]
struct Faults {
    fault: Option<SmtpFault>,
    /// How many conversations the fault is still for; `None`: until cleared.
    remaining: Option<u64>,
    conversations: u64,
    injected: u64,
}

impl Faults {
    /// The fault for a conversation starting now, counted.
    fn take(&mut self) -> Option<SmtpFault> {
        self.conversations += 1;
        let fault = self.fault?;
        match &mut self.remaining {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        self.injected += 1;
        Some(fault)
    }
}

impl SmtpSink {
    pub async fn start_new() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let port = listener.local_addr().expect("an address").port();
        let mut sink = SmtpSink {
            port,
            messages: Arc::new(Mutex::new(Vec::new())),
            faults: Arc::new(Mutex::new(Faults::default())),
            running: None,
        };
        sink.serve(listener);
        sink
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(token) = self.running.take() {
            token.cancel();
        }
    }

    pub async fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the same port again");
        self.serve(listener);
    }

    /// Every conversation from now on meets `fault`, the first `times` of
    /// them only when `times` is given, until [`SmtpSink::heal`].
    pub fn inject(&self, fault: SmtpFault, times: Option<u64>) {
        let mut faults = self.faults.lock().expect("the sink lock");
        faults.fault = Some(fault);
        faults.remaining = times;
    }

    /// New conversations go well again (those stalled stay stalled until
    /// their client hangs up).
    pub fn heal(&self) {
        self.faults.lock().expect("the sink lock").fault = None;
    }

    /// Conversations that met a fault so far.
    pub fn faults_injected(&self) -> u64 {
        self.faults.lock().expect("the sink lock").injected
    }

    /// Conversations opened so far (connections accepted).
    pub fn conversations(&self) -> u64 {
        self.faults.lock().expect("the sink lock").conversations
    }

    pub fn received(&self) -> Vec<String> {
        self.messages.lock().expect("the sink lock").clone()
    }

    /// Every accepted message, decoded.
    pub fn mails(&self) -> Vec<Mail> {
        self.received().iter().map(|raw| Mail::parse(raw)).collect()
    }

    fn serve(&mut self, listener: TcpListener) {
        let token = CancellationToken::new();
        self.running = Some(token.clone());
        let messages = self.messages.clone();
        let faults = self.faults.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = token.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((socket, _)) = accepted else { continue };
                let messages = messages.clone();
                let fault = faults.lock().expect("the sink lock").take();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = converse(socket, messages, fault) => {}
                    }
                });
            }
        });
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stalled conversation: whatever the client still sends is read and
/// never answered, until it hangs up.
async fn stall(mut lines: BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
    }
}

/// The server side of one SMTP conversation, as much as lettre needs, with
/// the fault it is to meet, if any.
async fn converse(
    socket: tokio::net::TcpStream,
    messages: Arc<Mutex<Vec<String>>>,
    fault: Option<SmtpFault>,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read);
    if let Some(SmtpFault::Greeting(code)) = fault {
        write
            .write_all(format!("{code} sink not available\r\n").as_bytes())
            .await?;
        return Ok(());
    }
    write.write_all(b"220 sink ESMTP\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_ascii_uppercase();
        let reply: Vec<u8> = if command.starts_with("EHLO") || command.starts_with("HELO") {
            b"250-sink\r\n250 8BITMIME\r\n".to_vec()
        } else if command.starts_with("MAIL") && fault == Some(SmtpFault::StallAfterMailFrom) {
            return stall(lines).await;
        } else if command.starts_with("DATA") {
            write.write_all(b"354 go on\r\n").await?;
            if fault == Some(SmtpFault::StallInData) {
                return stall(lines).await;
            }
            let mut body = String::new();
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                body.push_str(&line);
            }
            match fault {
                Some(SmtpFault::StallAfterData) => {
                    messages.lock().expect("the sink lock").push(body);
                    return stall(lines).await;
                }
                Some(SmtpFault::RejectData(code)) => {
                    format!("{code} not this time\r\n").into_bytes()
                }
                _ => {
                    // Kept once the client has been told so.
                    write.write_all(b"250 kept\r\n").await?;
                    messages.lock().expect("the sink lock").push(body);
                    continue;
                }
            }
        } else if command.starts_with("QUIT") {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"250 ok\r\n".to_vec()
        };
        write.write_all(&reply).await?;
    }
}

/// Publishes purchases of one credit on `account_id` (event ids
/// `{prefix}-buy-{n}`, purchase ids `p{n}`), one every `pause`, until `stop`
/// is set or `max` are out; returns how many it published.
pub fn publish_purchases_until(
    client: Arc<Client>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    (prefix, account_id): (&str, &str),
    max: usize,
    pause: Duration,
) -> JoinHandle<usize> {
    let prefix = prefix.to_owned();
    let account_id = account_id.to_owned();
    tokio::spawn(async move {
        let mut published = 0;
        while published < max && !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let n = published;
            client
                .publish(&super::events::purchase(
                    &format!("{prefix}-buy-{n}"),
                    &account_id,
                    &format!("p{n}"),
                    "1",
                ))
                .await;
            published += 1;
            tokio::time::sleep(pause).await;
        }
        published
    })
}

/// A `Message-ID` without its angle brackets and surrounding blanks.
pub fn bare_message_id(id: &str) -> String {
    id.trim().trim_matches(|c| c == '<' || c == '>').to_owned()
}

/// One received email, decoded from its MIME form.
#[derive(Clone, Debug)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub text: String,
    pub html: String,
}

impl Mail {
    pub fn parse(raw: &str) -> Mail {
        let message = mail_parser::MessageParser::default()
            .parse(raw.as_bytes())
            .expect("a MIME message");
        let to = message
            .to()
            .and_then(|to| to.first())
            .and_then(|address| address.address())
            .unwrap_or_default()
            .to_owned();
        Mail {
            to,
            subject: message.subject().unwrap_or_default().to_owned(),
            message_id: message.message_id().unwrap_or_default().to_owned(),
            text: message
                .body_text(0)
                .map(|t| t.into_owned())
                .unwrap_or_default(),
            html: message
                .body_html(0)
                .map(|t| t.into_owned())
                .unwrap_or_default(),
        }
    }
}

// Helpers for the fault tests (tests/it/worker_faults.rs).

/// One connection the broker holds: its Erlang pid (what `close_connection`
/// takes) and its name (`client:port -> server:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConnection {
    pub pid: String,
    pub name: String,
}

impl Vhost {
    /// The connections the broker holds on this vhost now.
    pub fn connections(&self) -> Vec<BrokerConnection> {
        let output = std::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--no-table-headers",
                "pid",
                "vhost",
                "name",
            ])
            .output()
            .expect("rabbitmqctl runs (RabbitMQ is installed, see README)");
        assert!(
            output.status.success(),
            "rabbitmqctl list_connections failed"
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t');
                let pid = fields.next()?.trim();
                let vhost = fields.next()?.trim();
                let name = fields.next().unwrap_or_default().trim();
                (vhost == self.name).then(|| BrokerConnection {
                    pid: pid.to_owned(),
                    name: name.to_owned(),
                })
            })
            .collect()
    }

    /// Closes, from the broker's side, every connection of this vhost but
    /// those in `keep`; returns how many it closed.
    pub fn close_connections_except(&self, keep: &[BrokerConnection]) -> usize {
        let mut closed = 0;
        for connection in self.connections() {
            if keep.contains(&connection) {
                continue;
            }
            // A connection may go away by itself meanwhile: not a failure.
            let status = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", &connection.pid, "closed by a test"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("rabbitmqctl runs");
            if status.success() {
                closed += 1;
            }
        }
        closed
    }
}

impl Client {
    /// Publishes `body` to the inbound exchange with the given properties
    /// (headers, message id…), confirmed.
    pub async fn publish_with(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) {
        publish_in(&self.channel, routing_key, body, properties).await;
    }

    /// Takes every dead letter off the dead-letter queue, whole (properties
    /// included).
    pub async fn dead_letter_deliveries(&self) -> Vec<lapin::message::Delivery> {
        let mut letters = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            letters.push(message.delivery);
        }
        letters
    }

    /// How many messages are ready in `queue` (which must exist).
    pub async fn ready_in(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("the queue {queue} exists: {e}"))
            .message_count()
    }
}

/// An HTTP GET of `path` on `addr` within `limit`: (status, body).
pub async fn try_http_get_within(
    addr: std::net::SocketAddr,
    path: &str,
    limit: Duration,
) -> reqwest::Result<(u16, String)> {
    let response = reqwest::Client::builder()
        .timeout(limit)
        .build()?
        .get(format!("http://{addr}{path}"))
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// An HTTP GET of `path` on `addr` within 10 s: (status, body).
pub async fn try_http_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> reqwest::Result<(u16, String)> {
    try_http_get_within(addr, path, Duration::from_secs(10)).await
}

/// An HTTP GET of `path` on `addr`, which must answer within 10 s.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path)
        .await
        .unwrap_or_else(|error| panic!("GET {path} on {addr}: {error}"))
}

impl Vhost {
    /// Messages in `queue` of this vhost, ready and unacknowledged alike, as
    /// `rabbitmqctl list_queues` counts them (a passive declare counts only
    /// the ready ones); `None` if there is no such queue.
    pub fn queue_messages(&self, queue: &str) -> Option<u64> {
        self.try_queue_messages(queue)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// [`Vhost::queue_messages`], `Err` if `rabbitmqctl` fails.
    pub fn try_queue_messages(&self, queue: &str) -> Result<Option<u64>, String> {
        let output = rabbitmqctl_command()
            .args([
                "list_queues",
                "-p",
                &self.name,
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .stderr(std::process::Stdio::null())
            .output()
            .map_err(|error| format!("rabbitmqctl (is RabbitMQ installed? see README): {error}"))?;
        if !output.status.success() {
            return Err("rabbitmqctl list_queues failed".to_owned());
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .and_then(|(_, count)| count.trim().parse().ok()))
    }
}

impl Client {
    /// How many messages wait ready in `queue` (without taking them).
    pub async fn ready_count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|error| panic!("the queue {queue} exists: {error}"))
            .message_count()
    }
}

/// Publishes `events` to the inbound exchange on `channel` (routing key =
/// `type`, message id = `id`), all of them before waiting for any confirm.
pub async fn publish_confirmed(channel: &Channel, events: &[Value]) {
    let mut confirms = Vec::with_capacity(events.len());
    for event in events {
        let routing_key = event["type"].as_str().unwrap_or("none");
        let id = event["id"].as_str().unwrap_or_default();
        confirms.push(
            channel
                .basic_publish(
                    INBOUND_EXCHANGE.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    event.to_string().as_bytes(),
                    persistent_cloudevent(id),
                )
                .await
                .expect("published"),
        );
    }
    for confirm in confirms {
        assert!(
            confirm.await.expect("confirmed").is_ack(),
            "the broker nacked"
        );
    }
}

impl Vhost {
    /// Sets a policy on this vhost's queues matching `pattern`.
    pub fn set_policy(&self, name: &str, pattern: &str, definition: &str) {
        rabbitmqctl(&[
            "set_policy",
            "-p",
            &self.name,
            "--apply-to",
            "queues",
            name,
            pattern,
            definition,
        ]);
    }

    pub fn clear_policy(&self, name: &str) {
        rabbitmqctl(&["clear_policy", "-p", &self.name, name]);
    }
}
