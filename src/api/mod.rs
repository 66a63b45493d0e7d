//! The read API of SPEC §9 under `/v1`, beside the operations endpoints:
//! JSON answers for portals and checkouts, a bearer token of `API_TOKENS`
//! on every request, and every error an RFC 9457 problem. It reads the
//! ledger through [`Books`] and changes nothing.

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::config::ApiTokens;
use crate::domain::model::{Account, Redemption};
use crate::domain::{Id, Ts};
use crate::store::{Books, ToLoad};

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
}

/// The `/v1` routes, each behind a token of `tokens`; none at all when no
/// token is configured (every `/v1` path is then unknown).
pub fn router<S: Books + Clone + 'static>(store: S, tokens: Option<ApiTokens>) -> Router {
    let Some(tokens) = tokens else {
        return Router::new();
    };
    Router::new()
        .route("/v1/accounts/{account_id}", get(account::<S>))
        .route("/v1/redemptions/{request_id}", get(redemption::<S>))
        .route_layer(middleware::from_fn_with_state(tokens, authorized))
        .with_state(Api { store })
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
