//! SPEC §9, the read API: tokens, problems, one account, one request, on a
//! real store behind the real router, over HTTP.

use crate::support as common;

use std::sync::Arc;

use common::{STAFF, World};
use serde_json::{Value, json};
use training_credits::apply::{Applier, Input};
use training_credits::config::Config;
use training_credits::decode::{Schemas, decode};
use training_credits::domain::{Outcome, Rejection, Ts};
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
    let applier = Arc::new(Applier::new(w.store().clone(), common::settings()));
    let router = training_credits::api::router(applier, tokens);
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

/// Every item of `path`'s pages of `limit`, calling `between` after each
/// page (to add rows while paging), and the number of pages.
async fn every_page<S: Store>(
    w: &mut World<S>,
    base: &str,
    path: &str,
    limit: usize,
    mut between: impl AsyncFnMut(&mut World<S>, usize),
) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{separator}limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let (status, _, body) = get(base, &url, Some(TOKEN)).await;
        assert_eq!(status, 200, "{url}: {body}");
        let page = body["items"].as_array().expect("items").clone();
        assert!(page.len() <= limit);
        items.extend(page);
        pages += 1;
        between(w, pages).await;
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return (items, pages),
        }
    }
}

async fn requests_are_listed_in_stable_pages_while_more_arrive<S: Store>(mut w: World<S>) {
    ledger(&mut w).await;
    assert_eq!(w.purchase("acme", "p2", "1000").await, Outcome::Applied);
    for n in 3..=7 {
        let outcome = w
            .request(&format!("r{n}"), "ACME-1234", "l1", &format!("c{n}"), "10")
            .await;
        assert_eq!(outcome, Outcome::Applied);
    }
    let base = serve(&w, Some(TOKEN)).await;
    // Two more arrive after each of the first three pages.
    let (items, pages) = every_page(
        &mut w,
        &base,
        "/v1/accounts/acme/redemptions",
        2,
        async |w, page| {
            if page <= 3 {
                for n in 0..2 {
                    let id = format!("late{page}-{n}");
                    let outcome = w.request(&id, "ACME-1234", "l9", &id, "1").await;
                    assert_eq!(outcome, Outcome::Applied);
                }
            }
        },
    )
    .await;
    let ids: Vec<&str> = items
        .iter()
        .map(|i| i["request_id"].as_str().expect("an id"))
        .collect();
    let mut expected = vec!["r1", "r3", "r4", "r5", "r6", "r7"];
    expected.extend([
        "late1-0", "late1-1", "late2-0", "late2-1", "late3-0", "late3-1",
    ]);
    assert_eq!(ids, expected, "oldest first, none twice, none skipped");
    assert!(pages >= 6);
    assert!(items.iter().all(|i| i["learner"]["email"].is_string()));

    assert_eq!(
        w.request("big", "ACME-1234", "l1", "c99", "100000").await,
        Outcome::Rejected(Rejection::InsufficientBalance)
    );
    let (_, _, body) = get(
        &base,
        "/v1/accounts/acme/redemptions?status=rejected",
        Some(TOKEN),
    )
    .await;
    let rejected: Vec<&Value> = body["items"].as_array().expect("items").iter().collect();
    assert_eq!(rejected.len(), 1, "{body}");
    assert_eq!(rejected[0]["request_id"], "big");
    assert_eq!(rejected[0]["reason"], "insufficient_balance");
    assert_eq!(body["next_cursor"], Value::Null);

    for (query, mentions) in [
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=x", "cursor"),
    ] {
        let url = format!("/v1/accounts/acme/redemptions?{query}");
        assert_problem(&get(&base, &url, Some(TOKEN)).await, 400, mentions);
    }
    assert_problem(
        &get(&base, "/v1/accounts/nobody/redemptions", Some(TOKEN)).await,
        404,
        "nobody",
    );
}

/// Several writers at once on one account (on PostgreSQL, transactions that
/// really overlap, as several workers sharing a database run them): every
/// walk through the pages taken while they write is a prefix of the final
/// list, so no walk passed a row that then committed behind it.
async fn pages_walked_while_several_writers_commit_never_skip_a_row<S: Store>(mut w: World<S>) {
    const WRITERS: usize = 4;
    const BATCHES: usize = 15;
    const PER_BATCH: usize = 3;
    ledger(&mut w).await;
    assert_eq!(w.purchase("acme", "p2", "100000").await, Outcome::Applied);
    let base = serve(&w, Some(TOKEN)).await;
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let batches: Vec<Vec<Value>> = (0..BATCHES)
            .map(|batch| {
                (0..PER_BATCH)
                    .map(|n| {
                        let id = format!("w{writer}-{batch}-{n}");
                        w.request_event(&id, "ACME-1234", &id, &id, "1")
                    })
                    .collect()
            })
            .collect();
        let applier = Applier::new(w.store().clone(), common::settings());
        let schemas = Schemas::load().expect("the schemas compile");
        let now = w.now;
        writers.push(tokio::spawn(async move {
            for events in batches {
                let inputs: Vec<Input> = events
                    .iter()
                    .map(|e| {
                        Input::from(decode(&schemas, e.to_string().as_bytes()).expect("valid"))
                    })
                    .collect();
                // A lost race is an error the worker retries; so does this.
                let outcomes = loop {
                    if let Ok(outcomes) = applier.apply(&inputs, now).await {
                        break outcomes;
                    }
                };
                assert!(
                    outcomes.iter().all(|o| *o == Outcome::Applied),
                    "{outcomes:?}"
                );
                // Writing lasts longer than a walk, however fast the
                // database, so that walks run while batches commit.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }));
    }
    let path = "/v1/accounts/acme/redemptions";
    let ids = |items: Vec<Value>| -> Vec<String> {
        items
            .iter()
            .map(|i| i["request_id"].as_str().expect("an id").to_owned())
            .collect()
    };
    let mut walks = Vec::new();
    while !writers.iter().all(|writer| writer.is_finished()) {
        walks.push(ids(every_page(&mut w, &base, path, 4, async |_, _| {})
            .await
            .0));
    }
    for writer in writers {
        writer.await.expect("the writer finished");
    }
    let all = ids(every_page(&mut w, &base, path, 7, async |_, _| {}).await.0);
    assert_eq!(all.len(), 1 + WRITERS * BATCHES * PER_BATCH);
    assert_eq!(
        all.iter().collect::<std::collections::HashSet<_>>().len(),
        all.len(),
        "no request twice"
    );
    assert!(
        !walks.is_empty(),
        "the pages were walked while the writers wrote"
    );
    for walk in &walks {
        assert_eq!(
            walk[..],
            all[..walk.len()],
            "a walk is a prefix of the final list"
        );
    }
}

async fn the_journal_is_paged_oldest_first_within_its_window<S: Store>(mut w: World<S>) {
    ledger(&mut w).await;
    let start = w.now;
    w.advance_days(1);
    let middle = w.now;
    assert_eq!(w.purchase("acme", "p2", "50").await, Outcome::Applied);
    assert_eq!(
        w.request("r3", "ACME-1234", "l3", "c3", "20").await,
        Outcome::Applied
    );
    let base = serve(&w, Some(TOKEN)).await;
    let (entries, _) = every_page(
        &mut w,
        &base,
        "/v1/accounts/acme/journal",
        1,
        async |_, _| {},
    )
    .await;
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["entry"].as_str().expect("an entry"))
        .collect();
    assert_eq!(kinds, ["purchase", "redeem", "purchase", "redeem"]);
    let columns: Vec<&str> = entries[1]
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        columns.len(),
        10,
        "the transactions report's columns: {columns:?}"
    );
    assert_eq!(entries[1]["amount"], "-30.00");
    assert_eq!(entries[1]["balance_after"], "70.00");
    assert_eq!(entries[1]["request_id"], "r1");
    assert_eq!(entries[1]["learner_email"], "l1@learners.test");

    let window = format!(
        "/v1/accounts/acme/journal?from={}",
        middle.utc().to_rfc3339()
    );
    let (_, _, body) = get(&base, &window.replace('+', "%2B"), Some(TOKEN)).await;
    assert_eq!(body["items"].as_array().map(Vec::len), Some(2), "{body}");
    let before = format!("/v1/accounts/acme/journal?to={}", middle.utc().to_rfc3339());
    let (_, _, body) = get(&base, &before.replace('+', "%2B"), Some(TOKEN)).await;
    assert_eq!(body["items"].as_array().map(Vec::len), Some(2), "{body}");
    assert!(start < middle);

    // Written last but dated first (a message that was late): oldest first
    // means by instant, and a window of instants is still paged whole.
    w.now = start.plus(chrono::Duration::hours(-1));
    assert_eq!(w.purchase("acme", "p0", "10").await, Outcome::Applied);
    let window = format!(
        "/v1/accounts/acme/journal?from={}&to={}",
        w.now.utc().to_rfc3339().replace('+', "%2B"),
        middle.utc().to_rfc3339().replace('+', "%2B")
    );
    let (entries, _) = every_page(&mut w, &base, &window, 1, async |_, _| {}).await;
    let lots: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["entry"].as_str().unwrap(),
                e["purchase_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        lots,
        [("purchase", "p0"), ("purchase", "p1"), ("redeem", "p1")]
    );

    assert_problem(
        &get(
            &base,
            "/v1/accounts/acme/journal?from=yesterday",
            Some(TOKEN),
        )
        .await,
        400,
        "from",
    );
}

/// The answer to a quote of what `w.request(…)` would send.
async fn quote(base: &str, code: &str, learner: &str, item: &str, cost: &str) -> Value {
    let body = json!({
        "code": code,
        "learner": {"id": learner, "email": format!("{learner}@learners.test"), "name": format!("Learner {learner}")},
        "item": {"id": item, "kind": "course", "title": format!("Course {item}")},
        "cost": cost,
    });
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/quotes"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the API answers");
    assert_eq!(response.status().as_u16(), 200);
    serde_json::from_str(&response.text().await.expect("a body")).expect("JSON")
}

async fn open_account<S: Store>(w: &mut World<S>, id: &str, extra: Value) {
    let mut data = json!({
        "account_id": id,
        "owners": [{"email": format!("boss@{id}.test"), "name": "Boss"}],
        "approval_mode": "automatic",
        "code": format!("{}-CODE", id.to_uppercase()),
    });
    if let (Some(data), Some(extra)) = (data.as_object_mut(), extra.as_object()) {
        data.extend(extra.clone());
    }
    assert_eq!(
        w.send("credits.account.opened", data).await,
        Outcome::Applied
    );
    assert_eq!(
        w.purchase(id, &format!("{id}-p"), "100").await,
        Outcome::Applied
    );
}

async fn a_quote_agrees_with_the_request_for_every_reason_and_changes_nothing<S: Store>(
    mut w: World<S>,
) {
    w.now = Ts::now();
    open_account(&mut w, "acme", json!({})).await;
    open_account(&mut w, "idle", json!({})).await;
    open_account(&mut w, "gone", json!({})).await;
    open_account(
        &mut w,
        "narrow",
        json!({"scope": {"kind": "activity", "ids": ["a1"]}}),
    )
    .await;
    open_account(&mut w, "capped", json!({"learner_limit": "10"})).await;
    let update = json!({"account_id": "idle", "actor": "boss@idle.test", "status": "inactive"});
    assert_eq!(
        w.send("credits.account.updated", update).await,
        Outcome::Applied
    );
    let close = json!({"account_id": "gone", "actor": "staff@x.test"});
    assert_eq!(
        w.send_from(STAFF, "credits.account.closed", close).await,
        Outcome::Applied
    );
    assert_eq!(
        w.request("r0", "ACME-CODE", "l1", "c1", "5").await,
        Outcome::Applied
    );
    let base = serve(&w, Some(TOKEN)).await;

    let accepted = quote(&base, "acme-code", "l2", "c1", "5").await;
    assert_eq!(
        accepted,
        json!({"accepted": true, "reason": null, "approval_mode": "automatic", "available": "95.00"})
    );
    let cases = [
        ("NO-SUCH-CODE", "l2", "c1", "5", Rejection::InvalidCode),
        ("IDLE-CODE", "l2", "c1", "5", Rejection::AccountInactive),
        ("GONE-CODE", "l2", "c1", "5", Rejection::AccountClosed),
        ("NARROW-CODE", "l2", "c1", "5", Rejection::OutOfScope),
        (
            "ACME-CODE",
            "l2",
            "c1",
            "500",
            Rejection::InsufficientBalance,
        ),
        ("ACME-CODE", "l1", "c1", "5", Rejection::AlreadyRedeemed),
        ("CAPPED-CODE", "l2", "c1", "20", Rejection::LearnerLimit),
    ];
    let events = w.events().await.len();
    let emails = w.emails().await.len();
    let journal = w.journal().await.len();
    for (code, learner, item, cost, reason) in cases {
        let quoted = quote(&base, code, learner, item, cost).await;
        assert_eq!(quoted["accepted"], false, "{reason:?}: {quoted}");
        assert_eq!(quoted["reason"], reason.as_str(), "{quoted}");
        if reason == Rejection::InvalidCode {
            assert_eq!(quoted["available"], Value::Null);
            assert_eq!(quoted["approval_mode"], Value::Null);
        } else {
            assert!(quoted["available"].is_string(), "{quoted}");
        }
    }
    assert_eq!(w.events().await.len(), events, "a quote announces nothing");
    assert_eq!(w.emails().await.len(), emails, "a quote sends no email");
    assert_eq!(
        w.journal().await.len(),
        journal,
        "a quote changes no balance"
    );
    assert_eq!(w.available("acme").await, "95.00");
    for (n, (code, learner, item, cost, reason)) in cases.into_iter().enumerate() {
        let outcome = w.request(&format!("q{n}"), code, learner, item, cost).await;
        assert_eq!(
            outcome,
            Outcome::Rejected(reason),
            "the request meets what its quote said"
        );
    }
}

async fn five_invalid_code_quotes_make_the_next_request_too_many_attempts<S: Store>(
    mut w: World<S>,
) {
    w.now = Ts::now();
    open_account(&mut w, "acme", json!({})).await;
    let base = serve(&w, Some(TOKEN)).await;
    for n in 0..5 {
        let quoted = quote(&base, &format!("GUESS-{n}"), "l1", "c1", "5").await;
        assert_eq!(quoted["reason"], "invalid_code");
    }
    let quoted = quote(&base, "ACME-CODE", "l1", "c1", "5").await;
    assert_eq!(quoted["reason"], "too_many_attempts", "{quoted}");
    assert_eq!(
        w.request("r1", "ACME-CODE", "l1", "c1", "5").await,
        Outcome::Rejected(Rejection::TooManyAttempts)
    );
    assert_eq!(
        w.request("r2", "ACME-CODE", "l2", "c1", "5").await,
        Outcome::Applied,
        "another learner is not blocked"
    );

    for body in [json!({"code": "ACME-CODE"}), json!({"code": 1}), json!([])] {
        let response = reqwest::Client::new()
            .post(format!("{base}/v1/quotes"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the API answers");
        assert_eq!(response.status().as_u16(), 400, "{body}");
    }
}

/// Checks `body`, the answer of `method template` with `status`, against
/// the schema the OpenAPI document gives that answer.
fn assert_conforms(doc: &Value, template: &str, method: &str, status: u16, body: &Value) {
    let response = &doc["paths"][template][method]["responses"][status.to_string()];
    let content = response["content"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {template} documents {status}"));
    let (_, media) = content.iter().next().expect("a media type");
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "$ref": media["schema"]["$ref"],
    });
    let schema = if media["schema"]["$ref"].is_null() {
        media["schema"].clone()
    } else {
        schema
    };
    let validator = jsonschema::validator_for(&schema).expect("the document's schema compiles");
    if let Err(error) = validator.validate(body) {
        panic!(
            "{method} {template} {status}: {error} at {}: {body:#}",
            error.instance_path()
        );
    }
}

async fn every_answer_conforms_to_the_openapi_document_which_is_served<S: Store>(mut w: World<S>) {
    w.now = Ts::now();
    ledger(&mut w).await;
    let base = serve(&w, Some(TOKEN)).await;
    let (status, content_type, served) = get(&base, "/v1/openapi.json", None).await;
    assert_eq!(status, 200, "served without a token");
    assert!(content_type.starts_with("application/json"));
    let file: Value = serde_json::from_str(include_str!("../../openapi.json")).expect("JSON");
    assert_eq!(served, file, "the repository's document");
    assert_eq!(served["openapi"], "3.1.0");
    let mut documented: Vec<&str> = file["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    documented.sort_unstable();
    assert_eq!(
        documented,
        [
            "/v1/accounts/{account_id}",
            "/v1/accounts/{account_id}/journal",
            "/v1/accounts/{account_id}/redemptions",
            "/v1/openapi.json",
            "/v1/quotes",
            "/v1/redemptions/{request_id}",
        ],
        "every route of the API, and only those"
    );
    let gets = [
        ("/v1/accounts/{account_id}", "/v1/accounts/acme", 200),
        ("/v1/accounts/{account_id}", "/v1/accounts/nobody", 404),
        ("/v1/accounts/{account_id}", "/v1/accounts/bad%20id", 400),
        (
            "/v1/accounts/{account_id}/redemptions",
            "/v1/accounts/acme/redemptions",
            200,
        ),
        (
            "/v1/accounts/{account_id}/redemptions",
            "/v1/accounts/acme/redemptions?limit=1",
            200,
        ),
        (
            "/v1/accounts/{account_id}/redemptions",
            "/v1/accounts/acme/redemptions?limit=0",
            400,
        ),
        (
            "/v1/accounts/{account_id}/redemptions",
            "/v1/accounts/nobody/redemptions",
            404,
        ),
        (
            "/v1/accounts/{account_id}/journal",
            "/v1/accounts/acme/journal",
            200,
        ),
        (
            "/v1/accounts/{account_id}/journal",
            "/v1/accounts/acme/journal?to=x",
            400,
        ),
        (
            "/v1/accounts/{account_id}/journal",
            "/v1/accounts/nobody/journal",
            404,
        ),
        ("/v1/redemptions/{request_id}", "/v1/redemptions/r1", 200),
        ("/v1/redemptions/{request_id}", "/v1/redemptions/r2", 200),
        ("/v1/redemptions/{request_id}", "/v1/redemptions/r404", 404),
    ];
    for (template, path, expected) in gets {
        let (status, _, body) = get(&base, path, Some(TOKEN)).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert_conforms(&file, template, "get", status, &body);
        let (status, _, body) = get(&base, path, Some("wrong")).await;
        assert_eq!(status, 401);
        assert_conforms(&file, template, "get", status, &body);
    }
    for (code, learner) in [("ACME-1234", "l5"), ("NOPE", "l6")] {
        let quoted = quote(&base, code, learner, "c9", "5").await;
        assert_conforms(&file, "/v1/quotes", "post", 200, &quoted);
    }
}

on_both_backends!(
    the_api_needs_a_configured_token_and_is_off_without_one,
    an_account_is_shown_as_account_show_prints_it_with_its_learner_limit,
    a_request_is_shown_with_its_account_and_a_rejected_one_without,
    requests_are_listed_in_stable_pages_while_more_arrive,
    pages_walked_while_several_writers_commit_never_skip_a_row,
    the_journal_is_paged_oldest_first_within_its_window,
    a_quote_agrees_with_the_request_for_every_reason_and_changes_nothing,
    five_invalid_code_quotes_make_the_next_request_too_many_attempts,
    every_answer_conforms_to_the_openapi_document_which_is_served,
);
