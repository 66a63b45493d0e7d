//! The production backend. Several workers may share one database: a batch
//! locks the accounts it touches (`FOR UPDATE`, in account order), and a lost
//! race surfaces as a database error that is retried.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgPool, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};
use tokio::sync::MutexGuard;

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

#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<PgStore, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(PgStore { pool })
    }

    /// Reads and writes share one pool.
    fn writer(&self) -> &PgPool {
        &self.pool
    }

    /// PostgreSQL takes care of concurrent writers itself.
    async fn write_gate(&self) -> Option<MutexGuard<'_, ()>> {
        None
    }
}

/// A list of values as one bind: a `text[]`.
fn list(items: &[String]) -> &[String] {
    items
}

super::sql::sql_store!(
    PgStore,
    Postgres,
    begin = "BEGIN ISOLATION LEVEL READ COMMITTED",
    lock = " FOR UPDATE",
    skip_locked = " FOR UPDATE SKIP LOCKED",
    agg = "string_agg",
    in_list = " = ANY($1)",
    list = list,
    pairs_in = " IN (SELECT value ->> 0, value ->> 1 FROM jsonb_array_elements($1::jsonb))",
    migrator = sqlx::migrate!("./migrations/postgres")
);
