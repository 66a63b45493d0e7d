//! The throughput benchmark (issue 5): `cargo bench --bench throughput`.
//!
//! For each backend (SQLite, then PostgreSQL), on this machine's RabbitMQ and
//! PostgreSQL, in RabbitMQ vhosts and databases of its own (deleted at the
//! end), it measures and prints in one table:
//!
//! 1. the broker ceiling: N persistent messages (the workload's own bodies)
//!    published with confirms to a durable quorum scratch queue, then consumed
//!    with prefetch 1000 and one multiple-ack per batch; messages per second
//!    of the consume phase; then the same bodies through the broker alone on
//!    the worker's path (a relay in the bench instead of the worker): about
//!    what a worker whose own work cost nothing would reach here;
//! 2. N realistic inbound events published to `training-credits.in` before
//!    the worker starts, then the real release binary (`training-credits
//!    run`) started and timed until every message is applied and acknowledged
//!    and every expected outbound event has arrived on a capture queue bound
//!    to `training-credits.out`; events per second and the ratio to (1);
//! 3. with that worker idle, publish-to-outbound-event latency (p50, p99) at
//!    a steady rate (default 1,000 events/s for 10 s), and the same with the
//!    broker alone (a relay in the bench instead of the worker, in step 1);
//! 4. the worker's peak RSS (`VmHWM`, polled);
//! 5. step 2 again on a ledger that already holds 1,000,000 journal entries
//!    (filled by SQL in the binary's own schema), and its ratio to step 2.
//!
//! After every worker run it runs `training-credits verify` and checks that
//! exactly the expected outbound events arrived (one per applied inbound
//! event, none for duplicates and malformed messages); a failure prints a
//! warning and makes the bench exit non-zero. The targets of issue 5 are
//! reported, never asserted.
//!
//! Options (after `--`): `--events N` (20000), `--accounts N` (1000),
//! `--history N` (1000000; 0 skips step 5), `--backends sqlite,postgres`,
//! `--rate N` (1000) and `--latency-seconds N` (10) for step 3,
//! `--postgres URL` (admin URL; default `TEST_POSTGRES_URL` or
//! `postgres://postgres@127.0.0.1:5432/postgres`), `--amqp URL` (broker
//! without vhost; default `amqp://guest:guest@127.0.0.1:5672`). `PREFETCH`
//! and `BATCH_SIZE` in the environment are passed on to the worker. `--keep`
//! keeps the databases (and prints their URLs) for inspection.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use training_credits::config::Config;
use training_credits::consume::topology::{
    DEAD_QUEUE, INBOUND_EXCHANGE, OUTBOUND_EXCHANGE, WORKER_QUEUE, long_string,
};
use training_credits::consume::{connect, persistent_cloudevent};

/// The release binary cargo built for this bench.
const BINARY: &str = env!("CARGO_BIN_EXE_training-credits");

/// Credits of the funded lot every pre-existing account starts with, in cents.
const SEED_CREDITS_CENTS: i64 = 100_000_000;
/// Learners of the workload (a subset of the history's learners).
const WORKLOAD_LEARNERS: usize = 5_000;
/// Learners of the history: each has about ten approved redemptions.
const HISTORY_LEARNERS: u64 = 100_000;
/// Spent and expired lots per account in the history.
const OLD_LOTS: u64 = 19;
/// Cost of each redemption of the history, in cents.
const HISTORY_COST_CENTS: i64 = 2_500;
/// Publisher-confirm window when loading a queue.
const CONFIRM_WINDOW: usize = 1_000;
/// A run that makes no progress for this long has failed.
const STALL_LIMIT: Duration = Duration::from_secs(90);

type BenchResult<T> = Result<T, String>;

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |error| format!("{what}: {error}")
}

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// Issue 5: throughput as a share of the broker ceiling.
    fn target_ratio(self) -> f64 {
        match self {
            Backend::Sqlite => 0.25,
            Backend::Postgres => 0.40,
        }
    }
}

#[derive(Clone, Debug)]
struct Options {
    events: usize,
    accounts: usize,
    history: u64,
    backends: Vec<Backend>,
    rate: u32,
    latency_seconds: u32,
    postgres: String,
    amqp: String,
    /// Keep the databases (for inspection) instead of dropping them.
    keep: bool,
}

const USAGE: &str = "cargo bench --bench throughput [-- [--events N] [--accounts N] [--history N] \
[--backends sqlite,postgres] [--rate N] [--latency-seconds N] [--postgres URL] [--amqp URL] [--keep]]";

fn parse_options() -> BenchResult<Options> {
    let mut options = Options {
        events: 20_000,
        accounts: 1_000,
        history: 1_000_000,
        backends: vec![Backend::Sqlite, Backend::Postgres],
        rate: 1_000,
        latency_seconds: 10,
        postgres: std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        amqp: "amqp://guest:guest@127.0.0.1:5672".to_owned(),
        keep: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        fn number<T: FromStr>(name: &str, text: String) -> BenchResult<T> {
            text.replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: `{text}` is not a number"))
        }
        match name.as_str() {
            // What cargo passes to every bench binary.
            "--bench" => {}
            "--keep" => options.keep = true,
            "--events" => options.events = number(&name, value()?)?,
            "--accounts" => options.accounts = number(&name, value()?)?,
            "--history" => options.history = number(&name, value()?)?,
            "--rate" => options.rate = number(&name, value()?)?,
            "--latency-seconds" => options.latency_seconds = number(&name, value()?)?,
            "--postgres" => options.postgres = value()?,
            "--amqp" => options.amqp = value()?.trim_end_matches('/').to_owned(),
            "--backends" => {
                options.backends = value()?
                    .split(',')
                    .map(|b| match b.trim() {
                        "sqlite" => Ok(Backend::Sqlite),
                        "postgres" | "postgresql" => Ok(Backend::Postgres),
                        other => Err(format!("--backends: unknown backend `{other}`")),
                    })
                    .collect::<BenchResult<_>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`; usage: {USAGE}")),
        }
    }
    if options.events < 100 || options.accounts < 10 || options.rate == 0 {
        return Err("--events must be ≥ 100, --accounts ≥ 10 and --rate ≥ 1".to_owned());
    }
    Ok(options)
}

// ---------------------------------------------------------------------------
// The workload

/// A deterministic pseudo-random sequence (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).expect("below n")
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug)]
struct Message {
    id: String,
    routing_key: String,
    body: Vec<u8>,
}

/// Inbound messages in publishing order, and what they must produce.
#[derive(Default)]
struct Workload {
    messages: Vec<Message>,
    /// Ids of the messages that must each produce exactly one outbound event.
    expected: HashSet<String>,
    expected_types: BTreeMap<&'static str, usize>,
    inbound_types: BTreeMap<String, usize>,
    duplicates: usize,
    malformed: usize,
    /// Indices of valid messages (candidates for duplicates).
    valid: Vec<usize>,
}

struct Account {
    id: String,
    code: String,
    owner: String,
    manual: bool,
    available: i64,
    funded: bool,
}

struct Pending {
    request: String,
    account: usize,
    learner: String,
    cost: i64,
}

struct Spent {
    request: String,
    account: usize,
    cost: i64,
}

#[derive(Clone, Copy)]
enum Op {
    Open,
    Purchase,
    Automatic,
    Manual,
    Approve,
    Deny,
    Cancel,
    Unenroll,
    Duplicate,
    Malformed,
}

/// The mix of inbound events, in parts per 910.
const MIX: [(Op, usize); 10] = [
    (Op::Open, 20),
    (Op::Purchase, 100),
    (Op::Automatic, 380),
    (Op::Manual, 180),
    (Op::Approve, 110),
    (Op::Deny, 35),
    (Op::Cancel, 25),
    (Op::Unenroll, 45),
    (Op::Duplicate, 10),
    (Op::Malformed, 5),
];

/// Simulates the ledger while it writes messages, so that every valid
/// message applies (no refusal, no rejection, no `balance.low`: the accounts
/// have no threshold and always enough credits) and produces exactly one
/// outbound event.
struct Generator {
    rng: Rng,
    time: String,
    seq: u64,
    names: u64,
    accounts: Vec<Account>,
    unfunded: std::collections::VecDeque<usize>,
    pending: Vec<Pending>,
    spent: Vec<Spent>,
    opened: usize,
}

fn cents_text(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

impl Generator {
    /// `accounts` pre-existing accounts `acct-0…`, 30 % of them in manual
    /// mode, each funded with one lot (see [`seed_sql`]).
    fn new(accounts: usize) -> Generator {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        Generator {
            rng: Rng(0x5eed_2026),
            time,
            seq: 0,
            names: 0,
            accounts: (0..accounts)
                .map(|a| Account {
                    id: format!("acct-{a}"),
                    code: format!("BENCH-{a}"),
                    owner: format!("owner-{a}@example.com"),
                    manual: a % 10 < 3,
                    available: SEED_CREDITS_CENTS,
                    funded: true,
                })
                .collect(),
            unfunded: std::collections::VecDeque::new(),
            pending: Vec::new(),
            spent: Vec::new(),
            opened: 0,
        }
    }

    fn workload(&mut self, events: usize) -> Workload {
        let mut workload = Workload::default();
        let total: usize = MIX.iter().map(|(_, parts)| parts).sum();
        while workload.messages.len() < events {
            let mut pick = self.rng.below(total);
            let mut op = Op::Automatic;
            for (candidate, parts) in MIX {
                if pick < parts {
                    op = candidate;
                    break;
                }
                pick -= parts;
            }
            self.step(&mut workload, op);
        }
        workload
    }

    /// `count` automatic redemptions (or, where credits run short, purchases).
    fn steady(&mut self, count: usize) -> Workload {
        let mut workload = Workload::default();
        while workload.messages.len() < count {
            self.request(&mut workload, false);
        }
        workload
    }

    fn step(&mut self, w: &mut Workload, op: Op) {
        match op {
            Op::Open => self.open(w),
            Op::Purchase => self.purchase(w),
            Op::Automatic => self.request(w, false),
            Op::Manual => self.request(w, true),
            Op::Approve | Op::Deny | Op::Cancel if self.pending.is_empty() => {
                self.request(w, false)
            }
            Op::Approve => self.decide(w, true),
            Op::Deny => self.decide(w, false),
            Op::Cancel => self.cancel(w),
            Op::Unenroll if self.spent.is_empty() => self.request(w, false),
            Op::Unenroll => self.unenroll(w),
            Op::Duplicate if w.valid.is_empty() => self.request(w, false),
            Op::Duplicate => {
                let index = w.valid[self.rng.below(w.valid.len())];
                let copy = w.messages[index].clone();
                w.messages.push(copy);
                w.duplicates += 1;
            }
            Op::Malformed => self.malformed(w),
        }
    }

    fn name(&mut self, prefix: &str) -> String {
        self.names += 1;
        format!("{prefix}-{}", self.names)
    }

    fn emit(
        &mut self,
        w: &mut Workload,
        source: &str,
        type_name: &str,
        data: Value,
        outbound: &'static str,
    ) {
        self.seq += 1;
        let id = format!("bench-{}", self.seq);
        let event = json!({
            "specversion": "1.0",
            "id": id,
            "source": source,
            "type": type_name,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": data,
        });
        w.valid.push(w.messages.len());
        w.messages.push(Message {
            id: id.clone(),
            routing_key: type_name.to_owned(),
            body: event.to_string().into_bytes(),
        });
        w.expected.insert(id);
        *w.expected_types.entry(outbound).or_default() += 1;
        *w.inbound_types.entry(type_name.to_owned()).or_default() += 1;
    }

    fn open(&mut self, w: &mut Workload) {
        let k = self.opened;
        self.opened += 1;
        let manual = self.rng.chance(30);
        let account = Account {
            id: format!("new-{k}"),
            code: format!("NEWACCT-{k}"),
            owner: format!("owner-new-{k}@example.com"),
            manual,
            available: 0,
            funded: false,
        };
        let data = json!({
            "account_id": account.id,
            "name": format!("New account {k}"),
            "owners": [{"email": account.owner, "name": format!("Owner of new account {k}")}],
            "approval_mode": if manual { "manual" } else { "automatic" },
            "code": account.code,
            "notes": "opened during the benchmark",
        });
        self.unfunded.push_back(self.accounts.len());
        self.accounts.push(account);
        self.emit(
            w,
            "portal",
            "credits.account.opened",
            data,
            "training-credits.account.opened",
        );
    }

    fn purchase(&mut self, w: &mut Workload) {
        let (index, credits) = match self.unfunded.pop_front() {
            Some(index) => (index, 5_000_000),
            None => loop {
                let index = self.rng.below(self.accounts.len());
                if self.accounts[index].funded {
                    break (index, (100 + self.rng.below(4_901) as i64) * 100);
                }
            },
        };
        let purchase_id = self.name("buy");
        let account = &mut self.accounts[index];
        account.available += credits;
        account.funded = true;
        let data = json!({
            "account_id": account.id,
            "purchase_id": purchase_id,
            "credits": cents_text(credits),
            "price_paid": {"amount": cents_text(credits), "currency": "USD"},
            "channel": "card",
            "purchased_at": self.time,
        });
        self.emit(
            w,
            "shop",
            "credits.purchase.completed",
            data,
            "training-credits.purchase.recorded",
        );
    }

    fn request(&mut self, w: &mut Workload, manual: bool) {
        let cost = 500 + self.rng.below(196) as i64 * 100;
        let mut chosen = None;
        for _ in 0..64 {
            let index = self.rng.below(self.accounts.len());
            let account = &self.accounts[index];
            if account.funded && account.manual == manual && account.available >= cost {
                chosen = Some(index);
                break;
            }
        }
        let Some(index) = chosen else {
            return self.purchase(w);
        };
        let learner_number = self.rng.below(WORKLOAD_LEARNERS);
        let learner = format!("learner-{learner_number}");
        let request = self.name("req");
        let item = self.name("course");
        let account = &mut self.accounts[index];
        account.available -= cost;
        let data = json!({
            "request_id": request,
            "code": account.code,
            "learner": {
                "id": learner,
                "email": format!("{learner}@learners.example"),
                "name": format!("Learner {learner_number}"),
            },
            "item": {"id": item, "kind": "course", "title": format!("Course {item}")},
            "cost": cents_text(cost),
            "requested_at": self.time,
        });
        if manual {
            self.pending.push(Pending {
                request,
                account: index,
                learner,
                cost,
            });
            self.emit(
                w,
                "lms",
                "credits.redemption.requested",
                data,
                "training-credits.redemption.pending",
            );
        } else {
            self.spent.push(Spent {
                request,
                account: index,
                cost,
            });
            self.emit(
                w,
                "lms",
                "credits.redemption.requested",
                data,
                "training-credits.redemption.approved",
            );
        }
    }

    fn decide(&mut self, w: &mut Workload, approve: bool) {
        let pending = self.pending.swap_remove(self.rng.below(self.pending.len()));
        let owner = self.accounts[pending.account].owner.clone();
        if approve {
            self.spent.push(Spent {
                request: pending.request.clone(),
                account: pending.account,
                cost: pending.cost,
            });
            self.emit(
                w,
                "portal",
                "credits.redemption.approved",
                json!({"request_id": pending.request, "approver": owner, "note": "approved for the team plan"}),
                "training-credits.redemption.approved",
            );
        } else {
            self.accounts[pending.account].available += pending.cost;
            self.emit(
                w,
                "portal",
                "credits.redemption.denied",
                json!({"request_id": pending.request, "approver": owner, "reason": "not in this quarter's plan"}),
                "training-credits.redemption.denied",
            );
        }
    }

    fn cancel(&mut self, w: &mut Workload) {
        let pending = self.pending.swap_remove(self.rng.below(self.pending.len()));
        self.accounts[pending.account].available += pending.cost;
        self.emit(
            w,
            "lms",
            "credits.redemption.cancelled",
            json!({"request_id": pending.request, "learner_id": pending.learner}),
            "training-credits.redemption.cancelled",
        );
    }

    fn unenroll(&mut self, w: &mut Workload) {
        let spent = self.spent.swap_remove(self.rng.below(self.spent.len()));
        self.accounts[spent.account].available += spent.cost;
        let time = self.time.clone();
        self.emit(
            w,
            "lms",
            "credits.enrollment.unenrolled",
            json!({"request_id": spent.request, "unenrolled_at": time, "reason": "changed course"}),
            "training-credits.redemption.refunded",
        );
    }

    /// One of four kinds of broken message, in turn: not JSON, an unknown
    /// type, a `data` that breaks its schema, an envelope without
    /// `specversion`. Each is dead-lettered and produces no outbound event.
    fn malformed(&mut self, w: &mut Workload) {
        self.seq += 1;
        let id = format!("bench-{}", self.seq);
        let time = &self.time;
        let (routing_key, body) = match w.malformed % 4 {
            0 => (
                "credits.purchase.completed",
                format!(
                    "{{\"specversion\":\"1.0\",\"id\":\"{id}\",\"source\":\"shop\",\"type\":\"credits.purchase.comp"
                ),
            ),
            1 => (
                "credits.bonus.granted",
                json!({"specversion": "1.0", "id": id, "source": "shop", "type": "credits.bonus.granted",
                       "time": time, "datacontenttype": "application/json", "data": {"account_id": "acct-1"}})
                .to_string(),
            ),
            2 => (
                "credits.purchase.completed",
                json!({"specversion": "1.0", "id": id, "source": "shop", "type": "credits.purchase.completed",
                       "time": time, "datacontenttype": "application/json",
                       "data": {"account_id": "acct-1", "purchase_id": "broken", "credits": "a lot", "purchased_at": time}})
                .to_string(),
            ),
            _ => (
                "credits.redemption.requested",
                json!({"id": id, "source": "lms", "type": "credits.redemption.requested", "data": {}})
                    .to_string(),
            ),
        };
        w.malformed += 1;
        w.messages.push(Message {
            id,
            routing_key: routing_key.to_owned(),
            body: body.into_bytes(),
        });
    }
}

// ---------------------------------------------------------------------------
// RabbitMQ: vhosts, loading a queue, capturing outbound events

fn rabbitmqctl() -> Command {
    let configured = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_owned());
    let mut words = configured.split_whitespace();
    let mut command = Command::new(words.next().unwrap_or("rabbitmqctl"));
    command.args(words);
    command
}

/// A vhost of the bench's own, deleted when dropped.
struct Vhost {
    name: String,
    url: String,
}

impl Vhost {
    fn create(name: String, amqp: &str) -> BenchResult<Vhost> {
        for args in [
            vec!["add_vhost", name.as_str()],
            vec!["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"],
        ] {
            let output = rabbitmqctl()
                .args(&args)
                .output()
                .map_err(fail("rabbitmqctl (is RabbitMQ installed?)"))?;
            if !output.status.success() {
                return Err(format!(
                    "rabbitmqctl {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
        }
        let url = format!("{amqp}/{name}");
        Ok(Vhost { name, url })
    }

    /// Ready and unacknowledged messages of `queue`, as `rabbitmqctl
    /// list_queues` counts them.
    fn queue_messages(&self, queue: &str) -> Option<u64> {
        let output = rabbitmqctl()
            .args([
                "list_queues",
                "-p",
                &self.name,
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .and_then(|(_, count)| count.trim().parse().ok())
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl()
            .args(["delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Publishes every message to `exchange` (routing key = the message's, or
/// `queue` on the default exchange), persistent, confirms awaited per window.
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    queue: Option<&str>,
    messages: &[Message],
) -> BenchResult<()> {
    for window in messages.chunks(CONFIRM_WINDOW) {
        let mut confirms = Vec::with_capacity(window.len());
        for message in window {
            let routing_key = queue.unwrap_or(&message.routing_key);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &message.body,
                        persistent_cloudevent(&message.id),
                    )
                    .await
                    .map_err(fail("publish"))?,
            );
        }
        all_acked(confirms).await?;
    }
    Ok(())
}

/// Waits for every confirm; a nack is a failure of the bench.
async fn all_acked(confirms: Vec<PublisherConfirm>) -> BenchResult<()> {
    for confirm in confirms {
        if !confirm.await.map_err(fail("confirm"))?.is_ack() {
            return Err("the broker nacked a message".to_owned());
        }
    }
    Ok(())
}

/// Publishes `messages` at `rate` per second (to `queue` if given, else by
/// their routing keys) and returns when each was published, their confirms
/// (not awaited) and the seconds the publishing took.
async fn publish_steadily<'m>(
    channel: &Channel,
    exchange: &str,
    queue: Option<&str>,
    messages: &'m [Message],
    rate: u32,
) -> BenchResult<(HashMap<&'m str, Instant>, Vec<PublisherConfirm>, f64)> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut sent = HashMap::with_capacity(messages.len());
    let mut confirms = Vec::with_capacity(messages.len());
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let wall = Instant::now();
    for (i, message) in messages.iter().enumerate() {
        tokio::time::sleep_until(start + period * u32::try_from(i).unwrap_or(u32::MAX)).await;
        sent.insert(message.id.as_str(), Instant::now());
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    queue.unwrap_or(&message.routing_key).into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    persistent_cloudevent(&message.id),
                )
                .await
                .map_err(fail("publish"))?,
        );
    }
    Ok((sent, confirms, wall.elapsed().as_secs_f64()))
}

async fn ready_in(channel: &Channel, queue: &str) -> BenchResult<u32> {
    Ok(channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("passive queue.declare"))?
        .message_count())
}

/// A channel with publisher confirms, and `queue` declared a durable
/// quorum queue (the kind the worker consumes).
async fn publisher_to_quorum_queue(connection: &Connection, queue: &str) -> BenchResult<Channel> {
    let channel = connection.create_channel().await.map_err(fail("channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(fail("confirm.select"))?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(fail("declare a quorum queue"))?;
    Ok(channel)
}

/// A queue of this connection's alone, named by the broker, gone with it.
async fn exclusive_queue(channel: &Channel) -> BenchResult<ShortString> {
    Ok(channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("declare a capture queue"))?
        .name()
        .clone())
}

struct Ceiling {
    publish_per_second: f64,
    consume_per_second: f64,
    /// Where the CPU went while the scratch queue was filled, and while it
    /// was consumed.
    publish_cpu: CpuSplit,
    consume_cpu: CpuSplit,
    /// The broker alone on the worker's path ([`Relay`]): the workload
    /// relayed, messages per second, and where the CPU went.
    relay_per_second: f64,
    relay_cpu: CpuSplit,
    /// Step 3's latency with the broker alone, when step 3 runs, and where
    /// the CPU went meanwhile.
    latency: Option<(Times, CpuSplit)>,
}

/// Step 1: the workload's bodies through a durable quorum queue (the kind
/// the worker consumes), with the worker's prefetch and multiple-acks.
async fn broker_ceiling(
    vhost: &Vhost,
    messages: &[Message],
    steady: Option<(&Workload, u32)>,
) -> BenchResult<Ceiling> {
    const QUEUE: &str = "bench.ceiling";
    let connection = connection(&vhost.url).await?;
    let channel = publisher_to_quorum_queue(&connection, QUEUE).await?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    publish_all(&channel, "", Some(QUEUE), messages).await?;
    let publish = started.elapsed();
    let publish_cpu = cpu_at_start.until(&CpuReading::take(0));
    let consumer_channel = connection.create_channel().await.map_err(fail("channel"))?;
    consumer_channel
        .basic_qos(1000, BasicQosOptions::default())
        .await
        .map_err(fail("basic.qos"))?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    let mut deliveries = consumer_channel
        .basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(fail("basic.consume"))?;
    let mut received = 0;
    while received < messages.len() {
        let first = tokio::time::timeout(Duration::from_secs(60), deliveries.next())
            .await
            .map_err(|_| format!("the scratch queue stopped delivering after {received}"))?
            .ok_or("the scratch consumer ended")?
            .map_err(fail("delivery"))?;
        let mut last = first.delivery_tag;
        let mut batch = 1;
        received += 1;
        while batch < 500 {
            match deliveries.next().now_or_never() {
                Some(Some(Ok(delivery))) => {
                    last = delivery.delivery_tag;
                    batch += 1;
                    received += 1;
                }
                _ => break,
            }
        }
        consumer_channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(fail("basic.ack"))?;
    }
    let consume = started.elapsed();
    let consume_cpu = cpu_at_start.until(&CpuReading::take(0));
    let _ = channel
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let (relay_per_second, relay_cpu) = broker_relay_throughput(&vhost.url, messages).await?;
    let latency = match steady {
        Some((steady, rate)) => Some(broker_latency(&vhost.url, steady, rate).await?),
        None => None,
    };
    let _ = connection.close(200, "done".into()).await;
    let n = messages.len() as f64;
    Ok(Ceiling {
        publish_per_second: n / publish.as_secs_f64(),
        consume_per_second: n / consume.as_secs_f64(),
        publish_cpu,
        consume_cpu,
        relay_per_second,
        relay_cpu,
        latency,
    })
}

/// The broker alone on the worker's path: a durable quorum queue, a relay in
/// this process that does what the worker does with a batch, less the
/// database and the rules, and an exclusive queue like the worker run's
/// capture, whose arrivals are recorded. The relay consumes with the
/// worker's prefetch, takes what has arrived (up to the worker's batch
/// size), publishes one persistent message per delivery with confirms, the
/// batch's publishes started together, waits for them and acknowledges the
/// batch with one multiple-ack; it does so on one connection of its own
/// (the worker uses two, and overlaps a batch's confirms with the next
/// batch: on two busy cores that cost more CPU than it saved, see
/// BENCHMARKS). The bench's own publishes and capture use another
/// connection, as in a worker run. Everything is closed when it finishes.
struct Relay {
    url: String,
    connections: Vec<Connection>,
    queue: &'static str,
    /// Publishes to `queue`, with confirms.
    channel: Channel,
    capture: ShortString,
    /// Message id and arrival instant of each message relayed.
    arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    capturing: tokio::task::JoinHandle<()>,
    relaying: Option<tokio::task::JoinHandle<BenchResult<()>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.capturing.abort();
        if let Some(relaying) = &self.relaying {
            relaying.abort();
        }
    }
}

async fn connection(url: &str) -> BenchResult<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(fail("connect"))
}

impl Relay {
    /// Declares the queues and starts taking arrivals; the relay itself
    /// starts with [`Relay::start`].
    async fn declare(url: &str, queue: &'static str) -> BenchResult<Relay> {
        let bench = connection(url).await?;
        let channel = publisher_to_quorum_queue(&bench, queue).await?;
        let capture = exclusive_queue(&channel).await?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let sink = arrivals.clone();
        let capturing = take_arrivals(&bench, capture.clone(), move |delivery, at| {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map_or(String::new(), |id| id.as_str().to_owned());
            sink.lock().expect("arrivals lock").push((id, at));
        })
        .await?;
        Ok(Relay {
            url: url.to_owned(),
            connections: vec![bench],
            queue,
            channel,
            capture,
            arrivals,
            capturing,
            relaying: None,
        })
    }

    async fn start(&mut self) -> BenchResult<()> {
        // The worker's own prefetch and batch size (the defaults, or what
        // the environment passes on to it).
        let config = Config::from_vars(|name| {
            PASSED_ON
                .contains(&name)
                .then(|| std::env::var(name).ok())
                .flatten()
        })
        .map_err(fail("PREFETCH or BATCH_SIZE"))?;
        let worker = connection(&self.url).await?;
        let relay_in = worker.create_channel().await.map_err(fail("channel"))?;
        relay_in
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await
            .map_err(fail("basic.qos"))?;
        let relay_out = worker.create_channel().await.map_err(fail("channel"))?;
        relay_out
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(fail("confirm.select"))?;
        let mut deliveries = relay_in
            .basic_consume(
                self.queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("consume the relay queue"))?;
        self.connections.push(worker);
        let capture = self.capture.clone();
        let batch_max = config.batch_size;
        self.relaying = Some(tokio::spawn(async move {
            while let Some(first) = deliveries.next().await {
                let mut batch = vec![first.map_err(fail("relay delivery"))?];
                while batch.len() < batch_max {
                    match deliveries.next().now_or_never() {
                        Some(Some(delivery)) => {
                            batch.push(delivery.map_err(fail("relay delivery"))?)
                        }
                        _ => break,
                    }
                }
                let confirms = futures_util::future::try_join_all(batch.iter().map(|delivery| {
                    relay_out.basic_publish(
                        "".into(),
                        capture.clone(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                }))
                .await
                .map_err(fail("relay publish"))?;
                all_acked(confirms).await?;
                let last = batch.last().map_or(0, |delivery| delivery.delivery_tag);
                relay_in
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await
                    .map_err(fail("relay ack"))?;
            }
            BenchResult::Ok(())
        }));
        Ok(())
    }

    fn arrived(&self) -> usize {
        self.arrivals.lock().expect("arrivals lock").len()
    }

    /// Waits until `count` messages have arrived, the relay or the capture
    /// has stopped, or none has arrived for [`STALL_LIMIT`].
    async fn wait_for(&self, count: usize) {
        let mut arrived = self.arrived();
        let mut progress_at = Instant::now();
        while arrived < count
            && progress_at.elapsed() < STALL_LIMIT
            && !self.capturing.is_finished()
            && !self.relaying.as_ref().is_some_and(|r| r.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.arrived();
            if now > arrived {
                (arrived, progress_at) = (now, Instant::now());
            }
        }
    }

    /// Stops the relay, deletes its queue, closes its connections and
    /// returns the arrivals; fails when the relay failed or fewer than
    /// `expected` arrived.
    async fn finish(mut self, expected: usize) -> BenchResult<Vec<(String, Instant)>> {
        self.capturing.abort();
        if let Some(relaying) = self.relaying.take() {
            relaying.abort();
            if let Ok(Ok(Err(error))) = tokio::time::timeout(Duration::from_secs(1), relaying).await
            {
                return Err(format!("the relay failed: {error}"));
            }
        }
        let _ = self
            .channel
            .queue_delete(self.queue.into(), QueueDeleteOptions::default())
            .await;
        for connection in &self.connections {
            let _ = connection.close(200, "done".into()).await;
        }
        let arrivals = std::mem::take(&mut *self.arrivals.lock().expect("arrivals lock"));
        if arrivals.len() < expected {
            return Err(format!(
                "the relay delivered {} of {expected} messages in time",
                arrivals.len()
            ));
        }
        Ok(arrivals)
    }
}

/// Step 2 without the worker (part of step 1): the workload's bodies loaded
/// into the relay's queue, then the relay started and timed until all of
/// them have arrived. About what a worker could reach on this machine if its
/// own work cost nothing; messages per second and where the CPU went.
async fn broker_relay_throughput(url: &str, messages: &[Message]) -> BenchResult<(f64, CpuSplit)> {
    let mut relay = Relay::declare(url, "bench.relay.loaded").await?;
    publish_all(&relay.channel, "", Some(relay.queue), messages).await?;
    let started = Instant::now();
    let cpu_at_start = CpuReading::take(0);
    relay.start().await?;
    relay.wait_for(messages.len()).await;
    let cpu = cpu_at_start.until(&CpuReading::take(0));
    let arrivals = relay.finish(messages.len()).await?;
    let last = arrivals.iter().map(|(_, at)| *at).max().unwrap_or(started);
    let seconds = last.duration_since(started).as_secs_f64();
    Ok((messages.len() as f64 / seconds, cpu))
}

/// Step 3 without the worker (part of step 1): the same steady publishes
/// through the relay. What the broker and this machine take of the latency
/// budget.
async fn broker_latency(url: &str, steady: &Workload, rate: u32) -> BenchResult<(Times, CpuSplit)> {
    let mut relay = Relay::declare(url, "bench.relay").await?;
    relay.start().await?;
    let cpu_at_start = CpuReading::take(0);
    let (sent, confirms, _) = publish_steadily(
        &relay.channel,
        "",
        Some(relay.queue),
        &steady.messages,
        rate,
    )
    .await?;
    all_acked(confirms).await?;
    relay.wait_for(steady.messages.len()).await;
    let cpu = cpu_at_start.until(&CpuReading::take(0));
    let arrivals = relay.finish(steady.messages.len()).await?;
    let times = Times::between(&sent, arrivals.iter().map(|(id, at)| (id.as_str(), *at)));
    Ok((times, cpu))
}

/// Consumes `queue` (no acks) on a channel of its own and hands each
/// delivery to `record` with the instant it arrived, until the task is
/// aborted or the connection closes.
async fn take_arrivals(
    connection: &Connection,
    queue: ShortString,
    mut record: impl FnMut(Delivery, Instant) + Send + 'static,
) -> BenchResult<tokio::task::JoinHandle<()>> {
    let channel = connection.create_channel().await.map_err(fail("channel"))?;
    let mut deliveries = channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(fail("consume a capture queue"))?;
    Ok(tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(delivery)) = deliveries.next().await {
            record(delivery, Instant::now());
        }
    }))
}

struct Arrival {
    causation: String,
    at: Instant,
}

/// Every outbound event the worker publishes, with its arrival instant.
#[derive(Default)]
struct Capture {
    arrivals: Mutex<Vec<Arrival>>,
    types: Mutex<BTreeMap<String, usize>>,
}

impl Capture {
    async fn start(connection: &Connection, channel: &Channel) -> BenchResult<Arc<Capture>> {
        let queue = exclusive_queue(channel).await?;
        channel
            .queue_bind(
                queue.clone(),
                OUTBOUND_EXCHANGE.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(fail("bind the capture queue"))?;
        let capture = Arc::new(Capture::default());
        let sink = capture.clone();
        take_arrivals(connection, queue, move |delivery, at| {
            let event: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
            let causation = event["data"]["causation_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let kind = event["type"].as_str().unwrap_or("(unreadable)").to_owned();
            *sink
                .types
                .lock()
                .expect("capture lock")
                .entry(kind)
                .or_default() += 1;
            sink.arrivals
                .lock()
                .expect("capture lock")
                .push(Arrival { causation, at });
        })
        .await?;
        Ok(capture)
    }

    fn len(&self) -> usize {
        self.arrivals.lock().expect("capture lock").len()
    }
}

// ---------------------------------------------------------------------------
// Databases

/// A database of the bench's own: a SQLite file in a temporary folder, or a
/// PostgreSQL database dropped when this is dropped.
struct Database {
    url: String,
    sqlite_dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
    keep: bool,
}

impl Database {
    async fn create(backend: Backend, options: &Options, tag: &str) -> BenchResult<Database> {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().map_err(fail("a temporary folder"))?;
                let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
                Ok(Database {
                    url,
                    sqlite_dir: Some(dir),
                    postgres: None,
                    keep: options.keep,
                })
            }
            Backend::Postgres => {
                let name = format!("tc_bench_{}_{tag}", std::process::id());
                let admin = sqlx::PgPool::connect(&options.postgres)
                    .await
                    .map_err(fail("PostgreSQL (is it running? see --postgres)"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&admin)
                .await
                .map_err(fail("drop an old bench database"))?;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                    .execute(&admin)
                    .await
                    .map_err(fail("create the bench database"))?;
                admin.close().await;
                // The same server and parameters (`?sslmode=…`), another database.
                let (address, parameters) = match options.postgres.split_once('?') {
                    Some((address, parameters)) => (address, format!("?{parameters}")),
                    None => (options.postgres.as_str(), String::new()),
                };
                let base = &address[..address.rfind('/').unwrap_or(0)];
                Ok(Database {
                    url: format!("{base}/{name}{parameters}"),
                    sqlite_dir: None,
                    postgres: Some((options.postgres.clone(), name)),
                    keep: options.keep,
                })
            }
        }
    }

    fn backend(&self) -> Backend {
        if self.postgres.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// Runs `sql` (several statements) on this database.
    async fn execute(&self, sql: &str) -> BenchResult<()> {
        match self.backend() {
            Backend::Sqlite => {
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)
                    .map_err(fail("SQLite URL"))?
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .map_err(fail("SQLite opens"))?;
                let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&pool)
                    .await;
                pool.close().await;
                result.map_err(fail("SQL"))?;
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.url)
                    .await
                    .map_err(fail("PostgreSQL connects"))?;
                let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&pool)
                    .await;
                pool.close().await;
                result.map_err(fail("SQL"))?;
            }
        }
        Ok(())
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.keep {
            if let Some(dir) = self.sqlite_dir.take() {
                let _ = dir.keep();
            }
            eprintln!("  kept the database {}", self.url);
            return;
        }
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop may run inside the runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// SQL pieces that differ between the backends.
struct Dialect {
    backend: Backend,
    now_micros: i64,
}

impl Dialect {
    /// `(prefix, from)`: `{prefix}INSERT … SELECT … FROM {from}` makes one
    /// row per `column` in `0..count`.
    fn series(&self, column: &str, count: u64) -> (String, String) {
        let last = count.saturating_sub(1);
        match self.backend {
            Backend::Postgres => (
                String::new(),
                format!("generate_series(0, {last}) AS {column}"),
            ),
            Backend::Sqlite => (
                format!(
                    "WITH RECURSIVE s({column}) AS (SELECT 0 UNION ALL SELECT {column} + 1 FROM s WHERE {column} < {last}) "
                ),
                "s".to_owned(),
            ),
        }
    }

    /// The instant `days` from now, plus `per_i` × `i` seconds (if given).
    fn instant(&self, days: i64, step: Option<(&str, i64)>) -> String {
        match self.backend {
            Backend::Postgres => {
                let mut text = format!("(now() + interval '{days} days'");
                if let Some((i, seconds)) = step {
                    text.push_str(&format!(" + {i} * interval '{seconds} seconds'"));
                }
                text.push(')');
                text
            }
            Backend::Sqlite => {
                let mut text = format!("({}", self.now_micros + days * 86_400_000_000);
                if let Some((i, seconds)) = step {
                    text.push_str(&format!(" + {i} * {}", seconds * 1_000_000));
                }
                text.push(')');
                text
            }
        }
    }
}

/// The pre-existing accounts `acct-0…` (30 % manual), each with one owner
/// and one funded lot whose purchase is in the journal.
fn seed_sql(dialect: &Dialect, accounts: u64) -> String {
    let (prefix, from) = dialect.series("a", accounts);
    let now = dialect.instant(0, None);
    let expires = dialect.instant(365, None);
    let remind = dialect.instant(335, None);
    format!(
        "BEGIN;
{prefix}INSERT INTO accounts (account_id, name, status, approval_mode, code, code_key, scope, low_balance_threshold, notes, created_at)
  SELECT 'acct-' || a, 'Account ' || a, 'active', CASE WHEN a % 10 < 3 THEN 'manual' ELSE 'automatic' END,
  'BENCH-' || a, 'BENCH' || a, '{{\"kind\":\"all\"}}', NULL, NULL, {now} FROM {from};
{prefix}INSERT INTO owners (email, account_id, name, position)
  SELECT 'owner-' || a || '@example.com', 'acct-' || a, 'Owner ' || a, 0 FROM {from};
{prefix}INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at,
  price_amount, price_currency, channel, reminded_stage, remind_at, fingerprint)
  SELECT 'acct-' || a, 'seed-' || a, {SEED_CREDITS_CENTS}, {SEED_CREDITS_CENTS}, 0, 0, {now}, {expires},
  NULL, NULL, 'grant', NULL, {remind}, '' FROM {from};
{prefix}INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {now}, 'acct-' || a, 'purchase', 'seed-' || a, NULL, {SEED_CREDITS_CENTS}, 0, {SEED_CREDITS_CENTS}, 'seed', 'seed-' || a FROM {from};
COMMIT;"
    )
}

/// A history on the same accounts that brings the journal to `entries`:
/// per account 19 old lots, bought two years ago, spent by approved
/// redemptions of 25.00 and expired a year ago; a redemption row, an
/// idempotency record and a dispatched outbound event per entry. The
/// redemptions belong to 100,000 learners, among them the workload's.
fn history_sql(dialect: &Dialect, accounts: u64, entries: u64) -> String {
    let old_purchases = accounts * OLD_LOTS;
    let redeems = entries.saturating_sub(accounts + old_purchases);
    let (prefix, from) = dialect.series("i", redeems);
    let at = dialect.instant(-730, Some(("i", 30)));
    let bought = dialect.instant(-731, None);
    let expired = dialect.instant(-365, None);
    let lot = format!("'old-' || (i % {accounts}) || '-' || ((i / {accounts}) % {OLD_LOTS})");
    let learner = format!("(i % {HISTORY_LEARNERS})");
    let cost = HISTORY_COST_CENTS;
    let cost_text = cents_text(cost);
    format!(
        "BEGIN;
{prefix}INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {at}, 'acct-' || (i % {accounts}), 'redeem', {lot}, 'hist-req-' || i, -{cost}, 0, {SEED_CREDITS_CENTS},
  'learner-' || {learner} || '@learners.example', 'hist-ev-' || i FROM {from};
INSERT INTO lots (account_id, purchase_id, credits, remaining, held, expired, purchased_at, expires_at,
  price_amount, price_currency, channel, reminded_stage, remind_at, fingerprint)
  SELECT account_id, purchase_id, SUM(-amount), 0, 0, 0, {bought}, {expired}, SUM(-amount), 'USD', 'card', 1, NULL, ''
  FROM journal WHERE entry = 'redeem' GROUP BY account_id, purchase_id;
INSERT INTO journal (at, account_id, entry, purchase_id, request_id, amount, held_delta, balance_after, actor, causation_id)
  SELECT {bought}, account_id, 'purchase', purchase_id, NULL, credits, 0, credits, 'shop', 'hist-buy-' || purchase_id
  FROM lots WHERE purchase_id LIKE 'old-%';
{prefix}INSERT INTO redemptions (request_id, account_id, learner_id, learner_email, learner_name, item_id, item_kind,
  item_title, item_group_ids, cost, status, reason, requested_at, created_at, decided_by, decided_at, allocations,
  refunded, fingerprint)
  SELECT 'hist-req-' || i, 'acct-' || (i % {accounts}), 'learner-' || {learner},
  'learner-' || {learner} || '@learners.example', 'Learner ' || {learner}, 'hist-item-' || i, 'course',
  'Course ' || i, '[]', {cost}, 'approved', NULL, {at}, {at}, 'system', {at},
  '[{{\"purchase_id\":\"' || {lot} || '\",\"amount\":\"{cost_text}\"}}]', 0, 'hist-' || i FROM {from};
{prefix}INSERT INTO processed (source, event_id, digest, outcome, processed_at)
  SELECT 'lms', 'hist-ev-' || i, 'digest-' || i, 'applied', {at} FROM {from};
INSERT INTO processed (source, event_id, digest, outcome, processed_at)
  SELECT 'shop', 'hist-buy-' || purchase_id, 'digest-' || purchase_id, 'applied', {bought} FROM lots WHERE purchase_id LIKE 'old-%';
INSERT INTO outbox (id, kind, payload, created_at, attempts, next_attempt_at, dispatched_at, last_error)
  SELECT 'hist-out-buy-' || purchase_id, 'event', '{{\"type\":\"training-credits.purchase.recorded\",\"data\":{{\"purchase_id\":\"' || purchase_id || '\"}}}}',
  {bought}, 0, {bought}, {bought}, NULL FROM lots WHERE purchase_id LIKE 'old-%';
{prefix}INSERT INTO outbox (id, kind, payload, created_at, attempts, next_attempt_at, dispatched_at, last_error)
  SELECT 'hist-out-' || i, 'event',
  '{{\"specversion\":\"1.0\",\"id\":\"hist-out-' || i || '\",\"source\":\"training-credits\",\"type\":\"training-credits.redemption.approved\",\"subject\":\"acct-' || (i % {accounts}) || '\",\"data\":{{\"account_id\":\"acct-' || (i % {accounts}) || '\",\"request_id\":\"hist-req-' || i || '\",\"cost\":\"{cost_text}\",\"decided_by\":\"system\",\"causation_id\":\"hist-ev-' || i || '\"}}}}',
  {at}, 0, {at}, {at}, NULL FROM {from};
COMMIT;"
    )
}

// ---------------------------------------------------------------------------
// The worker process and the other commands of the binary

/// Variables of the worker's configuration that pass through to it; the
/// bench sets or defaults every other one.
const PASSED_ON: [&str; 2] = ["PREFETCH", "BATCH_SIZE"];

fn binary(args: &[&str], database_url: &str, dir: &std::path::Path) -> Command {
    let mut command = Command::new(BINARY);
    command.args(args).current_dir(dir);
    let variables = training_credits::config::VARIABLES
        .iter()
        .chain(&["LOG_FORMAT", "RUST_LOG"])
        .filter(|variable| !PASSED_ON.contains(variable));
    for variable in variables {
        command.env_remove(variable);
    }
    command
        .env("DATABASE_URL", database_url)
        .env("MAIL_DIR", dir.join("mail"))
        .env("REPORTS_DIR", dir.join("reports"))
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    command
}

/// Runs a short command of the binary; `Ok(stderr)` if it exits 0.
fn run_command(args: &[&str], database_url: &str) -> BenchResult<String> {
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
fn peak_kib(pid: u32) -> u64 {
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

/// A process as `/proc/PID/stat` shows it: its name, its start (clock ticks
/// after boot, which with the pid tells one process from a later one with
/// the same pid) and the CPU time (user + system) it has used so far, in
/// seconds: unlike wall time, barely moved by whatever else the machine is
/// doing.
fn process_stat(pid: &str) -> Option<(String, u64, f64)> {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    // Fields after the command name, which is in parentheses: utime, stime
    // and starttime are the 14th, 15th and 22nd fields of the line.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    let start: u64 = fields.get(19)?.parse().ok()?;
    Some((name, start, (user + system) / ticks_per_second))
}

/// The CPU time of every process, by (pid, start), with whom it counts for,
/// and the machine's idle and total ticks, read from `/proc` at one instant.
/// Two readings give where the cores went between them.
#[derive(Default)]
struct CpuReading {
    processes: HashMap<(String, u64), (&'static str, f64)>,
    idle_ticks: f64,
    total_ticks: f64,
}

impl CpuReading {
    fn take(worker: u32) -> Self {
        let mut reading = Self::default();
        let worker = worker.to_string();
        let bench = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Some((name, start, seconds)) = process_stat(&pid) else {
                continue;
            };
            let who = if pid == worker {
                "worker"
            } else if pid == bench {
                "bench"
            } else if name == "beam.smp" || name.starts_with("erl_child") || name == "epmd" {
                "broker"
            } else if name == "postgres" {
                "PostgreSQL"
            } else {
                "other"
            };
            reading.processes.insert((pid, start), (who, seconds));
        }
        // The "cpu" line of /proc/stat: ticks of every kind summed over the
        // machine's CPUs; the fourth and fifth are idle and iowait.
        let ticks: Vec<f64> = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| stat.lines().next().map(str::to_owned))
            .map(|line| {
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        reading.idle_ticks = ticks.iter().skip(3).take(2).sum();
        reading.total_ticks = ticks.iter().sum();
        reading
    }

    /// Where the CPU went between `self` (earlier) and `later`, process by
    /// process: one that started in between counts in full, one that ended
    /// in between is missed (short-lived ones only: the worker, the broker
    /// and the database's connections live through a step).
    fn until(&self, later: &Self) -> CpuSplit {
        let mut seconds: BTreeMap<&'static str, f64> = BTreeMap::new();
        for (process, (who, used)) in &later.processes {
            let before = self.processes.get(process).map_or(0.0, |(_, used)| *used);
            *seconds.entry(who).or_default() += used - before;
        }
        let total = later.total_ticks - self.total_ticks;
        CpuSplit {
            seconds,
            idle_share: if total > 0.0 {
                (later.idle_ticks - self.idle_ticks) / total
            } else {
                0.0
            },
        }
    }
}

/// Where the machine's CPU went during a step: CPU seconds by who used them
/// (the worker, the broker, PostgreSQL, the bench, everything else) and the
/// share of the machine's CPU time left idle, which shows how much of the
/// cores the worker could have had.
#[derive(Default)]
struct CpuSplit {
    seconds: BTreeMap<&'static str, f64>,
    idle_share: f64,
}

impl CpuSplit {
    const WHO: [&'static str; 5] = ["worker", "broker", "PostgreSQL", "bench", "other"];

    fn worker(&self) -> f64 {
        self.seconds.get("worker").copied().unwrap_or(0.0)
    }

    /// "worker 150, broker 80, … µs per message; cores idle 3 %".
    fn per_message(&self, messages: f64) -> String {
        let used: Vec<String> = Self::WHO
            .iter()
            .map(|who| {
                let seconds = self.seconds.get(who).copied().unwrap_or(0.0);
                format!("{who} {:.0}", seconds * 1e6 / messages)
            })
            .collect();
        format!(
            "{} µs per message; cores idle {:.0} %",
            used.join(", "),
            100.0 * self.idle_share
        )
    }
}

/// `training-credits run`, started as a child process.
struct Worker {
    child: Child,
    http: SocketAddr,
    peak_kib: Arc<AtomicU64>,
    polling: Arc<AtomicBool>,
    dir: tempfile::TempDir,
}

/// The worker's folder (its log, `MAIL_DIR`, `REPORTS_DIR`), on tmpfs where
/// there is one. Each run writes tens of thousands of `.eml` files and
/// deletes them after; on an ext4 without a journal (this machine's) every
/// later file creation then scans the recently deleted inodes
/// (`find_inode_bit`, `recently_deleted`), a fifth of the worker's CPU in
/// the next run: a cost of the bench's churn, not of the worker. The
/// database stays on disk.
fn worker_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
}

impl Worker {
    fn start(database_url: &str, amqp_url: &str) -> BenchResult<Worker> {
        let dir = worker_dir().map_err(fail("a temporary folder"))?;
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(fail("a free port"))?;
        let log = std::fs::File::create(dir.path().join("worker.log")).map_err(fail("log"))?;
        let child = binary(&["run"], database_url, dir.path())
            .env("AMQP_URL", amqp_url)
            .env("HTTP_ADDR", http.to_string())
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
    async fn ready(&mut self) -> BenchResult<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the worker exited at start ({status}): {}",
                    self.log_tail()
                ));
            }
            if let Ok((200, _)) = http_get(self.http, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the worker was not ready within 60 s".to_owned())
    }

    async fn metrics(&self) -> Option<Metrics> {
        let (status, body) = http_get(self.http, "/metrics").await.ok()?;
        (status == 200).then(|| Metrics::parse(&body))
    }

    /// SIGTERM, then waits (60 s at most) for a clean stop; returns the
    /// peak RSS in KiB and whether it stopped cleanly.
    async fn stop(mut self) -> (u64, bool, String, String) {
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

    fn log_tail(&self) -> String {
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

/// A minimal HTTP/1.1 GET: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| std::io::Error::other("HTTP timeout"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("not HTTP"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
                break;
            };
            if size == 0 || tail.len() < size {
                break;
            }
            out.push_str(&tail[..size]);
            rest = tail[size..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// What the worker's `/metrics` says, as far as the bench uses it.
#[derive(Clone, Debug, Default)]
struct Metrics {
    messages: f64,
    outcomes: BTreeMap<String, f64>,
    batch_sum: f64,
    batch_count: f64,
    batch_buckets: Vec<(String, f64)>,
    apply_sum: f64,
    backlog: BTreeMap<String, f64>,
    emails_sent: f64,
    retries: f64,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        let label = |series: &str, name: &str| -> Option<String> {
            let start = series.find(&format!("{name}=\""))? + name.len() + 2;
            let end = series[start..].find('"')? + start;
            Some(series[start..end].to_owned())
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if series.starts_with("training_credits_messages_total") {
                metrics.messages += value;
                let outcome = label(series, "outcome").unwrap_or_default();
                *metrics.outcomes.entry(outcome).or_default() += value;
            } else if series == "training_credits_batch_size_sum" {
                metrics.batch_sum = value;
            } else if series == "training_credits_batch_size_count" {
                metrics.batch_count = value;
            } else if series.starts_with("training_credits_batch_size_bucket") {
                metrics
                    .batch_buckets
                    .push((label(series, "le").unwrap_or_default(), value));
            } else if series == "training_credits_apply_seconds_sum" {
                metrics.apply_sum = value;
            } else if series.starts_with("training_credits_outbox_backlog") {
                metrics
                    .backlog
                    .insert(label(series, "kind").unwrap_or_default(), value);
            } else if series.starts_with("training_credits_emails_total")
                && label(series, "result").as_deref() == Some("sent")
            {
                metrics.emails_sent += value;
            } else if series.starts_with("training_credits_retries_total") {
                metrics.retries += value;
            }
        }
        metrics
    }

    /// Share of batches of at most `le` messages (a bucket bound of the
    /// worker's histograms: 1, 10, 100, 250, 1000…).
    fn batches_up_to(&self, le: f64) -> f64 {
        let count = self
            .batch_buckets
            .iter()
            .find(|(bound, _)| bound.parse::<f64>().is_ok_and(|b| b == le))
            .map_or(0.0, |(_, n)| *n);
        if self.batch_count > 0.0 {
            count / self.batch_count
        } else {
            0.0
        }
    }
}

// ---------------------------------------------------------------------------
// One worker run (steps 2, 3 and 4; step 5 on a ledger with history)

/// Times from publish to arrival, in milliseconds.
#[derive(Default)]
struct Times {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    measured: usize,
}

impl Times {
    /// The time from each message's publish (`sent`, by id) to its arrival
    /// (`arrivals`: the id it answers, and when).
    fn between<'a>(
        sent: &HashMap<&str, Instant>,
        arrivals: impl Iterator<Item = (&'a str, Instant)>,
    ) -> Times {
        let mut millis: Vec<f64> = arrivals
            .filter_map(|(id, at)| {
                sent.get(id)
                    .map(|sent| at.duration_since(*sent).as_secs_f64() * 1000.0)
            })
            .collect();
        millis.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            if millis.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * millis.len() as f64).ceil() as usize).clamp(1, millis.len());
            millis[rank - 1]
        };
        Times {
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            max_ms: millis.last().copied().unwrap_or(f64::NAN),
            measured: millis.len(),
        }
    }
}

impl std::fmt::Display for Times {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

#[derive(Default)]
struct Latency {
    times: Times,
    achieved_rate: f64,
    /// Batches the worker applied during this step, their mean size and
    /// mean apply+commit time.
    batches: f64,
    mean_batch: f64,
    apply_ms_per_batch: f64,
    /// Outbox backlog when the last event had been published.
    backlog_after_publishing: BTreeMap<String, f64>,
    /// Where the CPU went while they were published and taken.
    cpu: CpuSplit,
}

#[derive(Default)]
struct Run {
    events_per_second: f64,
    seconds: f64,
    startup_seconds: f64,
    /// Where the CPU went from the worker's start to the run's end.
    cpu: CpuSplit,
    /// When /metrics first showed every message applied (seconds from start).
    applied_at: Option<f64>,
    outbound_at: f64,
    /// When the whole outbox (emails included) was sent.
    drained_at: Option<f64>,
    backlog_when_applied: BTreeMap<String, f64>,
    metrics: Metrics,
    latency: Option<Latency>,
    peak_mib: f64,
    verify_ok: bool,
    outbound_ok: bool,
    problems: Vec<String>,
    notes: Vec<String>,
}

async fn worker_run(
    label: &str,
    vhost: &Vhost,
    database: &Database,
    workload: &Workload,
    steady: Option<(&Workload, u32)>,
) -> BenchResult<Run> {
    let mut run = Run::default();
    let retry_delays = Config::from_vars(|_| None)
        .map_err(fail("default configuration"))?
        .retry_delays;
    let (connection, channel) = connect(&vhost.url, &retry_delays)
        .await
        .map_err(fail("the broker"))?;
    let capture = Capture::start(&connection, &channel).await?;
    publish_all(&channel, INBOUND_EXCHANGE, None, &workload.messages).await?;
    let loaded = ready_in(&channel, WORKER_QUEUE).await?;
    if loaded as usize != workload.messages.len() {
        return Err(format!(
            "{loaded} messages in the worker queue, {} published",
            workload.messages.len()
        ));
    }
    let total = workload.messages.len() as f64;
    let expected = workload.expected.len();
    eprintln!(
        "  {label}: {} messages loaded into {WORKER_QUEUE}; starting the worker",
        workload.messages.len()
    );

    let started = Instant::now();
    let mut worker = Worker::start(&database.url, &vhost.url)?;
    let cpu_at_start = CpuReading::take(worker.child.id());
    worker.ready().await?;
    run.startup_seconds = started.elapsed().as_secs_f64();

    // Until every expected outbound event has arrived.
    let mut last_progress = (Instant::now(), 0usize, 0.0f64);
    let mut next_scrape = Instant::now();
    let mut latest = Metrics::default();
    let events_done = loop {
        {
            let arrivals = capture.arrivals.lock().expect("capture lock");
            if arrivals.len() >= expected {
                break arrivals[expected - 1].at;
            }
        }
        let now = Instant::now();
        if now >= next_scrape {
            next_scrape = now + Duration::from_millis(250);
            if let Some(metrics) = worker.metrics().await {
                if run.applied_at.is_none() && metrics.messages >= total {
                    run.applied_at = Some(started.elapsed().as_secs_f64());
                    run.backlog_when_applied = metrics.backlog.clone();
                }
                latest = metrics;
            }
        }
        let count = capture.len();
        let applied = latest.messages;
        if count != last_progress.1 || applied != last_progress.2 {
            last_progress = (now, count, applied);
        } else if now.duration_since(last_progress.0) > STALL_LIMIT {
            let metrics = latest;
            let (_, _, _, tail) = worker.stop().await;
            return Err(format!(
                "no progress for {} s: {count} of {expected} outbound events, {} of {total} messages applied \
                 (outcomes {:?}, retries {}); worker log: {tail}",
                STALL_LIMIT.as_secs(),
                metrics.messages,
                metrics.outcomes,
                metrics.retries
            ));
        }
        if let Ok(Some(status)) = worker.child.try_wait() {
            return Err(format!(
                "the worker exited ({status}): {}",
                worker.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Every message taken off the worker queue (ready = 0)…
    let mut queue_done = Instant::now();
    loop {
        if ready_in(&channel, WORKER_QUEUE).await? == 0 {
            break;
        }
        queue_done = Instant::now();
        if queue_done.duration_since(events_done) > STALL_LIMIT {
            return Err("the worker queue kept ready messages".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = events_done.max(queue_done);
    run.seconds = end.duration_since(started).as_secs_f64();
    run.outbound_at = events_done.duration_since(started).as_secs_f64();
    run.cpu = cpu_at_start.until(&CpuReading::take(worker.child.id()));
    run.events_per_second = total / run.seconds;
    // …and acknowledged (ready + unacked = 0), checked with rabbitmqctl
    // outside the timing: each call starts an Erlang VM.
    let mut acknowledged = false;
    for _ in 0..60 {
        if vhost.queue_messages(WORKER_QUEUE) == Some(0) {
            acknowledged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if !acknowledged {
        run.problems.push(format!(
            "{WORKER_QUEUE} still holds unacknowledged messages after the run"
        ));
    }
    run.metrics = worker.metrics().await.unwrap_or_default();
    // The emails the run produced (not part of the timing): when the whole
    // outbox is sent the worker is idle.
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        match worker.metrics().await {
            Some(metrics) if metrics.backlog.values().all(|rows| *rows == 0.0) => {
                run.drained_at = Some(started.elapsed().as_secs_f64());
                run.metrics.emails_sent = metrics.emails_sent;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    if run.drained_at.is_none() {
        run.problems
            .push("the outbox was not drained within 10 minutes".to_owned());
    }

    // Step 3: latency at a steady rate, on the idle worker.
    if let Some((steady, rate)) = steady {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = worker.metrics().await.unwrap_or_default();
        let cpu_at_start = CpuReading::take(worker.child.id());
        let mut measured = latency(&channel, &capture, &worker, steady, rate).await?;
        measured.cpu = cpu_at_start.until(&CpuReading::take(worker.child.id()));
        let after = worker.metrics().await.unwrap_or_default();
        measured.batches = after.batch_count - before.batch_count;
        if measured.batches > 0.0 {
            measured.mean_batch = (after.batch_sum - before.batch_sum) / measured.batches;
            measured.apply_ms_per_batch =
                1000.0 * (after.apply_sum - before.apply_sum) / measured.batches;
        }
        run.latency = Some(measured);
    }

    let (peak_kib, clean, warnings, _) = worker.stop().await;
    run.peak_mib = peak_kib as f64 / 1024.0;
    if !clean {
        run.problems
            .push("the worker did not stop cleanly on SIGTERM".to_owned());
    }
    if !warnings.is_empty() {
        run.notes.push(format!("worker log: {warnings}"));
    }

    // Exactly the expected outbound events, no more (a late duplicate would
    // show here), none missing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut wanted: HashMap<&str, usize> = workload
        .expected
        .iter()
        .map(|id| (id.as_str(), 1))
        .collect();
    if let Some((steady, _)) = steady {
        wanted.extend(steady.expected.iter().map(|id| (id.as_str(), 1)));
    }
    let wanted_total = wanted.len();
    let mut unexpected = 0;
    let received = {
        let arrivals = capture.arrivals.lock().expect("capture lock");
        for arrival in arrivals.iter() {
            match wanted.get_mut(arrival.causation.as_str()) {
                Some(left) if *left > 0 => *left -= 1,
                _ => unexpected += 1,
            }
        }
        arrivals.len()
    };
    let missing: usize = wanted.values().sum();
    run.outbound_ok = missing == 0 && unexpected == 0;
    if !run.outbound_ok {
        run.problems.push(format!(
            "outbound events: {received} received, {wanted_total} expected ({missing} missing, {unexpected} unexpected); by type {:?}, expected {:?}",
            capture.types.lock().expect("capture lock"),
            workload.expected_types
        ));
    }
    let dead = ready_in(&channel, DEAD_QUEUE).await?;
    if dead as usize != workload.malformed {
        run.problems.push(format!(
            "{dead} dead letters, {} malformed messages published",
            workload.malformed
        ));
    }
    let _ = connection.close(200, "done".into()).await;

    match run_command(&["verify"], &database.url) {
        Ok(_) => run.verify_ok = true,
        Err(error) => run.problems.push(format!("verify: {error}")),
    }
    Ok(run)
}

/// Publishes `steady` at `rate` per second and measures, per event, the time
/// from just before its publish to the arrival of its outbound event.
async fn latency(
    channel: &Channel,
    capture: &Capture,
    worker: &Worker,
    steady: &Workload,
    rate: u32,
) -> BenchResult<Latency> {
    let before = capture.len();
    let (sent, confirms, publishing) =
        publish_steadily(channel, INBOUND_EXCHANGE, None, &steady.messages, rate).await?;
    let backlog_after_publishing = worker
        .metrics()
        .await
        .map(|metrics| metrics.backlog)
        .unwrap_or_default();
    all_acked(confirms).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while capture.len() < before + steady.expected.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let times = Times::between(
        &sent,
        capture.arrivals.lock().expect("capture lock")[before..]
            .iter()
            .map(|arrival| (arrival.causation.as_str(), arrival.at)),
    );
    Ok(Latency {
        times,
        achieved_rate: steady.messages.len() as f64 / publishing,
        backlog_after_publishing,
        ..Latency::default()
    })
}

// ---------------------------------------------------------------------------
// One backend: steps 1 to 5

struct Row {
    backend: Backend,
    ceiling: Ceiling,
    empty: Run,
    history: Option<Run>,
    fill_seconds: f64,
}

async fn prepare(
    backend: Backend,
    options: &Options,
    tag: &str,
    history: u64,
) -> BenchResult<(Database, f64)> {
    let database = Database::create(backend, options, tag).await?;
    run_command(&["migrate"], &database.url)?;
    let started = Instant::now();
    let dialect = Dialect {
        backend,
        now_micros: chrono::Utc::now().timestamp_micros(),
    };
    let accounts = options.accounts as u64;
    database.execute(&seed_sql(&dialect, accounts)).await?;
    if history > 0 {
        database
            .execute(&history_sql(&dialect, accounts, history))
            .await?;
    }
    // A ledger in service has been vacuumed and checkpointed: the run
    // should not pay for the bulk load.
    match backend {
        Backend::Postgres => {
            database.execute("VACUUM ANALYZE").await?;
            database.execute("CHECKPOINT").await?;
        }
        Backend::Sqlite => database.execute("PRAGMA wal_checkpoint(TRUNCATE)").await?,
    }
    Ok((database, started.elapsed().as_secs_f64()))
}

async fn bench_backend(
    backend: Backend,
    options: &Options,
    workload: &Workload,
    steady: &Workload,
) -> BenchResult<Row> {
    let pid = std::process::id();
    let tag = backend.tag();
    eprintln!("{}:", backend.label());
    let vhost = Vhost::create(format!("tc_bench_{pid}_{tag}"), &options.amqp)?;
    let steady = (options.latency_seconds > 0).then_some((steady, options.rate));
    let ceiling = broker_ceiling(&vhost, &workload.messages, steady).await?;
    eprintln!(
        "  broker ceiling: published {:.0} msg/s, consumed {:.0} msg/s; relayed {:.0} msg/s",
        ceiling.publish_per_second, ceiling.consume_per_second, ceiling.relay_per_second
    );
    let (database, _) = prepare(backend, options, &format!("{tag}_empty"), 0).await?;
    let empty = worker_run("empty ledger", &vhost, &database, workload, steady).await?;
    drop(database);
    drop(vhost);
    eprintln!(
        "  empty ledger: {:.0} events/s ({:.1} s); verify {}, outbound {}",
        empty.events_per_second,
        empty.seconds,
        ok(empty.verify_ok),
        ok(empty.outbound_ok)
    );
    let mut history = None;
    let mut fill_seconds = 0.0;
    if options.history > 0 {
        eprintln!(
            "  filling a ledger with {} journal entries…",
            thousands(options.history as f64)
        );
        let (database, seconds) =
            prepare(backend, options, &format!("{tag}_history"), options.history).await?;
        fill_seconds = seconds;
        let vhost = Vhost::create(format!("tc_bench_{pid}_{tag}_history"), &options.amqp)?;
        let run = worker_run("with history", &vhost, &database, workload, None).await?;
        eprintln!(
            "  with history: {:.0} events/s ({:.1} s); verify {}, outbound {}",
            run.events_per_second,
            run.seconds,
            ok(run.verify_ok),
            ok(run.outbound_ok)
        );
        history = Some(run);
    }
    Ok(Row {
        backend,
        ceiling,
        empty,
        history,
        fill_seconds,
    })
}

// ---------------------------------------------------------------------------
// Output

fn ok(flag: bool) -> &'static str {
    if flag { "ok" } else { "FAILED" }
}

fn thousands(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    let digits = format!("{:.0}", value.round());
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn print_table(rows: &[Row], options: &Options, workload: &Workload) {
    println!();
    println!(
        "Throughput, {} inbound events ({} valid: {} duplicates, {} malformed), {} pre-existing accounts \
         + {} opened; history {} journal entries; latency at {}/s for {} s",
        thousands(workload.messages.len() as f64),
        thousands(workload.expected.len() as f64),
        workload.duplicates,
        workload.malformed,
        thousands(options.accounts as f64),
        workload
            .inbound_types
            .get("credits.account.opened")
            .copied()
            .unwrap_or(0),
        thousands(options.history as f64),
        thousands(f64::from(options.rate)),
        options.latency_seconds
    );
    println!();
    println!(
        "| backend | broker ceiling msg/s | worker events/s | ratio | events/s, {} entries of history | vs empty | p50 ms | p99 ms | peak RSS MiB | verify | outbound |",
        thousands(options.history as f64)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let ratio = row.empty.events_per_second / row.ceiling.consume_per_second;
        let (history_rate, history_ratio) = match &row.history {
            Some(run) => (
                thousands(run.events_per_second),
                format!(
                    "{:.0} %",
                    100.0 * run.events_per_second / row.empty.events_per_second
                ),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let (p50, p99) = match &row.empty.latency {
            Some(latency) => (
                format!("{:.1}", latency.times.p50_ms),
                format!("{:.1}", latency.times.p99_ms),
            ),
            None => ("-".to_owned(), "-".to_owned()),
        };
        let peak = row
            .history
            .as_ref()
            .map_or(row.empty.peak_mib, |h| h.peak_mib.max(row.empty.peak_mib));
        let verify = row.empty.verify_ok && row.history.as_ref().is_none_or(|h| h.verify_ok);
        let outbound = row.empty.outbound_ok && row.history.as_ref().is_none_or(|h| h.outbound_ok);
        println!(
            "| {} | {} | {} | {:.1} % | {} | {} | {} | {} | {:.1} | {} | {} |",
            row.backend.label(),
            thousands(row.ceiling.consume_per_second),
            thousands(row.empty.events_per_second),
            100.0 * ratio,
            history_rate,
            history_ratio,
            p50,
            p99,
            peak,
            ok(verify),
            ok(outbound)
        );
    }
    println!();
    println!("Targets (issue 5):");
    for row in rows {
        let ratio = row.empty.events_per_second / row.ceiling.consume_per_second;
        let target = row.backend.target_ratio();
        let mut lines = vec![format!(
            "throughput {:.1} % of the ceiling (target ≥ {:.0} %; the broker alone on the same path, \
             no worker: {:.1} %): {}",
            100.0 * ratio,
            100.0 * target,
            100.0 * row.ceiling.relay_per_second / row.ceiling.consume_per_second,
            met(ratio >= target)
        )];
        if let Some(history) = &row.history {
            let share = history.events_per_second / row.empty.events_per_second;
            lines.push(format!(
                "with history {:.0} % of the empty ledger (target ≥ 90 %): {}",
                100.0 * share,
                met(share >= 0.9)
            ));
        }
        if let Some(latency) = &row.empty.latency {
            let alone = row
                .ceiling
                .latency
                .as_ref()
                .map_or(String::new(), |(times, _)| {
                    format!(
                        "; the broker alone on the same path: {:.1} ms",
                        times.p99_ms
                    )
                });
            lines.push(format!(
                "p99 {:.1} ms (target ≤ 25 ms{alone}): {}",
                latency.times.p99_ms,
                met(latency.times.p99_ms <= 25.0)
            ));
        }
        let peak = row
            .history
            .as_ref()
            .map_or(row.empty.peak_mib, |h| h.peak_mib.max(row.empty.peak_mib));
        lines.push(format!(
            "peak RSS {peak:.1} MiB = {:.1} MB (target ≤ 150 MB): {}",
            peak * 1.048_576,
            met(peak * 1.048_576 <= 150.0)
        ));
        println!("  {}: {}", row.backend.label(), lines.join("; "));
    }
    println!();
    println!("Details:");
    for row in rows {
        println!(
            "  {}: broker ceiling: publish with confirms {} msg/s (CPU: {}), consume {} msg/s (CPU: {})",
            row.backend.label(),
            thousands(row.ceiling.publish_per_second),
            row.ceiling
                .publish_cpu
                .per_message(workload.messages.len() as f64),
            thousands(row.ceiling.consume_per_second),
            row.ceiling
                .consume_cpu
                .per_message(workload.messages.len() as f64)
        );
        println!(
            "    the broker alone on the worker's path (the workload through a relay in the bench \
             instead of the worker): {} msg/s, {:.1} % of the ceiling (CPU: {})",
            thousands(row.ceiling.relay_per_second),
            100.0 * row.ceiling.relay_per_second / row.ceiling.consume_per_second,
            row.ceiling
                .relay_cpu
                .per_message(workload.messages.len() as f64)
        );
        if let Some((times, cpu)) = &row.ceiling.latency {
            println!(
                "    the broker alone on the worker's path at the latency step's rate \
                 (a relay in the bench instead of the worker): {} over {} messages; CPU: {}",
                times,
                thousands(times.measured as f64),
                cpu.per_message(times.measured as f64)
            );
        }
        let mut runs = vec![("empty ledger", &row.empty)];
        if let Some(history) = &row.history {
            runs.push(("with history", history));
        }
        for (name, run) in runs {
            let m = &run.metrics;
            let mean_batch = if m.batch_count > 0.0 {
                m.batch_sum / m.batch_count
            } else {
                0.0
            };
            // /metrics is polled every 0.25 s: a run whose last batch was
            // applied within the last poll before the end has no figure.
            let applied = match run.applied_at {
                Some(at) => format!(
                    "all applied by {at:.1} s, when the outbox backlog was {:?}",
                    run.backlog_when_applied
                ),
                None => "all applied within 0.25 s of the end".to_owned(),
            };
            println!(
                "    {name}: {:.1} s ({} events/s), startup {:.2} s; worker CPU {:.1} s; CPU: {}; {applied}; \
                 last outbound event at {:.1} s; whole outbox (emails too) sent at {}",
                run.seconds,
                thousands(run.events_per_second),
                run.startup_seconds,
                run.cpu.worker(),
                run.cpu.per_message(workload.messages.len() as f64),
                run.outbound_at,
                run.drained_at
                    .map_or("-".to_owned(), |s| format!("{s:.1} s"))
            );
            println!(
                "      {} batches, mean {:.1} messages (1: {:.0} %, ≤ 10: {:.0} %, ≤ 100: {:.0} %, ≤ 250: {:.0} %); \
                 apply+commit {:.1} s in all ({:.2} ms per batch, {:.0} % of the run); emails sent {}; outcomes {:?}; peak RSS {:.1} MiB",
                thousands(m.batch_count),
                mean_batch,
                100.0 * m.batches_up_to(1.0),
                100.0 * m.batches_up_to(10.0),
                100.0 * m.batches_up_to(100.0),
                100.0 * m.batches_up_to(250.0),
                m.apply_sum,
                if m.batch_count > 0.0 {
                    1000.0 * m.apply_sum / m.batch_count
                } else {
                    0.0
                },
                100.0 * m.apply_sum / run.seconds,
                thousands(m.emails_sent),
                m.outcomes,
                run.peak_mib
            );
            if let Some(latency) = &run.latency {
                println!(
                    "      latency: {} events at {:.0}/s achieved: {}; \
                     {} batches of {:.1} messages on average, {:.1} ms apply+commit each; outbox backlog after the last publish {:?}; CPU: {}",
                    thousands(latency.times.measured as f64),
                    latency.achieved_rate,
                    latency.times,
                    thousands(latency.batches),
                    latency.mean_batch,
                    latency.apply_ms_per_batch,
                    latency.backlog_after_publishing,
                    latency.cpu.per_message(latency.times.measured as f64)
                );
            }
            for note in &run.notes {
                println!("      {note}");
            }
            for problem in &run.problems {
                println!("      WARNING: {problem}");
            }
        }
        if row.history.is_some() {
            println!("    history fill (not timed): {:.1} s", row.fill_seconds);
        }
    }
}

fn met(flag: bool) -> &'static str {
    if flag { "met" } else { "MISSED" }
}

async fn bench(options: Options) -> BenchResult<bool> {
    let mut generator = Generator::new(options.accounts);
    let workload = generator.workload(options.events);
    let steady = generator.steady(options.rate as usize * options.latency_seconds as usize);
    eprintln!(
        "training-credits throughput bench: {} events ({} valid, {} duplicates, {} malformed), \
         {} accounts, history {}, backends {:?}; worker {BINARY}{}{}",
        workload.messages.len(),
        workload.expected.len(),
        workload.duplicates,
        workload.malformed,
        options.accounts,
        options.history,
        options.backends,
        std::env::var("PREFETCH").map_or(String::new(), |v| format!(", PREFETCH={v}")),
        std::env::var("BATCH_SIZE").map_or(String::new(), |v| format!(", BATCH_SIZE={v}")),
    );
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for backend in &options.backends {
        match bench_backend(*backend, &options, &workload, &steady).await {
            Ok(row) => rows.push(row),
            Err(error) => {
                eprintln!("WARNING: {}: {error}", backend.label());
                failures.push(format!("{}: {error}", backend.label()));
            }
        }
    }
    print_table(&rows, &options, &workload);
    let mut correct = failures.is_empty();
    for row in &rows {
        for run in std::iter::once(&row.empty).chain(row.history.as_ref()) {
            if !run.problems.is_empty() || !run.verify_ok || !run.outbound_ok {
                correct = false;
            }
        }
    }
    for failure in &failures {
        println!("WARNING: the run failed: {failure}");
    }
    if !correct {
        println!("WARNING: correctness problems above: the bench exits non-zero.");
    }
    Ok(correct)
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("throughput: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("throughput: cannot start the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(bench(options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("throughput: {error}");
            ExitCode::from(1)
        }
    }
}
