//! SPEC §6 rule 8, as an attacker sees it: every inbound command that needs
//! an owner or staff is tried by a stranger, a former owner, the owner of
//! another account and a source that only resembles a staff one (and, for
//! staff-only commands, by a current owner without a staff source). Each is
//! refused with the contract's reason in a `training-credits.command.refused`
//! event and changes nothing else: every table of the ledger is compared,
//! row by row, before and after. The very same messages from an owner and
//! from a staff source are accepted, so the matrix shows a boundary, not a
//! wall. Both backends.

use crate::support as common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use training_credits::domain::model::{AccountStatus, ApprovalMode};
use training_credits::domain::{Outcome, Refusal};
use training_credits::store::Store;

use common::World;

const BOSS: &str = "boss@acme.test";
const CO: &str = "co@acme.test";
const THIRD: &str = "third@acme.test";
const FORMER: &str = "former@acme.test";
const STRANGER: &str = "stranger@elsewhere.test";
const OTHER: &str = "other@beta.test";
const STAFF_ACTOR: &str = "staff@admin.test";
const CODE: &str = "ACME-1234";
const BETA_CODE: &str = "BETA-5678";

// ---------------------------------------------------------------------------
// The commands and who tries them
// ---------------------------------------------------------------------------

/// Every inbound command that needs an owner or staff (SPEC §5.1 and §6
/// rule 8, `authorize`, `decision`, `require_staff` and `request_report` in
/// `src/domain/rules.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Update,
    AddOwner,
    RemoveOwner,
    RotateCode,
    Approve,
    Deny,
    AccountReport,
    Close,
    ExtendLot,
    AllAccountsReport,
}

impl Command {
    const ALL: [Command; 10] = [
        Command::Update,
        Command::AddOwner,
        Command::RemoveOwner,
        Command::RotateCode,
        Command::Approve,
        Command::Deny,
        Command::AccountReport,
        Command::Close,
        Command::ExtendLot,
        Command::AllAccountsReport,
    ];

    fn type_name(self) -> &'static str {
        match self {
            Command::Update => "credits.account.updated",
            Command::AddOwner => "credits.account.owner_added",
            Command::RemoveOwner => "credits.account.owner_removed",
            Command::RotateCode => "credits.account.code_rotated",
            Command::Approve => "credits.redemption.approved",
            Command::Deny => "credits.redemption.denied",
            Command::AccountReport | Command::AllAccountsReport => "credits.report.requested",
            Command::Close => "credits.account.closed",
            Command::ExtendLot => "credits.lot.extended",
        }
    }

    /// Commands only a source of `ADMIN_SOURCES` may run; the others an
    /// owner of the account may run too.
    fn staff_only(self) -> bool {
        matches!(
            self,
            Command::Close | Command::ExtendLot | Command::AllAccountsReport
        )
    }

    /// The reason SPEC §5.2 gives when the sender may not run it.
    fn refusal(self) -> Refusal {
        if self.staff_only() {
            Refusal::NotStaff
        } else {
            Refusal::NotAnOwner
        }
    }

    /// The account the refusal is about (`subject` and `account_id`).
    fn account(self) -> Option<&'static str> {
        match self {
            Command::AllAccountsReport => None,
            _ => Some("acme"),
        }
    }

    /// The message's `data` sent by `actor` (the `actor`, `approver` or
    /// `recipient` field), aimed at `aim`.
    fn data(self, actor: &str, aim: &Aim, now: training_credits::domain::Ts) -> Value {
        match self {
            Command::Update => json!({
                "account_id": "acme",
                "actor": actor,
                "name": aim.name,
                "approval_mode": aim.approval_mode,
                "notes": format!("set by {actor}"),
            }),
            Command::AddOwner => json!({
                "account_id": "acme",
                "actor": actor,
                "owner": {"email": aim.new_owner.unwrap_or(actor), "name": "New Owner"},
            }),
            Command::RemoveOwner => json!({
                "account_id": "acme",
                "actor": actor,
                "email": aim.removed_owner,
            }),
            Command::RotateCode => json!({
                "account_id": "acme",
                "actor": actor,
                "code": aim.code,
            }),
            Command::Approve => json!({
                "request_id": aim.request,
                "approver": actor,
                "note": "fine by me",
            }),
            Command::Deny => json!({
                "request_id": aim.request,
                "approver": actor,
                "reason": "not this quarter",
            }),
            Command::AccountReport => json!({
                "report": "transactions",
                "format": "csv",
                "recipient": actor,
                "account_id": "acme",
            }),
            Command::Close => json!({
                "account_id": "acme",
                "actor": actor,
                "reason": "contract ended",
            }),
            Command::ExtendLot => json!({
                "account_id": "acme",
                "purchase_id": "p1",
                "expires_at": now.plus_days(aim.extend_days),
                "actor": actor,
                "reason": "goodwill",
            }),
            Command::AllAccountsReport => json!({
                "report": "balances",
                "format": "csv",
                "recipient": actor,
            }),
        }
    }
}

/// Inbound types that need neither an owner nor staff, and why. With
/// [`Command::ALL`] they must name every schema under `schemas/in`, so a new
/// command cannot slip past this suite unclassified.
const OPEN_COMMANDS: [(&str, &str); 6] = [
    (
        "credits.account.opened",
        "anyone the portal lets sign up; an existing account is refused account_exists",
    ),
    (
        "credits.purchase.completed",
        "the e-commerce system records what was paid",
    ),
    (
        "credits.purchase.refunded",
        "the e-commerce system reports a refunded payment; PUBLISHERS binds who may claim its source",
    ),
    (
        "credits.redemption.requested",
        "any learner: the account's code is the credential",
    ),
    (
        "credits.redemption.cancelled",
        "the requesting learner only, refused not_requester (tests/it/rules.rs)",
    ),
    (
        "credits.enrollment.unenrolled",
        "the LMS reports what happened to an enrolment",
    ),
];

/// Who sends a message: the inbound `source` and the email in its `actor`
/// (or `approver`, or `recipient`) field.
struct Actor {
    who: &'static str,
    source: &'static str,
    email: &'static str,
}

/// Everyone who must be refused every command.
const ATTACKERS: [Actor; 4] = [
    Actor {
        who: "a stranger",
        source: "portal",
        email: STRANGER,
    },
    Actor {
        who: "a former owner",
        source: "portal",
        email: FORMER,
    },
    Actor {
        who: "the owner of another account",
        source: "portal",
        email: OTHER,
    },
    Actor {
        who: "a source that only resembles a staff one",
        source: "Admin",
        email: STAFF_ACTOR,
    },
];

/// Refused staff-only commands, accepted the others.
const OWNER: Actor = Actor {
    who: "a current owner",
    source: "portal",
    email: BOSS,
};

/// Accepted everything, though not an owner of anything.
const STAFF: Actor = Actor {
    who: "staff",
    source: common::STAFF,
    email: STAFF_ACTOR,
};

/// What a message aims at. Every refused attempt aims at the same things;
/// each accepted one at its own, so that the owner's and staff's both have
/// something to change.
struct Aim {
    request: &'static str,
    /// `None`: the actor adds themselves.
    new_owner: Option<&'static str>,
    removed_owner: &'static str,
    code: &'static str,
    name: &'static str,
    approval_mode: &'static str,
    extend_days: i64,
}

const ATTACK: Aim = Aim {
    request: "r1",
    new_owner: None,
    removed_owner: BOSS,
    code: "MINE-0001",
    name: "Hijacked",
    approval_mode: "automatic",
    extend_days: 800,
};

const BY_OWNER: Aim = Aim {
    request: "r1",
    new_owner: Some("new1@acme.test"),
    removed_owner: CO,
    code: "ACME-2222",
    name: "Acme, renamed by its owner",
    approval_mode: "automatic",
    extend_days: 900,
};

const BY_STAFF: Aim = Aim {
    request: "r2",
    new_owner: Some("new2@acme.test"),
    removed_owner: THIRD,
    code: "ACME-3333",
    name: "Acme, renamed by staff",
    approval_mode: "manual",
    extend_days: 1000,
};

// ---------------------------------------------------------------------------
// The ledger every case starts from
// ---------------------------------------------------------------------------

/// `acme` (manual; owners BOSS, CO, THIRD; 100 credits in `p1`; pending
/// requests `r1` for 30 and `r2` for 20) once also owned by FORMER, who was
/// removed after the requests were made; `beta` (manual; owner OTHER; 50
/// credits; pending request `rb`). STRANGER owns nothing.
async fn ledger<S: Store>(w: &mut World<S>) {
    let opened = w
        .send(
            "credits.account.opened",
            json!({
                "account_id": "acme",
                "name": "Acme",
                "owners": [
                    {"email": BOSS, "name": "Bea Boss"},
                    {"email": CO, "name": "Cory Co"},
                    {"email": THIRD, "name": "Tess Third"},
                    {"email": FORMER, "name": "Fred Former"},
                ],
                "approval_mode": "manual",
                "code": CODE,
            }),
        )
        .await;
    assert_eq!(opened, Outcome::Applied);
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", CODE, "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", CODE, "l2", "c2", "20").await,
        Outcome::Applied
    );
    assert_eq!(
        w.open("beta", "manual", OTHER, BETA_CODE).await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("beta", "b1", "50").await, Outcome::Applied);
    assert_eq!(
        w.request("rb", BETA_CODE, "l3", "c1", "10").await,
        Outcome::Applied
    );
    let removed = w
        .send(
            "credits.account.owner_removed",
            json!({"account_id": "acme", "actor": BOSS, "email": FORMER}),
        )
        .await;
    assert_eq!(removed, Outcome::Applied);

    // The roles are what the cases say they are.
    let acme = w.account("acme").await;
    let owners: Vec<&str> = acme.owners.iter().map(|o| o.email.as_str()).collect();
    assert_eq!(owners, [BOSS, CO, THIRD], "FORMER is a former owner");
    let beta = w.account("beta").await;
    let owners: Vec<&str> = beta.owners.iter().map(|o| o.email.as_str()).collect();
    assert_eq!(owners, [OTHER]);
    assert_eq!(w.status_of("r1").await, "pending");
    assert_eq!(w.status_of("r2").await, "pending");
    assert_eq!(w.available("acme").await, "50.00");
    w.advance_days(1);
}

// ---------------------------------------------------------------------------
// "Changes nothing": every table, row by row
// ---------------------------------------------------------------------------

/// A second connection to the test's database, to read every table.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Every row of every table, as text, sorted.
type Tables = BTreeMap<String, Vec<String>>;

/// Tables a refused command may grow, by exactly one row each: the message
/// is remembered as seen (idempotency), and its refusal is queued for
/// publishing.
const GROWS_BY_ONE: [&str; 2] = ["processed", "outbox"];

impl Db {
    async fn connect(url: &str) -> Db {
        if url.starts_with("sqlite:") {
            Db::Sqlite(sqlx::SqlitePool::connect(url).await.expect("SQLite opens"))
        } else {
            Db::Postgres(
                sqlx::PgPool::connect(url)
                    .await
                    .expect("PostgreSQL connects"),
            )
        }
    }

    async fn tables(&self) -> Tables {
        use sqlx::Row;
        let mut tables = Tables::new();
        match self {
            Db::Sqlite(pool) => {
                let names: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%' ORDER BY name",
                )
                .fetch_all(pool)
                .await
                .expect("the table names");
                for name in names {
                    let columns: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT name FROM pragma_table_info('{name}') ORDER BY cid"
                    )))
                    .fetch_all(pool)
                    .await
                    .expect("the column names");
                    let row = columns
                        .iter()
                        .map(|c| format!("'{c}=' || quote(\"{c}\")"))
                        .collect::<Vec<_>>()
                        .join(" || ' ' || ");
                    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "SELECT {row} AS r FROM \"{name}\" ORDER BY r"
                    )))
                    .fetch_all(pool)
                    .await
                    .expect("the rows");
                    tables.insert(name, rows.iter().map(|r| r.get("r")).collect());
                }
            }
            Db::Postgres(pool) => {
                let names: Vec<String> = sqlx::query_scalar(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' \
                     AND tablename NOT LIKE '_sqlx%' ORDER BY tablename",
                )
                .fetch_all(pool)
                .await
                .expect("the table names");
                for name in names {
                    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT row_to_json(t)::text AS r FROM \"{name}\" t ORDER BY r"
                    )))
                    .fetch_all(pool)
                    .await
                    .expect("the rows");
                    tables.insert(name, rows);
                }
            }
        }
        tables
    }

    /// Queued report deliveries.
    async fn reports_queued(&self) -> i64 {
        const QUERY: &str = "SELECT COUNT(*) FROM outbox WHERE kind = 'report'";
        match self {
            Db::Sqlite(pool) => sqlx::query_scalar(QUERY).fetch_one(pool).await,
            Db::Postgres(pool) => sqlx::query_scalar(QUERY).fetch_one(pool).await,
        }
        .expect("the outbox")
    }
}

/// Asserts that `after` differs from `before` only by one new row in each of
/// [`GROWS_BY_ONE`].
fn assert_only_the_refusal_was_written(before: &Tables, after: &Tables, case: &str) {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "{case}: the set of tables changed"
    );
    assert!(
        before.contains_key("accounts") && before.contains_key("journal"),
        "{case}: the snapshot reads the ledger's tables: {:?}",
        before.keys()
    );
    for (table, rows_before) in before {
        let rows_after = &after[table];
        if GROWS_BY_ONE.contains(&table.as_str()) {
            let kept: BTreeSet<&String> = rows_after.iter().collect();
            let lost: Vec<&String> = rows_before.iter().filter(|r| !kept.contains(r)).collect();
            assert!(
                lost.is_empty(),
                "{case}: rows of {table} changed: {lost:#?}"
            );
            assert_eq!(
                rows_after.len(),
                rows_before.len() + 1,
                "{case}: {table} must grow by exactly one row"
            );
        } else {
            let was: BTreeSet<&String> = rows_before.iter().collect();
            let is: BTreeSet<&String> = rows_after.iter().collect();
            assert!(
                was == is && rows_before.len() == rows_after.len(),
                "{case}: table {table} changed although the command was refused\n\
                 gone: {:#?}\nnew: {:#?}",
                was.difference(&is).collect::<Vec<_>>(),
                is.difference(&was).collect::<Vec<_>>(),
            );
        }
    }
}

/// The domain's view of everything an attacker could want to change, for a
/// readable diff before the row-by-row one.
async fn model<S: Store>(w: &World<S>) -> Value {
    let mut requests = Vec::new();
    for id in ["r1", "r2", "rb"] {
        requests.push(format!("{:?}", w.find_request(id).await));
    }
    json!({
        "acme": format!("{:?}", w.find_account("acme").await),
        "beta": format!("{:?}", w.find_account("beta").await),
        "requests": requests,
    })
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

/// Sends `command` from `actor` aimed at `ATTACK` and asserts it is refused
/// with the contract's reason and changes nothing.
async fn assert_refused<S: Store>(w: &mut World<S>, db: &Db, command: Command, actor: &Actor) {
    let case = format!(
        "{} by {} ({} from source `{}`)",
        command.type_name(),
        actor.who,
        actor.email,
        actor.source
    );
    let tables_before = db.tables().await;
    let model_before = model(w).await;
    let events_before = w.events().await.len();
    let emails_before = w.emails().await.len();

    let data = command.data(actor.email, &ATTACK, w.now);
    let outcome = w.send_from(actor.source, command.type_name(), data).await;

    assert_eq!(outcome, Outcome::Refused(command.refusal()), "{case}");
    let events = w.events().await;
    let new = &events[events_before..];
    assert_eq!(
        new.len(),
        1,
        "{case}: a refusal announces itself and nothing else: {new:#?}"
    );
    let event = &new[0];
    assert_eq!(
        event["type"], "training-credits.command.refused",
        "{case}: {event:#}"
    );
    let data = &event["data"];
    assert_eq!(
        data["reason"],
        command.refusal().as_str(),
        "{case}: {event:#}"
    );
    assert_eq!(
        data["command_type"],
        command.type_name(),
        "{case}: {event:#}"
    );
    assert_eq!(data["command_id"], w.last_event_id(), "{case}: {event:#}");
    assert_eq!(data["causation_id"], w.last_event_id(), "{case}: {event:#}");
    assert_eq!(data["account_id"], json!(command.account()), "{case}");
    match command.account() {
        Some(account) => assert_eq!(event["subject"], account, "{case}: {event:#}"),
        None => assert!(event.get("subject").is_none(), "{case}: {event:#}"),
    }
    assert_eq!(
        w.emails().await.len(),
        emails_before,
        "{case}: a refused command sends no email"
    );
    assert_eq!(
        model(w).await,
        model_before,
        "{case}: the accounts or requests changed although the command was refused"
    );
    assert_only_the_refusal_was_written(&tables_before, &db.tables().await, &case);
}

/// Sends `command` from `actor` aimed at `aim` and asserts it is accepted
/// and did what it says.
async fn assert_accepted<S: Store>(
    w: &mut World<S>,
    db: &Db,
    command: Command,
    actor: &Actor,
    aim: &Aim,
) {
    let case = format!("{} by {} ({})", command.type_name(), actor.who, actor.email);
    let events_before = w.events().await.len();
    let reports_before = db.reports_queued().await;
    let data = command.data(actor.email, aim, w.now);
    let outcome = w.send_from(actor.source, command.type_name(), data).await;
    assert_eq!(outcome, Outcome::Applied, "{case}");
    let new: Vec<Value> = w.events().await[events_before..].to_vec();
    assert!(
        new.iter()
            .all(|e| e["type"] != "training-credits.command.refused"),
        "{case}: accepted yet refused: {new:#?}"
    );
    let of_type = |type_name: &str| -> Value {
        new.iter()
            .find(|e| e["type"] == type_name)
            .map(|e| e["data"].clone())
            .unwrap_or_else(|| panic!("{case}: no {type_name} in {new:#?}"))
    };
    let acme = w.account("acme").await;
    let owners: Vec<&str> = acme.owners.iter().map(|o| o.email.as_str()).collect();
    match command {
        Command::Update => {
            assert_eq!(acme.name, aim.name, "{case}");
            let mode = if aim.approval_mode == "manual" {
                ApprovalMode::Manual
            } else {
                ApprovalMode::Automatic
            };
            assert_eq!(acme.approval_mode, mode, "{case}");
            let changes = of_type("training-credits.account.updated")["changes"].clone();
            assert!(
                changes.as_array().is_some_and(|c| c
                    .iter()
                    .any(|c| c["field"] == "name" && c["new"] == aim.name)),
                "{case}: {changes:#}"
            );
        }
        Command::AddOwner => {
            let added = aim.new_owner.expect("an accepted addition names the owner");
            assert!(owners.contains(&added), "{case}: {owners:?}");
            of_type("training-credits.account.updated");
        }
        Command::RemoveOwner => {
            assert!(!owners.contains(&aim.removed_owner), "{case}: {owners:?}");
            of_type("training-credits.account.updated");
        }
        Command::RotateCode => {
            assert_eq!(acme.code.as_str(), aim.code, "{case}");
            of_type("training-credits.account.updated");
        }
        Command::Approve => {
            assert_eq!(w.status_of(aim.request).await, "approved", "{case}");
            let approved = of_type("training-credits.redemption.approved");
            assert_eq!(approved["request_id"], aim.request, "{case}");
            assert_eq!(approved["decided_by"], actor.email, "{case}");
        }
        Command::Deny => {
            assert_eq!(w.status_of(aim.request).await, "denied", "{case}");
            let denied = of_type("training-credits.redemption.denied");
            assert_eq!(denied["request_id"], aim.request, "{case}");
            assert_eq!(denied["decided_by"], actor.email, "{case}");
        }
        Command::AccountReport | Command::AllAccountsReport => {
            assert_eq!(
                db.reports_queued().await,
                reports_before + 1,
                "{case}: the report is queued for its recipient"
            );
        }
        Command::Close => {
            assert_eq!(acme.status, AccountStatus::Closed, "{case}");
            assert_eq!(w.status_of("r1").await, "denied", "{case}");
        }
        Command::ExtendLot => {
            let extended = of_type("training-credits.lot.extended");
            assert_eq!(extended["purchase_id"], "p1", "{case}");
            let lot = acme
                .lots
                .iter()
                .find(|l| l.purchase_id.as_str() == "p1")
                .expect("lot p1");
            assert_eq!(lot.expires_at, w.now.plus_days(aim.extend_days), "{case}");
        }
    }
}

/// The whole row of the matrix for one command: refused to every attacker
/// (and to an owner without a staff source, for a staff-only command), then
/// accepted from an owner (unless staff-only) and from staff.
async fn check<S: Store>(mut w: World<S>, command: Command) {
    ledger(&mut w).await;
    let db = Db::connect(&w.url).await;
    let mut refused = 0;
    for actor in &ATTACKERS {
        assert_refused(&mut w, &db, command, actor).await;
        refused += 1;
    }
    if command.staff_only() {
        assert_refused(&mut w, &db, command, &OWNER).await;
        refused += 1;
    } else {
        assert_accepted(&mut w, &db, command, &OWNER, &BY_OWNER).await;
    }
    assert_eq!(refused, ATTACKERS.len() + usize::from(command.staff_only()));
    assert_accepted(&mut w, &db, command, &STAFF, &BY_STAFF).await;
    w.verify_ok().await;
}

async fn updating_an_account_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::Update).await;
}

async fn adding_an_owner_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::AddOwner).await;
}

async fn removing_an_owner_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::RemoveOwner).await;
}

async fn rotating_the_code_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::RotateCode).await;
}

async fn approving_a_request_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::Approve).await;
}

async fn denying_a_request_needs_one_of_its_owners_or_staff<S: Store>(w: World<S>) {
    check(w, Command::Deny).await;
}

async fn an_account_report_goes_only_to_one_of_its_owners_or_on_staff_request<S: Store>(
    w: World<S>,
) {
    check(w, Command::AccountReport).await;
}

async fn closing_an_account_needs_staff<S: Store>(w: World<S>) {
    check(w, Command::Close).await;
}

async fn extending_a_lot_needs_staff<S: Store>(w: World<S>) {
    check(w, Command::ExtendLot).await;
}

async fn an_all_accounts_report_needs_staff<S: Store>(w: World<S>) {
    check(w, Command::AllAccountsReport).await;
}

on_both_backends!(
    updating_an_account_needs_one_of_its_owners_or_staff,
    adding_an_owner_needs_one_of_its_owners_or_staff,
    removing_an_owner_needs_one_of_its_owners_or_staff,
    rotating_the_code_needs_one_of_its_owners_or_staff,
    approving_a_request_needs_one_of_its_owners_or_staff,
    denying_a_request_needs_one_of_its_owners_or_staff,
    an_account_report_goes_only_to_one_of_its_owners_or_on_staff_request,
    closing_an_account_needs_staff,
    extending_a_lot_needs_staff,
    an_all_accounts_report_needs_staff,
);

#[test]
fn every_inbound_command_is_either_in_the_matrix_or_open_to_its_senders() {
    let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/in");
    let mut on_disk: Vec<String> = std::fs::read_dir(folder)
        .expect("schemas/in")
        .map(|entry| {
            let name = entry.expect("a schema file").file_name();
            let name = name.to_string_lossy();
            name.strip_suffix(".json")
                .unwrap_or_else(|| panic!("{name} is a JSON schema"))
                .to_owned()
        })
        .collect();
    on_disk.sort();
    let mut classified: Vec<String> = Command::ALL
        .iter()
        .map(|c| c.type_name().to_owned())
        .chain(OPEN_COMMANDS.iter().map(|(t, _)| (*t).to_owned()))
        .collect();
    classified.sort();
    classified.dedup();
    assert_eq!(
        classified, on_disk,
        "every inbound type is either tried by the authorization matrix or listed, \
         with the reason, among the commands that need no owner or staff"
    );
}
