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

/// How often the WAL is checkpointed in the background.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

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

    /// Inserts the rows of `tables` in multi-row `VALUES` statements, as many
    /// rows each as the bind limit allows, all sent to SQLite's thread as one
    /// query (its statements take their binds in turn). Their text depends on
    /// how many rows they carry, so they are not kept prepared
    /// (`persistent(false)`): hardly any text comes twice, and a connection's
    /// cache of such statements, each a program of thousands of steps, held a
    /// hundred megabytes.
    async fn insert(conn: &mut SqliteConnection, tables: Vec<Rows>) -> Result<(), sqlx::Error> {
        let mut query = sqlx::QueryBuilder::<Sqlite>::new("");
        for rows in tables {
            let len = rows.len();
            let Rows {
                table,
                mut columns,
                tail,
                ..
            } = rows;
            let head = table.head();
            let per_statement = (BINDS_PER_STATEMENT_MAX / columns.len()).max(1);
            for start in (0..len).step_by(per_statement) {
                query.push(&head);
                query.push_values(start..len.min(start + per_statement), |mut row, at| {
                    for column in &mut columns {
                        match column {
                            Column::Text(values) => row.push_bind(values[at].take()),
                            Column::Int(values) => row.push_bind(values[at]),
                            Column::Time(values) => row.push_bind(values[at]),
                        };
                    }
                });
                query.push(tail);
                query.push(";\n");
            }
        }
        query.build().persistent(false).execute(&mut *conn).await?;
        Ok(())
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
