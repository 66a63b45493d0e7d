//! The read API of SPEC §9 under `/v1`, beside the operations endpoints:
//! JSON answers for portals and checkouts, a bearer token of `API_TOKENS`
//! on every request, and every error an RFC 9457 problem. It reads the
//! ledger through [`Books`] and [`Reports`]; a quote runs the rules of a
//! redemption request through [`Applier::quote`], and keeps only what a
//! request would keep of an invalid code.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::apply::Applier;
use crate::config::ApiTokens;
use crate::domain::command::{RedemptionRequested, ReportKind};
use crate::domain::model::{Account, Item, Learner, Redemption, RedemptionStatus};
use crate::domain::report::Cell;
use crate::domain::rules::{REDEMPTION_COST_MAX, REDEMPTION_COST_MIN};
use crate::domain::{Credits, Id, Ts};
use crate::store::{Books, Reports, Store, ToLoad};

/// Items per page: SPEC §9's default and most.
const LIMIT_DEFAULT: u32 = 100;
const LIMIT_MAX: u32 = 1000;

/// An RFC 9457 problem: what went wrong, as `application/problem+json`.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
}

impl Problem {
    fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let body = json!({
            "type": "about:blank",
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

#[derive(Clone)]
struct Api<S> {
    store: S,
    applier: Arc<Applier<S>>,
}

/// The `/v1` routes, each behind a token of `tokens`; none at all when no
/// token is configured (every `/v1` path is then unknown).
pub fn router<S: Store + 'static>(applier: Arc<Applier<S>>, tokens: Option<ApiTokens>) -> Router {
    let Some(tokens) = tokens else {
        return Router::new();
    };
    Router::new()
        .route("/v1/accounts/{account_id}", get(account::<S>))
        .route(
            "/v1/accounts/{account_id}/redemptions",
            get(account_requests::<S>),
        )
        .route("/v1/accounts/{account_id}/journal", get(journal::<S>))
        .route("/v1/redemptions/{request_id}", get(redemption::<S>))
        .route("/v1/quotes", post(quote::<S>))
        .route_layer(middleware::from_fn_with_state(tokens, authorized))
        .route("/v1/openapi.json", get(openapi))
        .with_state(Api {
            store: applier.store().clone(),
            applier,
        })
}

/// The OpenAPI 3.1 document of this API, the repository's `openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Lets a request through only with `Authorization: Bearer TOKEN` of a
/// configured token.
async fn authorized(State(tokens): State<ApiTokens>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match token {
        Some(token) if tokens.accepts(token) => next.run(request).await,
        Some(_) => {
            Problem::new(StatusCode::UNAUTHORIZED, "the bearer token is not valid").into_response()
        }
        None => Problem::new(
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer TOKEN` with a token of API_TOKENS",
        )
        .into_response(),
    }
}

fn parse_id(text: &str, what: &str) -> Result<Id, Problem> {
    text.parse().map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("`{text}` is not a valid {what}: {e}"),
        )
    })
}

fn unavailable(error: impl std::fmt::Display) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the ledger cannot be read now: {error}"),
    )
}

fn bad_request(detail: String) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, detail)
}

/// Where a page starts and how long it is, from `limit` and `cursor`. A
/// cursor is the position of the last item of the page before: new items
/// come after every position given out, so pages neither repeat nor skip.
struct PageRequest {
    after: i64,
    limit: u32,
}

impl PageRequest {
    fn of(query: &HashMap<String, String>) -> Result<PageRequest, Problem> {
        let limit = match query.get("limit") {
            None => LIMIT_DEFAULT,
            Some(text) => text
                .parse()
                .ok()
                .filter(|n| (1..=LIMIT_MAX).contains(n))
                .ok_or_else(|| {
                    bad_request(format!(
                        "limit `{text}` is not a number from 1 to {LIMIT_MAX}"
                    ))
                })?,
        };
        let after =
            match query.get("cursor") {
                None => 0,
                Some(text) => text.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    bad_request(format!("cursor `{text}` is not one this API gave"))
                })?,
            };
        Ok(PageRequest { after, limit })
    }

    /// The page of the first `limit` of `rows` (one more was fetched to
    /// tell whether another page follows).
    fn page<T>(&self, mut rows: Vec<(i64, T)>, show: impl Fn(T) -> Value) -> Json<Value> {
        let more = rows.len() > self.limit as usize;
        rows.truncate(self.limit as usize);
        let next = more.then(|| rows.last().map(|(position, _)| position.to_string()));
        let items: Vec<Value> = rows.into_iter().map(|(_, item)| show(item)).collect();
        Json(json!({"items": items, "next_cursor": next.flatten()}))
    }
}

fn instant(query: &HashMap<String, String>, name: &str) -> Result<Option<Ts>, Problem> {
    query
        .get(name)
        .map(|text| {
            Ts::parse(text).map_err(|e| {
                bad_request(format!("{name} `{text}` is not an RFC 3339 instant: {e}"))
            })
        })
        .transpose()
}

/// 404 unless `id` is an account of the ledger.
async fn known_account<S: Books>(store: &S, id: &Id) -> Result<(), Problem> {
    let ledger = store
        .snapshot(&ToLoad {
            account_ids: vec![id.clone()],
            live_lots: true,
            ..ToLoad::default()
        })
        .await
        .map_err(unavailable)?;
    if ledger.accounts.contains_key(id) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("account `{id}` is not known"),
        ))
    }
}

async fn account_requests<S: Books + Reports>(
    State(api): State<Api<S>>,
    Path(account_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let id = parse_id(&account_id, "account id")?;
    let page = PageRequest::of(&query)?;
    let status = query
        .get("status")
        .map(|text| {
            RedemptionStatus::parse(text)
                .ok_or_else(|| bad_request(format!("status `{text}` is not a request status")))
        })
        .transpose()?;
    known_account(&api.store, &id).await?;
    let rows = api
        .store
        .requests_page(&id, status, page.after, page.limit + 1)
        .await
        .map_err(unavailable)?;
    Ok(page.page(rows, |request| describe_request(&request)))
}

async fn journal<S: Books + Reports>(
    State(api): State<Api<S>>,
    Path(account_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let id = parse_id(&account_id, "account id")?;
    let page = PageRequest::of(&query)?;
    let (from, to) = (instant(&query, "from")?, instant(&query, "to")?);
    known_account(&api.store, &id).await?;
    let rows = api
        .store
        .journal_page(&id, from, to, page.after, page.limit + 1)
        .await
        .map_err(unavailable)?;
    Ok(page.page(rows, |cells| {
        let columns = ReportKind::Transactions.columns();
        let entry: serde_json::Map<String, Value> = columns
            .iter()
            .zip(cells)
            .map(|(name, cell)| ((*name).to_owned(), cell_json(cell)))
            .collect();
        Value::Object(entry)
    }))
}

/// A quote's body: a redemption request without its id (SPEC §9).
#[derive(serde::Deserialize)]
struct QuoteRequest {
    code: String,
    learner: Learner,
    item: Item,
    cost: Credits,
}

async fn quote<S: Store>(State(api): State<Api<S>>, body: Bytes) -> Result<Json<Value>, Problem> {
    let asked: QuoteRequest = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the body is not a quote request: {e}")))?;
    if !(REDEMPTION_COST_MIN..=REDEMPTION_COST_MAX).contains(&asked.cost) {
        return Err(bad_request(format!(
            "cost {} outside {REDEMPTION_COST_MIN} … {REDEMPTION_COST_MAX}",
            asked.cost
        )));
    }
    let now = Ts::now();
    let request = RedemptionRequested {
        request_id: "quote".parse().expect("a valid id"),
        code: asked.code,
        learner: asked.learner,
        item: asked.item,
        cost: asked.cost,
        requested_at: now,
    };
    let quote = api.applier.quote(request, now).await.map_err(unavailable)?;
    Ok(Json(json!({
        "accepted": quote.rejection.is_none(),
        "reason": quote.rejection,
        "approval_mode": quote.approval_mode,
        "available": quote.available,
    })))
}

fn cell_json(cell: Cell) -> Value {
    match cell {
        Cell::Text(text) => json!(text),
        Cell::Amount(amount) => json!(amount),
        Cell::Instant(at) => json!(at),
        Cell::Empty => Value::Null,
    }
}

async fn account<S: Books>(
    State(api): State<Api<S>>,
    Path(account_id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let id = parse_id(&account_id, "account id")?;
    let ledger = api
        .store
        .snapshot(&ToLoad {
            account_ids: vec![id.clone()],
            ..ToLoad::default()
        })
        .await
        .map_err(unavailable)?;
    let account = ledger.accounts.get(&id).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("account `{id}` is not known"),
        )
    })?;
    let mut shown = describe_account(account, Ts::now());
    shown["learner_limit"] = json!(account.learner_limit);
    Ok(Json(shown))
}

async fn redemption<S: Books>(
    State(api): State<Api<S>>,
    Path(request_id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let id = parse_id(&request_id, "request id")?;
    let ledger = api
        .store
        .snapshot(&ToLoad {
            request_ids: vec![id.clone()],
            ..ToLoad::default()
        })
        .await
        .map_err(unavailable)?;
    let request = ledger.requests.get(&id).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("request `{id}` is not known"),
        )
    })?;
    let mut shown = describe_request(request);
    shown["account_id"] = json!(request.account_id);
    Ok(Json(shown))
}

/// The account as SPEC §3 `account show` prints it, as of `now`.
pub fn describe_account(account: &Account, now: Ts) -> Value {
    let balances = account.balances_at(now);
    json!({
        "account_id": account.id,
        "name": account.name,
        "status": account.status,
        "approval_mode": account.approval_mode,
        "owners": account.owners,
        "code": account.code,
        "scope": account.scope,
        "low_balance_threshold": account.low_balance_threshold,
        "notes": account.notes,
        "balance": balances.balance,
        "held": balances.held,
        "available": balances.available,
        "lots": account.lots.iter().map(|lot| json!({
            "purchase_id": lot.purchase_id,
            "credits": lot.credits,
            "remaining": lot.remaining,
            "held": lot.held,
            "expires_at": lot.expires_at,
            "status": if lot.is_expired_at(now) { "expired" } else { "active" },
        })).collect::<Vec<_>>(),
    })
}

/// A redemption request as the API lists it (SPEC §9).
pub fn describe_request(request: &Redemption) -> Value {
    json!({
        "request_id": request.request_id,
        "learner": {
            "id": request.learner.id,
            "email": request.learner.email,
            "name": request.learner.name,
        },
        "item": {
            "id": request.item.id,
            "kind": request.item.kind,
            "title": request.item.title,
        },
        "cost": request.cost,
        "status": request.status.as_str(),
        "reason": request.reason,
        "requested_at": request.requested_at,
        "decided_by": request.decided_by,
        "decided_at": request.decided_at,
        "refunded": request.refunded,
    })
}
