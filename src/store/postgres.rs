//! The production backend. Several workers may share one database: a batch
//! locks the accounts it touches (`FOR UPDATE`, in account order), and a lost
//! race surfaces as a database error that is retried.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgHasArrayType, PgPool, PgQueryResult, PgTypeInfo,
    PgValueRef,
};
use sqlx::query::Query;
use sqlx::{Decode, Encode, Postgres, Type};
use tokio_util::task::AbortOnDropHandle;

use super::rows::{Column, Kind, Rows};
use super::sql::{self, Backend, SqlStore, Statements};
use super::{Holder, HolderId, StoreError};
use crate::domain::Ts;

/// Instants are `TIMESTAMPTZ`, microsecond precision like [`Ts`].
impl Type<Postgres> for Ts {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Ts {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as sqlx::Database>::ArgumentBuffer,
    ) -> Result<IsNull, BoxDynError> {
        <DateTime<Utc> as Encode<Postgres>>::encode(self.utc(), buf)
    }
}

impl<'r> Decode<'r, Postgres> for Ts {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Ts::from(<DateTime<Utc> as Decode<Postgres>>::decode(
            value,
        )?))
    }
}

/// The ledger in a PostgreSQL database, which reads and writes share one
/// pool of: PostgreSQL takes care of concurrent writers itself.
pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    pub async fn connect(url: &str) -> Result<PgStore, sqlx::Error> {
        let pool = sql::pool_options()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(sql::quiet(PgConnectOptions::from_str(url)?))
            .await?;
        Ok(SqlStore::new(pool.clone(), pool, None))
    }
}

/// How often the connection that holds a worker's advisory lock is checked
/// (and replaced once the database answers again, should it have broken).
const HOLDER_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Takes `id`'s session-level advisory lock on `connection`; `false` if
/// another session holds it.
async fn lock_holder(connection: &mut PgConnection, id: HolderId) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(id.get())
        .fetch_one(connection)
        .await
}

/// Keeps `id`'s lock held. A broken connection (the database restarted)
/// loses it; the lock is then taken again on a new connection as soon as
/// the database answers. Meanwhile a worker that starts may find the holder
/// dead and send its leased rows again: at least once, with the same ids.
async fn keep_holding(pool: PgPool, mut connection: PgConnection, id: HolderId) {
    loop {
        tokio::time::sleep(HOLDER_CHECK_INTERVAL).await;
        if sqlx::query("SELECT 1")
            .execute(&mut connection)
            .await
            .is_ok()
        {
            continue;
        }
        let relocked = match pool.acquire().await {
            Ok(fresh) => {
                let mut fresh = fresh.detach();
                match lock_holder(&mut fresh, id).await {
                    Ok(true) => Some(fresh),
                    _ => None,
                }
            }
            Err(_) => None,
        };
        match relocked {
            Some(fresh) => connection = fresh,
            None => tracing::warn!(
                holder = id.get(),
                "The connection holding this worker's lease lock is lost; trying again."
            ),
        }
    }
}

impl PgHasArrayType for Ts {
    fn array_type_info() -> PgTypeInfo {
        <DateTime<Utc> as PgHasArrayType>::array_type_info()
    }
}

/// The migrations of the PostgreSQL schema.
static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

impl Backend for Postgres {
    const BEGIN: &'static str = "BEGIN ISOLATION LEVEL READ COMMITTED";
    const LOCK: &'static str = " FOR UPDATE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    /// A holder is dead when its advisory lock is free: the session that
    /// held it ended with its worker. Taking it for this transaction keeps a
    /// holder from coming back under the same id meanwhile.
    const HOLDER_DEAD: &'static str = "pg_try_advisory_xact_lock(holder)";
    const REQUEST_SEQ: &'static str = "seq";
    const AGG: &'static str = "string_agg";
    const IN_LIST: &'static str = " = ANY($1)";
    const PAIRS_IN: &'static str = " IN (SELECT * FROM UNNEST($1::text[], $2::text[]))";
    const OWNERS_JSON: &'static str = "coalesce((SELECT json_agg(json_build_array(email, name) \
        ORDER BY position) FROM owners WHERE owners.account_id = accounts.account_id)::text, '[]')";

    /// A `text[]`.
    fn bind_list<'q>(
        query: Query<'q, Postgres, PgArguments>,
        items: &[String],
    ) -> Query<'q, Postgres, PgArguments> {
        query.bind(items)
    }

    /// Two `text[]`, zipped by `UNNEST`.
    fn bind_pairs<'q>(
        query: Query<'q, Postgres, PgArguments>,
        pairs: &BTreeSet<[&str; 2]>,
    ) -> Query<'q, Postgres, PgArguments> {
        let (learners, items): (Vec<String>, Vec<String>) = pairs
            .iter()
            .map(|[learner, item]| ((*learner).to_owned(), (*item).to_owned()))
            .unzip();
        query.bind(learners).bind(items)
    }

    /// Inserts the rows of `tables` in one statement, each table's insert a
    /// data-modifying `WITH` item but the last, each column bound as one array:
    /// the text depends only on which tables have rows, not on how many, so
    /// PostgreSQL parses and plans each such set once per connection. Foreign
    /// keys are checked at the end of the statement, once every table has its
    /// rows.
    async fn insert(conn: &mut PgConnection, tables: Vec<Rows>) -> Result<(), sqlx::Error> {
        let mut bound = 0;
        let inserts: Vec<String> = tables
            .iter()
            .map(|rows| {
                let arrays: Vec<String> = rows
                    .table
                    .columns
                    .iter()
                    .map(|(_, kind)| {
                        bound += 1;
                        let array = match kind {
                            Kind::Text => "text[]",
                            Kind::Int => "int8[]",
                            Kind::Time => "timestamptz[]",
                        };
                        format!("${bound}::{array}")
                    })
                    .collect();
                format!(
                    "{}SELECT * FROM UNNEST({}){}",
                    rows.table.head(),
                    arrays.join(", "),
                    rows.tail
                )
            })
            .collect();
        let Some((last, earlier)) = inserts.split_last() else {
            return Ok(());
        };
        let with: Vec<String> = earlier
            .iter()
            .enumerate()
            .map(|(at, insert)| format!("t{at} AS ({insert})"))
            .collect();
        let text = if with.is_empty() {
            last.clone()
        } else {
            format!("WITH {} {last}", with.join(", "))
        };
        // The text is this module's own; the values are bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(text));
        for column in tables.into_iter().flat_map(|rows| rows.columns) {
            query = match column {
                Column::Text(values) => query.bind(values),
                Column::Int(values) => query.bind(values),
                Column::Time(values) => query.bind(values),
            };
        }
        query.execute(conn).await?;
        Ok(())
    }

    fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    fn statements() -> &'static Statements {
        static STATEMENTS: OnceLock<Statements> = OnceLock::new();
        STATEMENTS.get_or_init(Statements::new::<Postgres>)
    }

    /// A holder whose advisory lock is held by a connection of its own,
    /// outside the pool, for as long as the holder lives.
    async fn hold(pool: &PgPool) -> Result<Holder, StoreError> {
        let (id, connection) = loop {
            let id = HolderId::random();
            let mut connection = pool.acquire().await?.detach();
            if lock_holder(&mut connection, id).await? {
                break (id, connection);
            }
        };
        let alive = tokio::spawn(keep_holding(pool.clone(), connection, id));
        Ok(Holder::new(id, Some(AbortOnDropHandle::new(alive))))
    }
}
