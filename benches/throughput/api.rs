//! Step 6: the read API (SPEC §9) on a ledger of `--history` journal entries
//! over only `--api-accounts` accounts, so that each account holds about a
//! hundred thousand entries and as many requests: the latency of each GET,
//! one request at a time over one kept-alive connection, from a worker that
//! consumes nothing meanwhile. A page that cost more than its length (a
//! scan of the account, a sort) shows here as milliseconds growing with the
//! account.

use std::time::Instant;

use serde_json::Value;

use crate::*;

const TOKEN: &str = "bench-token";
/// Rows a deep cursor lies behind, at most (walked in pages of 1,000).
const DEPTH_PAGES: u64 = 50;

/// The figures of one backend.
pub struct ApiRow {
    pub backend: Backend,
    pub fill_seconds: f64,
    /// Rows of its account before a deep page.
    pub depth: u64,
    pub gets: Vec<(&'static str, Times)>,
}

/// The worker's read API, over one connection.
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    /// GETs `path`, which must answer 200 with a JSON body; the body and the
    /// milliseconds until it had been read whole.
    async fn get(&self, path: &str) -> BenchResult<(Value, f64)> {
        let started = Instant::now();
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .map_err(fail(path))?;
        let status = response.status();
        let body = response.bytes().await.map_err(fail(path))?;
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        if status != 200 {
            return Err(format!(
                "GET {path}: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let body = serde_json::from_slice(&body).map_err(fail(path))?;
        Ok((body, millis))
    }

    /// The cursor after `pages` pages of 1,000 of `path` (fewer if it ends),
    /// and the times of those pages.
    async fn deep_cursor(&self, path: &str, pages: u64) -> BenchResult<(String, Vec<f64>)> {
        let mut cursor = String::new();
        let mut times = Vec::new();
        for _ in 0..pages {
            let (body, millis) = self.get(&format!("{path}?limit=1000{cursor}")).await?;
            times.push(millis);
            match body["next_cursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        Ok((cursor, times))
    }
}

/// The items of a page answer, which must hold `expected` of them.
fn items(body: &Value, path: &str, expected: impl Fn(usize) -> bool) -> BenchResult<()> {
    let count = body["items"].as_array().map_or(0, Vec::len);
    if expected(count) {
        Ok(())
    } else {
        Err(format!(
            "GET {path}: {count} items, not what its ledger holds"
        ))
    }
}

/// RFC 3339 of `micros` since the epoch, for a query string.
fn query_instant(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .expect("an instant of the history")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub async fn api_step(backend: Backend, options: &Options) -> BenchResult<ApiRow> {
    let tag = format!("{}_api", backend.tag());
    let accounts = options.api_accounts;
    eprintln!(
        "  read API: filling a ledger with {} journal entries over {accounts} accounts…",
        thousands(options.history as f64)
    );
    let started = chrono::Utc::now().timestamp_micros();
    let (database, fill_seconds) =
        prepare(backend, options, &tag, accounts, options.history).await?;
    let vhost = Vhost::create(
        format!("tc_bench_{}_{tag}", std::process::id()),
        &options.amqp,
    )?;
    let mut worker = Worker::start(&database.url, &vhost.url(), &[("API_TOKENS", TOKEN)])?;
    worker.ready().await?;
    let api = Api {
        client: reqwest::Client::new(),
        base: format!("http://{}", worker.http),
    };
    let redeems = history_redeems(accounts, options.history);
    let depth = DEPTH_PAGES.min(redeems / accounts / 2_000).max(1);
    let mut requests_deep = Vec::new();
    let mut journal_deep = Vec::new();
    let mut pages_of_1000 = Vec::new();
    for k in 0..accounts {
        let (cursor, times) = api
            .deep_cursor(&format!("/v1/accounts/acct-{k}/redemptions"), depth)
            .await?;
        requests_deep.push(cursor);
        pages_of_1000.extend(times);
        let (cursor, times) = api
            .deep_cursor(&format!("/v1/accounts/acct-{k}/journal"), depth)
            .await?;
        journal_deep.push(cursor);
        pages_of_1000.extend(times);
    }
    let first = started - HISTORY_DAYS * 86_400_000_000;
    let mut rng = Rng(20_261_207);
    let names = [
        "account",
        "one request",
        "requests, first page",
        "requests, a deep page",
        "requests of a status none has",
        "journal, first page",
        "journal, a deep page",
        "journal, a one-day window",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..options.api_samples {
        let k = rng.below(accounts);
        let i = rng.below(redeems);
        let day = first + rng.below(redeems) as i64 * HISTORY_STEP_SECONDS * 1_000_000;
        let account = format!("/v1/accounts/acct-{k}");
        let paths = [
            account.clone(),
            format!("/v1/redemptions/hist-req-{i}"),
            format!("{account}/redemptions"),
            format!(
                "{account}/redemptions?limit=100{}",
                requests_deep[k as usize]
            ),
            format!("{account}/redemptions?status=rejected"),
            format!("{account}/journal"),
            format!("{account}/journal?limit=100{}", journal_deep[k as usize]),
            format!(
                "{account}/journal?from={}&to={}",
                query_instant(day),
                query_instant(day + 86_400_000_000)
            ),
        ];
        for (n, path) in paths.iter().enumerate() {
            let (body, millis) = api.get(path).await?;
            match n {
                0 => {
                    if body["account_id"] != format!("acct-{k}") {
                        return Err(format!("GET {path}: {body}"));
                    }
                }
                1 => {
                    if body["status"] != "approved" {
                        return Err(format!("GET {path}: {body}"));
                    }
                }
                4 => items(&body, path, |count| count == 0)?,
                // A window of a day holds 2,880 / accounts redemptions.
                _ => items(&body, path, |count| count > 0)?,
            }
            samples[n].push(millis);
        }
    }
    let (_, clean, _, log) = worker.stop().await;
    if !clean {
        return Err(format!("the worker did not stop cleanly: {log}"));
    }
    let mut gets: Vec<(&'static str, Times)> = names
        .into_iter()
        .zip(samples)
        .map(|(name, millis)| (name, Times::of(millis)))
        .collect();
    gets.push(("a page of 1,000 (the deep walks)", Times::of(pages_of_1000)));
    Ok(ApiRow {
        backend,
        fill_seconds,
        depth: depth * 1_000,
        gets,
    })
}
