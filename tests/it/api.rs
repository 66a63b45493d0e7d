//! SPEC §9, the read API: tokens, problems, one account, one request, on a
//! real store behind the real router, over HTTP.

use crate::support as common;

use common::World;
use serde_json::Value;
use training_credits::config::Config;
use training_credits::domain::{Outcome, Rejection};
use training_credits::store::Store;

const TOKEN: &str = "token-of-the-portal";

/// The read API of `w`'s ledger on a local port, with `API_TOKENS` as given.
async fn serve<S: Store>(w: &World<S>, api_tokens: Option<&str>) -> String {
    let tokens = Config::from_vars(|name| {
        (name == "API_TOKENS")
            .then(|| api_tokens.map(str::to_owned))
            .flatten()
    })
    .expect("API_TOKENS parses")
    .api_tokens;
    let router = training_credits::api::router(w.store().clone(), tokens);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a local port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// (status, content type, body) of a GET of `path` with `token`, if any.
async fn get(base: &str, path: &str, token: Option<&str>) -> (u16, String, Value) {
    let mut request = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("a body");
    (
        status,
        content_type,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

fn assert_problem(answer: &(u16, String, Value), status: u16, mentions: &str) {
    let (got, content_type, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], "about:blank");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(mentions), "{detail}");
}

async fn ledger<S: Store>(w: &mut World<S>) {
    assert_eq!(
        w.open("acme", "automatic", "boss@acme.test", "ACME-1234")
            .await,
        Outcome::Applied
    );
    assert_eq!(w.purchase("acme", "p1", "100").await, Outcome::Applied);
    assert_eq!(
        w.request("r1", "ACME-1234", "l1", "c1", "30").await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r2", "WRONG-CODE", "l2", "c1", "5").await,
        Outcome::Rejected(Rejection::InvalidCode)
    );
}

async fn the_api_needs_a_configured_token_and_is_off_without_one<S: Store>(mut w: World<S>) {
    ledger(&mut w).await;
    let off = serve(&w, None).await;
    let (status, _, _) = get(&off, "/v1/accounts/acme", Some(TOKEN)).await;
    assert_eq!(status, 404, "API_TOKENS unset: every /v1 path is unknown");

    let on = serve(&w, Some(&format!("other-token, {TOKEN}"))).await;
    assert_problem(&get(&on, "/v1/accounts/acme", None).await, 401, "Bearer");
    assert_problem(
        &get(&on, "/v1/accounts/acme", Some("wrong")).await,
        401,
        "not valid",
    );
    let (status, content_type, body) = get(&on, "/v1/accounts/acme", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(content_type.starts_with("application/json"));
    assert_eq!(body["account_id"], "acme");
    let (status, _, _) = get(&on, "/v1/accounts/acme", Some("other-token")).await;
    assert_eq!(status, 200, "any configured token");
}

async fn an_account_is_shown_as_account_show_prints_it_with_its_learner_limit<S: Store>(
    mut w: World<S>,
) {
    ledger(&mut w).await;
    let base = serve(&w, Some(TOKEN)).await;
    let (_, _, body) = get(&base, "/v1/accounts/acme", Some(TOKEN)).await;
    let mut fields: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "account_id",
            "approval_mode",
            "available",
            "balance",
            "code",
            "held",
            "learner_limit",
            "lots",
            "low_balance_threshold",
            "name",
            "notes",
            "owners",
            "scope",
            "status"
        ]
    );
    assert_eq!(body["available"], "70.00");
    assert_eq!(body["learner_limit"], Value::Null);
    assert_eq!(body["lots"][0]["purchase_id"], "p1");
    assert_eq!(body["lots"][0]["remaining"], "70.00");
    assert_eq!(body["lots"][0]["status"], "active");

    assert_problem(
        &get(&base, "/v1/accounts/nobody", Some(TOKEN)).await,
        404,
        "nobody",
    );
    assert_problem(
        &get(&base, "/v1/accounts/bad%20id", Some(TOKEN)).await,
        400,
        "account id",
    );
}

async fn a_request_is_shown_with_its_account_and_a_rejected_one_without<S: Store>(mut w: World<S>) {
    ledger(&mut w).await;
    let base = serve(&w, Some(TOKEN)).await;
    let (status, _, body) = get(&base, "/v1/redemptions/r1", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request_id"], "r1");
    assert_eq!(body["account_id"], "acme");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["cost"], "30.00");
    assert_eq!(body["decided_by"], "system");
    assert_eq!(body["learner"]["id"], "l1");
    assert_eq!(body["item"]["id"], "c1");
    assert_eq!(body["refunded"], "0.00");

    let (status, _, body) = get(&base, "/v1/redemptions/r2", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account_id"], Value::Null);
    assert_eq!(body["status"], "rejected");
    assert_eq!(body["reason"], "invalid_code");

    assert_problem(
        &get(&base, "/v1/redemptions/r404", Some(TOKEN)).await,
        404,
        "r404",
    );
}

on_both_backends!(
    the_api_needs_a_configured_token_and_is_off_without_one,
    an_account_is_shown_as_account_show_prints_it_with_its_learner_limit,
    a_request_is_shown_with_its_account_and_a_rejected_one_without,
);
