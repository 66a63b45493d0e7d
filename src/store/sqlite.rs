//! The embedded default: one SQLite file in WAL mode. Writers take the lock
//! up front (`BEGIN IMMEDIATE`), so a batch never fails halfway for want of it.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::pool::Pool;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqliteQueryResult, SqliteSynchronous, SqliteTypeInfo, SqliteValueRef,
};
use sqlx::{Decode, Encode, Sqlite, Type};
use tokio::sync::Mutex;

use super::rows::{self, BINDS_PER_STATEMENT_MAX, Column, Rows};
use super::sql::{self, Backend, SqlStore, Statements};
use super::{Holder, HolderId, StoreError};
use crate::domain::Ts;

/// Instants are stored as microseconds since the epoch, which sort and
/// compare exactly.
impl Type<Sqlite> for Ts {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <i64 as Type<Sqlite>>::compatible(ty)
    }
}

impl Encode<'_, Sqlite> for Ts {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<Sqlite>>::encode(self.micros(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for Ts {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let micros = <i64 as Decode<Sqlite>>::decode(value)?;
        Ts::from_micros(micros).ok_or_else(|| format!("{micros} µs is out of range").into())
    }
}

/// How often the WAL is checkpointed in the background. A page that many
/// commits write (the last page of a table or of an index by time, an
/// account's last entries) is copied into the file once per checkpoint:
/// once a second cost the worker 13 % less CPU per event than every 200 ms
/// on a ledger with history, and no worse latency (BENCHMARKS.md).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The ledger in one SQLite file. Reads (snapshots, reports, backlog) go
/// through a pool of four connections; every write goes through one
/// connection of its own, whose page cache then stays valid from one
/// transaction to the next (SQLite drops a connection's whole cache when
/// another connection has written). SQLite has one writer at a time and its
/// busy handler lets a waiting writer lose to a busy one again and again; a
/// first-come, first-served lock makes the writers of this process take
/// turns, so the dispatcher is never starved by a busy consumer.
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH`).
    pub async fn connect(url: &str) -> Result<SqliteStore, sqlx::Error> {
        let options = sql::quiet(SqliteConnectOptions::from_str(url)?)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A batch is acknowledged only once it is on disk.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .pragma("temp_store", "memory");
        let writer = sql::pool_options()
            .max_connections(1)
            // 16 MiB of page cache for the writer instead of SQLite's 2 MiB:
            // the batch's lookups into the idempotency, outbox and lot
            // indexes stay in memory instead of a read(2) per page. Readers
            // (snapshots, reports, the backlog gauge) keep the default.
            .connect_with(
                options
                    .clone()
                    .pragma("cache_size", "-16384")
                    // The writer checkpoints only if the background
                    // checkpoints fall far behind (40 MiB of WAL).
                    .pragma("wal_autocheckpoint", "10000"),
            )
            .await?;
        let pool = sql::pool_options()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let gate = Arc::new(Mutex::new(()));
        checkpoint_in_background(pool.clone(), Arc::downgrade(&gate));
        Ok(SqlStore::new(pool, writer, Some(gate)))
    }
}

/// Copies the WAL into the database file every [`CHECKPOINT_INTERVAL`] from
/// a reader connection, beside the writer, for as long as the store lives: no
/// commit pays for the checkpoint that SQLite would otherwise run inside it
/// every 1,000 pages (tens of milliseconds, the tail of the
/// latency). A passive checkpoint never blocks the writer.
fn checkpoint_in_background(pool: SqlitePool, store: Weak<Mutex<()>>) {
    tokio::spawn(async move {
        while store.strong_count() > 0 {
            tokio::time::sleep(CHECKPOINT_INTERVAL).await;
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::debug!(%error, "A background checkpoint failed; the next one catches up.");
            }
        }
    });
}

/// The fewest rows of a table inserted by a statement kept prepared
/// ([`Backend::insert`] on SQLite).
const PREPARED_ROWS_MIN: usize = 64;

/// The most rows a prepared chunk of a table with `columns` columns holds:
/// the largest power of two within the bind limit.
fn prepared_rows_max(columns: usize) -> usize {
    let fit = (BINDS_PER_STATEMENT_MAX / columns).max(1);
    1 << fit.ilog2()
}

/// The size of the next prepared chunk of `left` rows (at least
/// [`PREPARED_ROWS_MIN`]): the largest power of two that fits, at most `most`.
fn prepared_rows(left: usize, most: usize) -> usize {
    (1 << left.ilog2()).min(most)
}

/// The `VALUES` of rows `range` of `columns`, their values bound (and taken).
fn push_rows(
    query: &mut sqlx::QueryBuilder<Sqlite>,
    columns: &mut [Column],
    range: std::ops::Range<usize>,
) {
    query.push_values(range, |mut row, at| {
        for column in columns.iter_mut() {
            match column {
                Column::Text(values) => row.push_bind(values[at].take()),
                Column::Int(values) => row.push_bind(values[at]),
                Column::Time(values) => row.push_bind(values[at]),
            };
        }
    });
}

/// Sends the statements `rest` holds, if any, in one query not kept
/// prepared ([`Backend::insert`] on SQLite), and empties it.
async fn send_rest(
    rest: &mut sqlx::QueryBuilder<Sqlite>,
    conn: &mut SqliteConnection,
) -> Result<(), sqlx::Error> {
    if rest.sql().as_str().is_empty() {
        return Ok(());
    }
    rest.build().persistent(false).execute(&mut *conn).await?;
    rest.reset();
    Ok(())
}

/// The migrations of the SQLite schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

impl Backend for Sqlite {
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    /// The write lock taken up front (`BEGIN IMMEDIATE`) already keeps
    /// every other writer out.
    const LOCK: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    /// One worker owns the file: every holder but the caller is gone.
    const HOLDER_DEAD: &'static str = "TRUE";
    const REQUEST_SEQ: &'static str = "rowid";
    const AGG: &'static str = "group_concat";
    const IN_LIST: &'static str = " IN (SELECT value FROM json_each($1))";
    const PAIRS_IN: &'static str = " IN (SELECT value ->> 0, value ->> 1 FROM json_each($1))";
    const OWNERS_JSON: &'static str = "(SELECT json_group_array(json_array(email, name) \
        ORDER BY position) FROM owners WHERE owners.account_id = accounts.account_id)";

    /// A JSON array, read by `json_each`.
    fn bind_list<'q>(
        query: Query<'q, Sqlite, SqliteArguments>,
        items: &[String],
    ) -> Query<'q, Sqlite, SqliteArguments> {
        query.bind(serde_json::to_string(items).expect("strings serialise"))
    }

    /// A JSON array of pairs.
    fn bind_pairs<'q>(
        query: Query<'q, Sqlite, SqliteArguments>,
        pairs: &BTreeSet<[&str; 2]>,
    ) -> Query<'q, Sqlite, SqliteArguments> {
        query.bind(rows::to_json(pairs))
    }

    /// Inserts the rows of `tables`, in order, in multi-row `VALUES`
    /// statements. A table's rows go in chunks of a power of two, from
    /// [`PREPARED_ROWS_MIN`] up to what the bind limit allows, each chunk a
    /// statement of its own kept prepared: its text comes again whenever a
    /// chunk of that size does, and SQLite had spent 7 % of the worker's CPU
    /// preparing and finalising a batch's insert anew. What is left of each
    /// table, fewer rows than that, goes to SQLite's thread in one query
    /// (its statements take their binds in turn), not kept prepared: such
    /// texts hardly come twice. A small batch is thus still one exchange.
    async fn insert(conn: &mut SqliteConnection, tables: Vec<Rows>) -> Result<(), sqlx::Error> {
        let mut rest = sqlx::QueryBuilder::<Sqlite>::new("");
        for rows in tables {
            let len = rows.len();
            let Rows {
                table,
                mut columns,
                tail,
                ..
            } = rows;
            let head = table.head();
            let most = prepared_rows_max(columns.len());
            let mut start = 0;
            while len - start >= PREPARED_ROWS_MIN {
                let size = prepared_rows(len - start, most);
                // The rows before these, of this table or an earlier one,
                // go first: a later row may refer to them.
                send_rest(&mut rest, conn).await?;
                let mut chunk = sqlx::QueryBuilder::<Sqlite>::new(&head);
                push_rows(&mut chunk, &mut columns, start..start + size);
                chunk.push(tail);
                chunk.build().execute(&mut *conn).await?;
                start += size;
            }
            if start < len {
                rest.push(&head);
                push_rows(&mut rest, &mut columns, start..len);
                rest.push(tail);
                rest.push(";\n");
            }
        }
        send_rest(&mut rest, conn).await
    }

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn statements() -> &'static Statements {
        static STATEMENTS: OnceLock<Statements> = OnceLock::new();
        STATEMENTS.get_or_init(Statements::new::<Sqlite>)
    }

    /// One worker owns the file, so its holder needs nothing to stay alive.
    async fn hold(_pool: &Pool<Sqlite>) -> Result<Holder, StoreError> {
        Ok(Holder::new(HolderId::random(), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_chunks_are_powers_of_two_within_the_bind_limit_and_leave_a_short_rest() {
        for columns in [1, 7, 13, 30] {
            let most = prepared_rows_max(columns);
            assert!(most.is_power_of_two() && most * columns <= BINDS_PER_STATEMENT_MAX);
            assert!(
                2 * most * columns > BINDS_PER_STATEMENT_MAX,
                "{columns}: {most}"
            );
            for len in 0..3_000 {
                let mut left = len;
                while left >= PREPARED_ROWS_MIN {
                    let size = prepared_rows(left, most);
                    assert!(size.is_power_of_two() && size <= left.min(most));
                    left -= size;
                }
                assert!(left < PREPARED_ROWS_MIN, "{columns} columns, {len} rows");
            }
        }
    }

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_waiting_for_the_writer() {
        let dir = tempfile::tempdir().expect("a folder");
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("a store");
        store.migrate().await.expect("migrated");
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.pool)
            .await
            .expect("a page count");
        let whole = u64::try_from(pages).expect("a count") * 4096;
        assert!(whole > 8 * 4096, "the schema takes a few pages");
        // The writer alone would leave them in the WAL up to 10,000 pages.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&path).expect("the file").len() < whole {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no checkpoint copied the WAL into the file"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
