//! The storage code shared by both backends. The SQL is portable between
//! SQLite and PostgreSQL (numbered binds, `ON CONFLICT … DO UPDATE`, row
//! values); the few differences (how a write transaction begins, row locks)
//! are parameters of [`sql_store!`], which each backend instantiates.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;
use crate::domain::{Id, Ts};

/// Binds per statement stay well under SQLite's and PostgreSQL's limits.
pub(super) const BINDS_PER_STATEMENT_MAX: usize = 30_000;

// Lists of values are one bind (a JSON array on SQLite, an array on
// PostgreSQL), so their statements have one text and stay prepared. Rows to
// insert are gathered column by column ([`Rows`]): PostgreSQL binds each
// column as one array (`UNNEST`), one prepared statement per table; SQLite
// binds them row by row in multi-row `VALUES`.

/// The type of a column, the same in both schemas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Int,
    /// An instant ([`Ts`]).
    Time,
}

/// A table and the columns an insert fills, in order.
pub(super) struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Kind)],
}

impl Table {
    /// `INSERT INTO name (a, b, …) `.
    pub fn head(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        format!("INSERT INTO {} ({}) ", self.name, names.join(", "))
    }
}

/// The values of one column, a row each.
pub(super) enum Column {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Time(Vec<Option<Ts>>),
}

/// Rows to insert into a [`Table`], kept column by column. Values are given
/// row after row, each in the table's column order.
pub(super) struct Rows {
    pub table: &'static Table,
    pub columns: Vec<Column>,
    /// What follows the rows: an `ON CONFLICT` clause, or nothing.
    pub tail: &'static str,
    next: usize,
}

impl Rows {
    pub fn new(table: &'static Table, rows: usize, tail: &'static str) -> Rows {
        let columns = table
            .columns
            .iter()
            .map(|(_, kind)| match kind {
                Kind::Text => Column::Text(Vec::with_capacity(rows)),
                Kind::Int => Column::Int(Vec::with_capacity(rows)),
                Kind::Time => Column::Time(Vec::with_capacity(rows)),
            })
            .collect();
        Rows {
            table,
            columns,
            tail,
            next: 0,
        }
    }

    pub fn len(&self) -> usize {
        match &self.columns[0] {
            Column::Text(values) => values.len(),
            Column::Int(values) => values.len(),
            Column::Time(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The column the next value belongs to.
    fn slot(&mut self) -> (&'static str, &mut Column) {
        let at = self.next;
        self.next = (at + 1) % self.columns.len();
        (self.table.columns[at].0, &mut self.columns[at])
    }

    pub fn text(&mut self, value: impl Into<Option<String>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Text(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not a text column"),
        }
        self
    }

    pub fn int(&mut self, value: impl Into<Option<i64>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Int(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not an integer column"),
        }
        self
    }

    pub fn time(&mut self, value: impl Into<Option<Ts>>) -> &mut Rows {
        match self.slot() {
            (_, Column::Time(values)) => values.push(value.into()),
            (name, _) => unreachable!("{name} is not an instant column"),
        }
        self
    }
}

use Kind::{Int, Text, Time};

pub(super) const ACCOUNTS: Table = Table {
    name: "accounts",
    columns: &[
        ("account_id", Text),
        ("name", Text),
        ("status", Text),
        ("approval_mode", Text),
        ("code", Text),
        ("code_key", Text),
        ("scope", Text),
        ("low_balance_threshold", Int),
        ("notes", Text),
        ("created_at", Time),
    ],
};

pub(super) const OWNERS: Table = Table {
    name: "owners",
    columns: &[
        ("email", Text),
        ("account_id", Text),
        ("name", Text),
        ("position", Int),
    ],
};

pub(super) const LOTS: Table = Table {
    name: "lots",
    columns: &[
        ("account_id", Text),
        ("purchase_id", Text),
        ("credits", Int),
        ("remaining", Int),
        ("held", Int),
        ("expired", Int),
        ("purchased_at", Time),
        ("expires_at", Time),
        ("price_amount", Int),
        ("price_currency", Text),
        ("channel", Text),
        ("reminded_stage", Int),
        ("remind_at", Time),
        ("fingerprint", Text),
    ],
};

pub(super) const REDEMPTIONS: Table = Table {
    name: "redemptions",
    columns: &[
        ("request_id", Text),
        ("account_id", Text),
        ("learner_id", Text),
        ("learner_email", Text),
        ("learner_name", Text),
        ("item_id", Text),
        ("item_kind", Text),
        ("item_title", Text),
        ("item_group_ids", Text),
        ("cost", Int),
        ("status", Text),
        ("reason", Text),
        ("requested_at", Time),
        ("created_at", Time),
        ("decided_by", Text),
        ("decided_at", Time),
        ("allocations", Text),
        ("refunded", Int),
        ("fingerprint", Text),
    ],
};

pub(super) const JOURNAL: Table = Table {
    name: "journal",
    columns: &[
        ("at", Time),
        ("account_id", Text),
        ("entry", Text),
        ("purchase_id", Text),
        ("request_id", Text),
        ("amount", Int),
        ("held_delta", Int),
        ("balance_after", Int),
        ("actor", Text),
        ("causation_id", Text),
    ],
};

pub(super) const AUDIT: Table = Table {
    name: "audit",
    columns: &[
        ("at", Time),
        ("account_id", Text),
        ("actor", Text),
        ("field", Text),
        ("old_value", Text),
        ("new_value", Text),
        ("causation_id", Text),
    ],
};

pub(super) const PROCESSED: Table = Table {
    name: "processed",
    columns: &[
        ("source", Text),
        ("event_id", Text),
        ("digest", Text),
        ("outcome", Text),
        ("processed_at", Time),
    ],
};

pub(super) const CODE_ATTEMPTS: Table = Table {
    name: "code_attempts",
    columns: &[("learner_id", Text), ("at", Time)],
};

pub(super) const OUTBOX: Table = Table {
    name: "outbox",
    columns: &[
        ("id", Text),
        ("kind", Text),
        ("payload", Text),
        ("created_at", Time),
        ("next_attempt_at", Time),
        ("leased_by", Int),
    ],
};

pub(super) fn id(text: String) -> Result<Id, StoreError> {
    text.parse().map_err(StoreError::corrupt)
}

pub(super) fn opt_id(text: Option<String>) -> Result<Option<Id>, StoreError> {
    text.map(id).transpose()
}

/// A snake_case enum from its stored text.
pub(super) fn from_text<T: DeserializeOwned>(text: String) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text)).map_err(StoreError::corrupt)
}

/// The stored text of a snake_case enum.
pub(super) fn to_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        other => unreachable!("a unit enum serialises to a string, not {other:?}"),
    }
}

pub(super) fn from_json<T: DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(StoreError::corrupt)
}

pub(super) fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("ledger values serialise to JSON")
}

/// Implements [`Store`](super::Store) for `$store` (a struct with a
/// `pool: sqlx::Pool<$db>` field for reads, a `marks: SentMarks` field, an
/// inherent `fn writer` giving the pool every write goes through, and an
/// inherent `async fn write_gate`, taken around every write).
macro_rules! sql_store {
    ($store:ident, $db:ty, begin = $begin:literal, lock = $lock:literal, skip_locked = $skip:literal, holder_dead = $holder_dead:literal, agg = $agg:literal, in_list = $in_list:literal, list = $list:path, pairs_in = $pairs_in:literal, bind_pairs = $bind_pairs:path, owners_json = $owners_json:literal, insert = $insert:path, migrator = $migrator:expr) => {
        use std::collections::{BTreeSet, HashMap};

        use sqlx::{QueryBuilder, Row};

        use $crate::decode::EventKey;
        use $crate::domain::ledger::{EntryKind, Ledger};
        use $crate::domain::model::{Account, Allocation, Item, Learner, Lot, Owner, Price, Redemption, RedemptionStatus};
        use $crate::domain::{Credits, Id, Ts};
        use $crate::store::sql::{from_json, from_text, id, opt_id, to_json, to_text, Rows, ACCOUNTS, AUDIT, CODE_ATTEMPTS, JOURNAL, LOTS, OUTBOX, OWNERS, PROCESSED, REDEMPTIONS};
        use $crate::store::{Holder, HolderId, Loaded, OutboxKind, OutboxRow, SentMarks, Store, StoreError, Wanted, Writes, FIRING_LEASE};
        use $crate::domain::command::ReportKind;
        use $crate::report::{Cell, ReportQuery};
        use futures_util::stream::{BoxStream, StreamExt};

        fn report_row(kind: ReportKind, row: &DbRow, now: Ts) -> Result<Vec<Cell>, StoreError> {
            let text = |name: &str| -> Result<Cell, StoreError> { Ok(Cell::text(row.try_get::<Option<String>, _>(name)?)) };
            let amount = |name: &str| -> Result<Cell, StoreError> { Ok(Cell::Amount(credits(row.try_get(name)?))) };
            let instant = |name: &str| -> Result<Cell, StoreError> { Ok(Cell::instant(row.try_get::<Option<Ts>, _>(name)?)) };
            let json_text = |name: &str| -> Result<Cell, StoreError> {
                let value: serde_json::Value = from_json(&row.try_get::<String, _>(name)?)?;
                Ok(match value {
                    serde_json::Value::Null => Cell::Empty,
                    serde_json::Value::String(text) => Cell::Text(text),
                    other => Cell::Text(other.to_string()),
                })
            };
            Ok(match kind {
                ReportKind::Transactions => vec![
                    instant("at")?, text("account_id")?, text("entry")?, amount("amount")?, amount("balance_after")?,
                    text("purchase_id")?, text("request_id")?, text("learner_email")?, text("item_title")?, text("actor")?,
                ],
                ReportKind::Credits => {
                    let expires_at: Ts = row.try_get("expires_at")?;
                    let price = match (row.try_get::<Option<i64>, _>("price_amount")?, row.try_get::<Option<String>, _>("price_currency")?) {
                        (Some(amount), Some(currency)) => Cell::Text(format!("{} {currency}", credits(amount))),
                        _ => Cell::Empty,
                    };
                    vec![
                        text("account_id")?, text("account_name")?, text("owners")?, text("code")?, text("purchase_id")?,
                        amount("credits")?, price, amount("remaining")?, amount("held")?, Cell::Instant(expires_at),
                        Cell::Text(if expires_at <= now { "expired" } else { "active" }.to_owned()), text("notes")?,
                    ]
                }
                ReportKind::Redemptions => vec![
                    instant("requested_at")?, text("request_id")?, text("account_id")?, text("learner_email")?, text("item_id")?,
                    text("item_title")?, amount("cost")?, text("status")?, text("decided_by")?, instant("decided_at")?,
                    amount("refunded")?,
                ],
                ReportKind::Balances => {
                    let balance = credits(row.try_get("balance")?);
                    let held = credits(row.try_get("held")?);
                    vec![
                        text("account_id")?, text("account_name")?, text("status")?, Cell::Amount(balance), Cell::Amount(held),
                        Cell::Amount(balance - held), amount("expiring_30d")?, text("owners")?,
                    ]
                }
                ReportKind::Audit => vec![
                    instant("at")?, text("account_id")?, text("actor")?, text("field")?, json_text("old_value")?, json_text("new_value")?,
                ],
            })
        }

        type Conn = <$db as sqlx::Database>::Connection;
        type DbRow = <$db as sqlx::Database>::Row;

        /// Runs `head` + `$in_list` + `tail`, the items bound as one list
        /// (`$1`): the text is the same however many items there are, so the
        /// statement is prepared once per connection.
        async fn fetch_in(
            conn: &mut Conn,
            head: &str,
            items: &[String],
            tail: &str,
        ) -> Result<Vec<DbRow>, sqlx::Error> {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            // `head` and `tail` are this module's own text; values are bound.
            sqlx::query(sqlx::AssertSqlSafe(format!(concat!("{}", $in_list, "{}"), head, tail)))
                .bind($list(items))
                .fetch_all(&mut *conn)
                .await
        }

        fn strings<T: AsRef<str>>(items: impl IntoIterator<Item = T>) -> Vec<String> {
            let set: BTreeSet<String> = items.into_iter().map(|i| i.as_ref().to_owned()).collect();
            set.into_iter().collect()
        }

        fn credits(cents: i64) -> Credits {
            Credits::from_cents(cents)
        }

        fn account_from(row: &DbRow) -> Result<Account, StoreError> {
            Ok(Account {
                id: id(row.try_get("account_id")?)?,
                name: row.try_get("name")?,
                status: from_text(row.try_get("status")?)?,
                approval_mode: from_text(row.try_get("approval_mode")?)?,
                owners: from_json::<Vec<(String, String)>>(&row.try_get::<String, _>("owners")?)?
                    .into_iter()
                    .map(|(email, name)| Ok(Owner { email: email.parse().map_err(StoreError::corrupt)?, name }))
                    .collect::<Result<_, StoreError>>()?,
                code: row.try_get::<String, _>("code")?.parse().map_err(StoreError::corrupt)?,
                scope: from_json(&row.try_get::<String, _>("scope")?)?,
                low_balance_threshold: row.try_get::<Option<i64>, _>("low_balance_threshold")?.map(credits),
                notes: row.try_get("notes")?,
                created_at: row.try_get("created_at")?,
                lots: Vec::new(),
                owners_dirty: false,
                row_dirty: false,
            })
        }

        fn lot_from(row: &DbRow) -> Result<Lot, StoreError> {
            let price_paid = match (
                row.try_get::<Option<i64>, _>("price_amount")?,
                row.try_get::<Option<String>, _>("price_currency")?,
            ) {
                (Some(amount), Some(currency)) => Some(Price { amount: credits(amount), currency }),
                _ => None,
            };
            Ok(Lot {
                purchase_id: id(row.try_get("purchase_id")?)?,
                credits: credits(row.try_get("credits")?),
                remaining: credits(row.try_get("remaining")?),
                held: credits(row.try_get("held")?),
                expired: credits(row.try_get("expired")?),
                purchased_at: row.try_get("purchased_at")?,
                expires_at: row.try_get("expires_at")?,
                price_paid,
                channel: row.try_get("channel")?,
                reminded_stage: row
                    .try_get::<Option<i64>, _>("reminded_stage")?
                    .map(|s| u32::try_from(s).map_err(StoreError::corrupt))
                    .transpose()?,
                fingerprint: row.try_get("fingerprint")?,
                dirty: false,
            })
        }

        fn request_from(row: &DbRow) -> Result<Redemption, StoreError> {
            Ok(Redemption {
                request_id: id(row.try_get("request_id")?)?,
                account_id: opt_id(row.try_get("account_id")?)?,
                learner: Learner {
                    id: id(row.try_get("learner_id")?)?,
                    email: row.try_get::<String, _>("learner_email")?.parse().map_err(StoreError::corrupt)?,
                    name: row.try_get("learner_name")?,
                },
                item: Item {
                    id: id(row.try_get("item_id")?)?,
                    kind: from_text(row.try_get("item_kind")?)?,
                    title: row.try_get("item_title")?,
                    group_ids: from_json(&row.try_get::<String, _>("item_group_ids")?)?,
                },
                cost: credits(row.try_get("cost")?),
                status: from_text(row.try_get("status")?)?,
                reason: row.try_get("reason")?,
                requested_at: row.try_get("requested_at")?,
                created_at: row.try_get("created_at")?,
                decided_by: row.try_get("decided_by")?,
                decided_at: row.try_get("decided_at")?,
                allocations: from_json::<Vec<Allocation>>(&row.try_get::<String, _>("allocations")?)?,
                refunded: credits(row.try_get("refunded")?),
                fingerprint: row.try_get("fingerprint")?,
            })
        }

        /// An account's row with its owners, in order, as a JSON array of
        /// `[email, name]` (`owners_json`).
        const ACCOUNT_COLUMNS: &str = concat!("SELECT account_id, name, status, approval_mode, code, scope, \
            low_balance_threshold, notes, created_at, ", $owners_json, " AS owners FROM accounts WHERE account_id");
        const LOT_COLUMNS: &str = "SELECT account_id, purchase_id, credits, remaining, held, expired, \
            purchased_at, expires_at, price_amount, price_currency, channel, reminded_stage, fingerprint \
            FROM lots WHERE";
        const REQUEST_COLUMNS: &str = "SELECT request_id, account_id, learner_id, learner_email, learner_name, \
            item_id, item_kind, item_title, item_group_ids, cost, status, reason, requested_at, created_at, \
            decided_by, decided_at, allocations, refunded, fingerprint FROM redemptions WHERE";

        /// Loads what `wanted` names; with `lock`, the accounts are locked
        /// for the rest of the transaction (in a stable order, so that two
        /// workers never deadlock).
        async fn load(conn: &mut Conn, wanted: &Wanted, lock: bool) -> Result<Loaded, StoreError> {
            let mut loaded = Loaded::default();
            let mut account_ids: BTreeSet<String> = strings(&wanted.account_ids).into_iter().collect();
            let mut requests = Vec::new();
            for row in fetch_in(conn, &format!("{REQUEST_COLUMNS} request_id"), &strings(&wanted.request_ids), "").await? {
                let request = request_from(&row)?;
                account_ids.extend(request.account_id.as_ref().map(Id::to_string));
                requests.push(request);
            }
            for row in fetch_in(conn, "SELECT code_key, account_id FROM accounts WHERE code_key", &strings(wanted.code_keys.iter().map(|k| k.as_str())), "").await? {
                let account: String = row.try_get("account_id")?;
                loaded.ledger.codes.insert($crate::domain::CodeKey::of(&row.try_get::<String, _>("code_key")?), id(account.clone())?);
                account_ids.insert(account);
            }
            for row in fetch_in(conn, "SELECT email, account_id FROM owners WHERE email", &strings(&wanted.owner_emails), "").await? {
                loaded.ledger.owner_of.insert(
                    row.try_get::<String, _>("email")?.parse().map_err(StoreError::corrupt)?,
                    id(row.try_get("account_id")?)?,
                );
            }
            let account_ids: Vec<String> = account_ids.into_iter().collect();
            let tail = if lock { concat!(" ORDER BY account_id", $lock) } else { " ORDER BY account_id" };
            let mut accounts: HashMap<Id, Account> = HashMap::new();
            for row in fetch_in(conn, ACCOUNT_COLUMNS, &account_ids, tail).await? {
                let account = account_from(&row)?;
                accounts.insert(account.id.clone(), account);
            }
            for row in fetch_in(conn, &format!("{REQUEST_COLUMNS} status = 'pending' AND account_id"), &strings(&wanted.pending_of), "").await? {
                requests.push(request_from(&row)?);
            }
            let live = if wanted.live_lots { " AND (remaining <> 0 OR held <> 0)" } else { "" };
            let mut lots = fetch_in(conn, &format!("{LOT_COLUMNS} account_id"), &account_ids, live).await?;
            if wanted.live_lots {
                let named = strings(wanted.purchase_ids.iter()
                    .chain(requests.iter().flat_map(|r| r.allocations.iter().map(|a| &a.purchase_id))));
                lots.extend(fetch_in(conn, &format!("{LOT_COLUMNS} remaining = 0 AND held = 0 AND purchase_id"), &named, "").await?);
            }
            for row in lots {
                if let Some(account) = accounts.get_mut(&id(row.try_get("account_id")?)?) {
                    account.lots.push(lot_from(&row)?);
                }
            }
            for (_, mut account) in accounts {
                account.sort_lots();
                loaded.ledger.insert_account(account);
            }
            // Of a learner's requests only whether the items asked for are
            // taken matters (a learner's approved requests grow without end).
            let pairs: BTreeSet<[&str; 2]> = wanted.learner_items.iter().map(|(learner, item)| [learner.as_str(), item.as_str()]).collect();
            if !pairs.is_empty() {
                let rows = sqlx::query(concat!("SELECT learner_id, item_id, request_id FROM redemptions \
                    WHERE status IN ('pending', 'approved') AND (learner_id, item_id)", $pairs_in));
                let rows = $bind_pairs(rows, &pairs)
                    .fetch_all(&mut *conn)
                    .await?;
                for row in rows {
                    loaded.ledger.active.insert((id(row.try_get("learner_id")?)?, id(row.try_get("item_id")?)?), id(row.try_get("request_id")?)?);
                }
            }
            for request in requests {
                loaded.ledger.insert_request(request);
            }
            if let Some(since) = wanted.attempts_since {
                for row in fetch_in(conn, "SELECT learner_id, at FROM code_attempts WHERE learner_id", &strings(wanted.learner_items.iter().map(|(learner, _)| learner)), "").await? {
                    let at: Ts = row.try_get("at")?;
                    if at > since {
                        loaded.ledger.attempts.entry(id(row.try_get("learner_id")?)?).or_default().push(at);
                    }
                }
            }
            // Looked up by event id (indexed), the source compared here: a
            // row-value IN list would not use the key's index on SQLite.
            let wanted_keys: std::collections::HashSet<&EventKey> = wanted.keys.iter().collect();
            for row in fetch_in(conn, "SELECT source, event_id, digest FROM processed WHERE event_id", &strings(wanted.keys.iter().map(|k| k.id.as_str())), "").await? {
                let key = EventKey { source: row.try_get("source")?, id: row.try_get("event_id")? };
                if wanted_keys.contains(&key) {
                    loaded.seen.insert(key, row.try_get("digest")?);
                }
            }
            Ok(loaded)
        }

        /// Inserts the rows of `tables` (those that have any), in order, in
        /// one exchange with the database: a batch's writes are one
        /// statement, not one per table.
        async fn insert(conn: &mut Conn, tables: Vec<Rows>) -> Result<(), sqlx::Error> {
            let tables: Vec<Rows> = tables.into_iter().filter(|rows| !rows.is_empty()).collect();
            if tables.is_empty() {
                return Ok(());
            }
            $insert(conn, tables).await
        }

        async fn write(conn: &mut Conn, writes: &Writes) -> Result<(), StoreError> {
            let now = writes.now.unwrap_or_else(Ts::now);
            // Rows replaced are deleted first; everything else is inserted
            // or upserted in one exchange below.
            let reowned: Vec<String> = writes.accounts.iter().filter(|a| a.owners_dirty).map(|a| a.id.to_string()).collect();
            if !reowned.is_empty() {
                sqlx::query(concat!("DELETE FROM owners WHERE account_id", $in_list))
                    .bind($list(&reowned))
                    .execute(&mut *conn)
                    .await?;
            }
            if !writes.attempts.is_empty() {
                // Attempts older than the window never count again.
                let horizon = now.plus(-chrono::Duration::minutes($crate::domain::rules::INVALID_CODE_WINDOW_MINUTES));
                sqlx::query("DELETE FROM code_attempts WHERE at <= $1").bind(horizon).execute(&mut *conn).await?;
            }
            let mut tables = Vec::with_capacity(9);
            let dirty: Vec<&Account> = writes.accounts.iter().filter(|a| a.row_dirty).collect();
            let mut rows = Rows::new(&ACCOUNTS, dirty.len(), " ON CONFLICT (account_id) DO UPDATE SET name = excluded.name, \
                status = excluded.status, approval_mode = excluded.approval_mode, code = excluded.code, \
                code_key = excluded.code_key, scope = excluded.scope, \
                low_balance_threshold = excluded.low_balance_threshold, notes = excluded.notes");
            for a in dirty {
                rows.text(a.id.to_string())
                    .text(a.name.clone())
                    .text(to_text(&a.status))
                    .text(to_text(&a.approval_mode))
                    .text(a.code.to_string())
                    .text(a.code.key().as_str().to_owned())
                    .text(to_json(&a.scope))
                    .int(a.low_balance_threshold.map(Credits::cents))
                    .text(a.notes.clone())
                    .time(a.created_at);
            }
            tables.push(rows);
            let mut rows = Rows::new(&OWNERS, reowned.len(), "");
            for a in writes.accounts.iter().filter(|a| a.owners_dirty) {
                for (position, o) in a.owners.iter().enumerate() {
                    rows.text(o.email.to_string())
                        .text(a.id.to_string())
                        .text(o.name.clone())
                        .int(i64::try_from(position).expect("an account has few owners"));
                }
            }
            tables.push(rows);
            let stages = &writes.reminder_stages;
            let mut rows = Rows::new(&LOTS, writes.accounts.len(), " ON CONFLICT (account_id, purchase_id) DO UPDATE SET \
                remaining = excluded.remaining, held = excluded.held, expired = excluded.expired, \
                expires_at = excluded.expires_at, reminded_stage = excluded.reminded_stage, remind_at = excluded.remind_at");
            for a in &writes.accounts {
                for l in a.lots.iter().filter(|l| l.dirty) {
                    rows.text(a.id.to_string())
                        .text(l.purchase_id.to_string())
                        .int(l.credits.cents())
                        .int(l.remaining.cents())
                        .int(l.held.cents())
                        .int(l.expired.cents())
                        .time(l.purchased_at)
                        .time(l.expires_at)
                        .int(l.price_paid.as_ref().map(|p| p.amount.cents()))
                        .text(l.price_paid.as_ref().map(|p| p.currency.clone()))
                        .text(l.channel.clone())
                        .int(l.reminded_stage.map(i64::from))
                        .time(l.next_reminder_at(stages))
                        .text(l.fingerprint.clone());
                }
            }
            tables.push(rows);
            let mut rows = Rows::new(&REDEMPTIONS, writes.requests.len(), " ON CONFLICT (request_id) DO UPDATE SET \
                status = excluded.status, reason = excluded.reason, decided_by = excluded.decided_by, \
                decided_at = excluded.decided_at, refunded = excluded.refunded");
            for r in &writes.requests {
                rows.text(r.request_id.to_string())
                    .text(r.account_id.as_ref().map(Id::to_string))
                    .text(r.learner.id.to_string())
                    .text(r.learner.email.to_string())
                    .text(r.learner.name.clone())
                    .text(r.item.id.to_string())
                    .text(to_text(&r.item.kind))
                    .text(r.item.title.clone())
                    .text(to_json(&r.item.group_ids))
                    .int(r.cost.cents())
                    .text(r.status.as_str().to_owned())
                    .text(r.reason.clone())
                    .time(r.requested_at)
                    .time(r.created_at)
                    .text(r.decided_by.clone())
                    .time(r.decided_at)
                    .text(to_json(&r.allocations))
                    .int(r.refunded.cents())
                    .text(r.fingerprint.clone());
            }
            tables.push(rows);
            let mut rows = Rows::new(&JOURNAL, writes.journal.len(), "");
            for (e, cause) in &writes.journal {
                rows.time(e.at)
                    .text(e.account_id.to_string())
                    .text(e.kind.as_str().to_owned())
                    .text(e.purchase_id.to_string())
                    .text(e.request_id.as_ref().map(Id::to_string))
                    .int(e.amount.cents())
                    .int(e.held_delta.cents())
                    .int(e.balance_after.cents())
                    .text(e.actor.clone())
                    .text(cause.clone());
            }
            tables.push(rows);
            let mut rows = Rows::new(&AUDIT, writes.audit.len(), "");
            for (e, cause) in &writes.audit {
                rows.time(e.at)
                    .text(e.account_id.to_string())
                    .text(e.actor.clone())
                    .text(e.field.clone())
                    .text(e.old.to_string())
                    .text(e.new.to_string())
                    .text(cause.clone());
            }
            tables.push(rows);
            let mut rows = Rows::new(&PROCESSED, writes.processed.len(), "");
            for (key, digest, outcome) in &writes.processed {
                rows.text(key.source.clone())
                    .text(key.id.clone())
                    .text(digest.clone())
                    .text((*outcome).to_owned())
                    .time(now);
            }
            tables.push(rows);
            let mut rows = Rows::new(&CODE_ATTEMPTS, writes.attempts.len(), "");
            for (learner, at) in &writes.attempts {
                rows.text(learner.to_string()).time(*at);
            }
            tables.push(rows);
            tables.push(outbox_rows(&writes.outbox, ""));
            insert(conn, tables).await?;
            Ok(())
        }

        fn outbox_rows(outbox: &[OutboxRow], tail: &'static str) -> Rows {
            let mut rows = Rows::new(&OUTBOX, outbox.len(), tail);
            for o in outbox {
                rows.text(o.id.clone())
                    .text(o.kind.as_str().to_owned())
                    .text(o.payload.clone())
                    .time(o.created_at)
                    .time(o.next_attempt_at)
                    .int(o.leased_by.map(HolderId::get));
            }
            rows
        }

        /// Marks the outbox rows `ids` sent, now.
        async fn mark_sent(conn: &mut Conn, ids: &[String]) -> Result<(), StoreError> {
            if !ids.is_empty() {
                sqlx::query(concat!("UPDATE outbox SET dispatched_at = $2 WHERE dispatched_at IS NULL AND id", $in_list))
                    .bind($list(ids))
                    .bind(Ts::now())
                    .execute(conn)
                    .await?;
            }
            Ok(())
        }

        impl Store for $store {
            async fn migrate(&self) -> Result<(), StoreError> {
                $migrator.run(&self.pool).await?;
                Ok(())
            }

            async fn transact<T, F>(&self, wanted: &Wanted, work: F) -> Result<T, StoreError>
            where
                T: Send,
                F: FnOnce(Loaded) -> (T, Writes) + Send,
            {
                let _gate = self.write_gate().await;
                let mut tx = self.writer().begin_with($begin).await?;
                let loaded = load(&mut *tx, wanted, true).await?;
                let (result, writes) = work(loaded);
                write(&mut *tx, &writes).await?;
                let marks = self.marks.take();
                mark_sent(&mut *tx, &marks.ids).await?;
                tx.commit().await?;
                marks.marked();
                Ok(result)
            }

            async fn snapshot(&self, wanted: &Wanted) -> Result<Ledger, StoreError> {
                let mut conn = self.pool.acquire().await?;
                Ok(load(&mut *conn, wanted, false).await?.ledger)
            }

            async fn sweep_candidates(&self, at: Ts, pending_before: Ts) -> Result<Vec<Id>, StoreError> {
                let rows = sqlx::query(
                    "SELECT account_id FROM lots WHERE remaining > held AND expires_at <= $1 \
                     UNION SELECT account_id FROM lots WHERE remaining > held AND remind_at <= $1 \
                     UNION SELECT account_id FROM redemptions WHERE status = 'pending' AND created_at <= $2 \
                     ORDER BY account_id",
                )
                .bind(at)
                .bind(pending_before)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(|row| id(row.try_get("account_id")?)).collect()
            }

            async fn verify(&self) -> Result<Vec<String>, StoreError> {
                let mut problems = Vec::new();
                let mut conn = self.pool.acquire().await?;
                let sums = sqlx::query(
                    "SELECT l.account_id, l.purchase_id, l.credits, l.remaining, l.held, l.expired, \
                     CAST(COALESCE(SUM(j.amount), 0) AS BIGINT) AS journal_remaining, \
                     CAST(COALESCE(SUM(j.held_delta), 0) AS BIGINT) AS journal_held, \
                     CAST(COALESCE(SUM(CASE WHEN j.entry = 'purchase' THEN j.amount ELSE 0 END), 0) AS BIGINT) AS journal_credits, \
                     CAST(COALESCE(SUM(CASE WHEN j.entry IN ('expire', 'reinstate') THEN -j.amount ELSE 0 END), 0) AS BIGINT) AS journal_expired \
                     FROM lots l LEFT JOIN journal j ON j.account_id = l.account_id AND j.purchase_id = l.purchase_id \
                     GROUP BY l.account_id, l.purchase_id, l.credits, l.remaining, l.held, l.expired",
                )
                .fetch_all(&mut *conn)
                .await?;
                let mut held_by_pending: HashMap<(String, String), i64> = HashMap::new();
                for row in sums {
                    let account: String = row.try_get("account_id")?;
                    let purchase: String = row.try_get("purchase_id")?;
                    let [credits, remaining, held, expired]: [i64; 4] = [
                        row.try_get("credits")?, row.try_get("remaining")?, row.try_get("held")?, row.try_get("expired")?,
                    ];
                    let journal: [i64; 4] = [
                        row.try_get("journal_credits")?, row.try_get("journal_remaining")?,
                        row.try_get("journal_held")?, row.try_get("journal_expired")?,
                    ];
                    for (name, kept, from_journal) in [
                        ("credits", credits, journal[0]),
                        ("remaining", remaining, journal[1]),
                        ("held", held, journal[2]),
                        ("expired", expired, journal[3]),
                    ] {
                        if kept != from_journal {
                            problems.push(format!(
                                "lot {purchase} of {account}: {name} is {} but the journal gives {}",
                                credits_text(kept), credits_text(from_journal)
                            ));
                        }
                    }
                    if !(0 <= held && held <= remaining && remaining <= credits && expired >= 0) {
                        problems.push(format!(
                            "lot {purchase} of {account}: 0 ≤ held ({}) ≤ remaining ({}) ≤ credits ({}) does not hold",
                            credits_text(held), credits_text(remaining), credits_text(credits)
                        ));
                    }
                    held_by_pending.insert((account, purchase), 0);
                }
                let orphans: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM journal j WHERE NOT EXISTS \
                     (SELECT 1 FROM lots l WHERE l.account_id = j.account_id AND l.purchase_id = j.purchase_id)",
                )
                .fetch_one(&mut *conn)
                .await?;
                if orphans > 0 {
                    problems.push(format!("{orphans} journal entries name no lot"));
                }
                let requests = QueryBuilder::<$db>::new(format!("{REQUEST_COLUMNS} status IN ('pending', 'approved', 'refunded', 'unenrolled')"))
                    .build()
                    .fetch_all(&mut *conn)
                    .await?;
                for row in requests {
                    let request = request_from(&row)?;
                    let Some(account) = &request.account_id else {
                        problems.push(format!("request {} is {} without an account", request.request_id, request.status.as_str()));
                        continue;
                    };
                    if request.allocated() != request.cost {
                        problems.push(format!(
                            "request {}: allocations of {} do not make its cost {}",
                            request.request_id, request.allocated(), request.cost
                        ));
                    }
                    if request.status == RedemptionStatus::Refunded && request.refunded != request.cost {
                        problems.push(format!("request {}: refunded {} of {}", request.request_id, request.refunded, request.cost));
                    }
                    if request.status == RedemptionStatus::Pending {
                        for allocation in &request.allocations {
                            *held_by_pending
                                .entry((account.to_string(), allocation.purchase_id.to_string()))
                                .or_default() += allocation.amount.cents();
                        }
                    }
                }
                let lots = sqlx::query("SELECT account_id, purchase_id, held FROM lots").fetch_all(&mut *conn).await?;
                for row in lots {
                    let key: (String, String) = (row.try_get("account_id")?, row.try_get("purchase_id")?);
                    let held: i64 = row.try_get("held")?;
                    let pending = held_by_pending.get(&key).copied().unwrap_or_default();
                    if held != pending {
                        problems.push(format!(
                            "lot {} of {}: held {} but pending requests hold {}",
                            key.1, key.0, credits_text(held), credits_text(pending)
                        ));
                    }
                }
                let ownerless: Vec<String> = sqlx::query_scalar(
                    "SELECT account_id FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM owners o WHERE o.account_id = a.account_id)",
                )
                .fetch_all(&mut *conn)
                .await?;
                for account in ownerless {
                    problems.push(format!("account {account} has no owner"));
                }
                let unclosed: Vec<String> = sqlx::query_scalar(
                    "SELECT DISTINCT l.account_id FROM lots l JOIN accounts a ON a.account_id = l.account_id \
                     WHERE a.status = 'closed' AND l.remaining <> 0",
                )
                .fetch_all(&mut *conn)
                .await?;
                for account in unclosed {
                    problems.push(format!("closed account {account} still has credits"));
                }
                let kinds: Vec<String> = sqlx::query_scalar("SELECT DISTINCT entry FROM journal").fetch_all(&mut *conn).await?;
                for kind in kinds {
                    if EntryKind::parse(&kind).is_none() {
                        problems.push(format!("journal entry kind `{kind}` is unknown"));
                    }
                }
                Ok(problems)
            }

            async fn pending_outbox(&self, limit: i64) -> Result<Vec<OutboxRow>, StoreError> {
                let rows = sqlx::query(
                    "SELECT id, kind, payload, created_at, next_attempt_at, attempts, leased_by FROM outbox WHERE dispatched_at IS NULL ORDER BY seq LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(outbox_from).collect()
            }

            async fn claim_outbox(
                &self,
                kinds: &[OutboxKind],
                now: Ts,
                lease_until: Ts,
                limit: i64,
                holder: HolderId,
            ) -> Result<Vec<OutboxRow>, StoreError> {
                let _gate = self.write_gate().await;
                // One kind at a time, each walked in order by its own index.
                let mut rows: Vec<(i64, OutboxRow)> = Vec::new();
                for kind in kinds {
                    let wanted = limit - i64::try_from(rows.len()).unwrap_or(limit);
                    if wanted <= 0 {
                        break;
                    }
                    let claimed = sqlx::query(concat!(
                        "UPDATE outbox SET next_attempt_at = $1, leased_by = $5 WHERE seq IN (SELECT seq FROM outbox \
                         WHERE dispatched_at IS NULL AND kind = $2 AND next_attempt_at <= $3 ORDER BY seq LIMIT $4",
                        $skip,
                        ") RETURNING seq, id, kind, payload, created_at, next_attempt_at, attempts, leased_by",
                    ))
                    .bind(lease_until)
                    .bind(kind.as_str())
                    .bind(now)
                    .bind(wanted)
                    .bind(holder.get())
                    .fetch_all(self.writer())
                    .await?;
                    for row in &claimed {
                        rows.push((row.try_get("seq")?, outbox_from(row)?));
                    }
                }
                rows.sort_by_key(|(seq, _)| *seq);
                Ok(rows.into_iter().map(|(_, row)| row).collect())
            }

            async fn outbox_release(&self, lease_until: Ts, now: Ts) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                sqlx::query("UPDATE outbox SET next_attempt_at = $1, leased_by = NULL WHERE dispatched_at IS NULL AND next_attempt_at = $2")
                    .bind(now)
                    .bind(lease_until)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn register_holder(&self) -> Result<Holder, StoreError> {
                self.hold().await
            }

            async fn release_dead_holders(&self, me: HolderId, now: Ts) -> Result<u64, StoreError> {
                let _gate = self.write_gate().await;
                // The holders are looked at one by one (DISTINCT), each
                // found dead or alive once, in this statement's transaction.
                let released = sqlx::query(concat!(
                    "UPDATE outbox SET next_attempt_at = $1, leased_by = NULL WHERE dispatched_at IS NULL AND leased_by IN (\
                     SELECT holder FROM (SELECT DISTINCT leased_by AS holder FROM outbox \
                     WHERE dispatched_at IS NULL AND leased_by IS NOT NULL AND leased_by <> $2) AS holders WHERE ",
                    $holder_dead,
                    ")",
                ))
                .bind(now)
                .bind(me.get())
                .execute(self.writer())
                .await?;
                Ok(released.rows_affected())
            }

            fn sent_marks(&self) -> &SentMarks {
                &self.marks
            }

            async fn outbox_mark_sent(&self) -> Result<(), StoreError> {
                if self.marks.is_empty() {
                    return Ok(());
                }
                let _gate = self.write_gate().await;
                let marks = self.marks.take();
                let mut conn = self.writer().acquire().await?;
                mark_sent(&mut *conn, &marks.ids).await?;
                marks.marked();
                Ok(())
            }

            async fn outbox_complete(&self, id: &str, follow_up: &[OutboxRow], now: Ts) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                let mut tx = self.writer().begin_with($begin).await?;
                insert(&mut *tx, vec![outbox_rows(follow_up, "")]).await?;
                sqlx::query("UPDATE outbox SET dispatched_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id.to_owned())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn outbox_failed(&self, id: &str, next_attempt_at: Ts, error: &str) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                sqlx::query(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = $1, last_error = $2, leased_by = NULL WHERE id = $3",
                )
                .bind(next_attempt_at)
                .bind(error.to_owned())
                .bind(id.to_owned())
                .execute(self.writer())
                .await?;
                Ok(())
            }

            async fn outbox_backlog(&self) -> Result<Vec<(OutboxKind, i64)>, StoreError> {
                let rows = sqlx::query(
                    "SELECT kind, COUNT(*) AS backlog FROM outbox WHERE dispatched_at IS NULL GROUP BY kind",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let kind: String = row.try_get("kind")?;
                        let kind = OutboxKind::parse(&kind)
                            .ok_or_else(|| StoreError::corrupt(format!("outbox kind `{kind}`")))?;
                        Ok((kind, row.try_get("backlog")?))
                    })
                    .collect()
            }

            fn report_rows<'a>(&'a self, query: &'a ReportQuery) -> BoxStream<'a, Result<Vec<Cell>, StoreError>> {
                let account = query.account.as_ref().map(Id::to_string);
                let (kind, now) = (query.kind, query.now);
                let rows = match kind {
                    ReportKind::Transactions => sqlx::query(
                        "SELECT j.at, j.account_id, j.entry, j.amount, j.balance_after, j.purchase_id, j.request_id, \
                         r.learner_email, r.item_title, j.actor FROM journal j \
                         LEFT JOIN redemptions r ON r.request_id = j.request_id \
                         WHERE ($1 IS NULL OR j.account_id = $1) AND ($2 IS NULL OR j.at >= $2) AND ($3 IS NULL OR j.at < $3) \
                         ORDER BY j.seq",
                    )
                    .bind(account)
                    .bind(query.from)
                    .bind(query.to)
                    .fetch(&self.pool),
                    ReportKind::Credits => sqlx::query(concat!(
                        "SELECT l.account_id, a.name AS account_name, ", "(SELECT ", $agg, "(o.email, '; ') FROM \
                         (SELECT email FROM owners WHERE owners.account_id = a.account_id ORDER BY position) o)",
                        " AS owners, a.code, l.purchase_id, l.credits, l.price_amount, l.price_currency, l.remaining, l.held, \
                         l.expires_at, a.notes FROM lots l JOIN accounts a ON a.account_id = l.account_id \
                         WHERE ($1 IS NULL OR l.account_id = $1) AND ($2 IS NULL OR l.purchased_at >= $2) \
                         AND ($3 IS NULL OR l.purchased_at < $3) ORDER BY l.account_id, l.expires_at, l.purchase_id",
                    ))
                    .bind(account)
                    .bind(query.from)
                    .bind(query.to)
                    .fetch(&self.pool),
                    ReportKind::Redemptions => sqlx::query(
                        "SELECT requested_at, request_id, account_id, learner_email, item_id, item_title, cost, status, \
                         decided_by, decided_at, refunded FROM redemptions \
                         WHERE ($1 IS NULL OR account_id = $1) AND ($2 IS NULL OR requested_at >= $2) \
                         AND ($3 IS NULL OR requested_at < $3) ORDER BY requested_at, request_id",
                    )
                    .bind(account)
                    .bind(query.from)
                    .bind(query.to)
                    .fetch(&self.pool),
                    ReportKind::Balances => sqlx::query(concat!(
                        "SELECT a.account_id, a.name AS account_name, a.status, \
                         CAST(COALESCE(SUM(CASE WHEN l.expires_at > $2 THEN l.remaining ELSE l.held END), 0) AS BIGINT) AS balance, \
                         CAST(COALESCE(SUM(l.held), 0) AS BIGINT) AS held, \
                         CAST(COALESCE(SUM(CASE WHEN l.expires_at > $2 AND l.expires_at <= $3 THEN l.remaining - l.held ELSE 0 END), 0) AS BIGINT) AS expiring_30d, ",
                        "(SELECT ", $agg, "(o.email, '; ') FROM \
                         (SELECT email FROM owners WHERE owners.account_id = a.account_id ORDER BY position) o)",
                        " AS owners FROM accounts a LEFT JOIN lots l ON l.account_id = a.account_id \
                         WHERE ($1 IS NULL OR a.account_id = $1) \
                         GROUP BY a.account_id, a.name, a.status ORDER BY a.account_id",
                    ))
                    .bind(account)
                    .bind(now)
                    .bind(now.plus_days(30))
                    .fetch(&self.pool),
                    ReportKind::Audit => sqlx::query(
                        "SELECT at, account_id, actor, field, old_value, new_value FROM audit \
                         WHERE ($1 IS NULL OR account_id = $1) AND ($2 IS NULL OR at >= $2) AND ($3 IS NULL OR at < $3) \
                         ORDER BY seq",
                    )
                    .bind(account)
                    .bind(query.from)
                    .bind(query.to)
                    .fetch(&self.pool),
                };
                rows.map(move |row| report_row(kind, &row?, now)).boxed()
            }

            async fn claim_firing(&self, job: &str, fire_at: Ts, now: Ts, baseline: bool) -> Result<bool, StoreError> {
                let _gate = self.write_gate().await;
                let stale = now.plus(-chrono::Duration::from_std(FIRING_LEASE).expect("a short lease"));
                let claimed = sqlx::query(
                    "INSERT INTO job_firings (job, fire_at, claimed_at, baseline, done) VALUES ($1, $2, $3, $4, $4) \
                     ON CONFLICT (job, fire_at) DO UPDATE SET claimed_at = excluded.claimed_at \
                     WHERE NOT job_firings.done AND job_firings.claimed_at <= $5",
                )
                .bind(job.to_owned())
                .bind(fire_at)
                .bind(now)
                .bind(baseline)
                .bind(stale)
                .execute(self.writer())
                .await?;
                Ok(claimed.rows_affected() == 1)
            }

            async fn firing_done(&self, job: &str, fire_at: Ts) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                sqlx::query("UPDATE job_firings SET done = TRUE WHERE job = $1 AND fire_at = $2")
                    .bind(job.to_owned())
                    .bind(fire_at)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn release_firing(&self, job: &str, fire_at: Ts) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                sqlx::query("DELETE FROM job_firings WHERE job = $1 AND fire_at = $2")
                    .bind(job.to_owned())
                    .bind(fire_at)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn last_firing(&self, job: &str, now: Ts) -> Result<Option<Ts>, StoreError> {
                let stale = now.plus(-chrono::Duration::from_std(FIRING_LEASE).expect("a short lease"));
                let row = sqlx::query(
                    "SELECT MAX(fire_at) AS last FROM job_firings WHERE job = $1 AND (done OR claimed_at > $2)",
                )
                    .bind(job.to_owned())
                    .bind(stale)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(row.try_get::<Option<Ts>, _>("last")?)
            }

            async fn enqueue_outbox(&self, rows: &[OutboxRow]) -> Result<(), StoreError> {
                let _gate = self.write_gate().await;
                let mut conn = self.writer().acquire().await?;
                insert(&mut *conn, vec![outbox_rows(rows, " ON CONFLICT (id) DO NOTHING")]).await?;
                Ok(())
            }

            async fn account_ids(&self, after: Option<&Id>, limit: i64) -> Result<Vec<Id>, StoreError> {
                let rows = sqlx::query(
                    "SELECT account_id FROM accounts WHERE ($1 IS NULL OR account_id > $1) ORDER BY account_id LIMIT $2",
                )
                .bind(after.map(Id::to_string))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(|row| id(row.try_get("account_id")?)).collect()
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }

        fn outbox_from(row: &DbRow) -> Result<OutboxRow, StoreError> {
            let kind: String = row.try_get("kind")?;
            Ok(OutboxRow {
                id: row.try_get("id")?,
                kind: OutboxKind::parse(&kind).ok_or_else(|| StoreError::corrupt(format!("outbox kind `{kind}`")))?,
                payload: row.try_get("payload")?,
                created_at: row.try_get("created_at")?,
                next_attempt_at: row.try_get("next_attempt_at")?,
                attempts: row.try_get("attempts")?,
                leased_by: row.try_get::<Option<i64>, _>("leased_by")?.map(HolderId::from_stored),
            })
        }

        fn credits_text(cents: i64) -> String {
            Credits::from_cents(cents).to_string()
        }
    };
}

pub(super) use sql_store;
