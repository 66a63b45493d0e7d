//! SPEC §6 rule 13: with `PUBLISHERS` set, a message is applied only if the
//! broker user that published it (its `user_id`, checked by RabbitMQ) is
//! bound to its `source` or to `*`. Real broker users, created for the test.

use crate::support as common;

use std::time::Duration;

use common::broker::{BrokerUser, Client, TestWorker, Vhost, config, eventually, publish_in};
use common::events::event;
use serde_json::{Value, json};
use training_credits::broker::persistent_cloudevent;
use training_credits::config::Config;
use training_credits::store::Store;

/// Publishes `event` as `user` (publisher permissions: no declaring), with
/// `user_id` set (the broker refuses any but the user's own name) or none.
async fn publish_as(user: &BrokerUser, event: &Value, with_user_id: bool) {
    let connection =
        lapin::Connection::connect(&user.url(), lapin::ConnectionProperties::default())
            .await
            .expect("the user connects");
    let channel = connection.create_channel().await.expect("a channel");
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut properties = persistent_cloudevent(event["id"].as_str().unwrap_or_default());
    if with_user_id {
        properties = properties.with_user_id(user.name.as_str().into());
    }
    let routing_key = event["type"].as_str().unwrap_or_default();
    publish_in(
        &channel,
        routing_key,
        event.to_string().as_bytes(),
        properties,
    )
    .await;
    let _ = connection.close(200, "done".into()).await;
}

const PASSWORD: &str = "secret-of-the-test";

fn purchase(source: &str, account: &str, purchase_id: &str) -> Value {
    event(
        &format!("ev-{purchase_id}"),
        source,
        "credits.purchase.completed",
        json!({
            "account_id": account,
            "purchase_id": purchase_id,
            "credits": "10",
            "purchased_at": "2026-01-01T09:00:00Z",
        }),
    )
}

fn open(account: &str, code: &str) -> Value {
    event(
        &format!("ev-open-{account}"),
        "portal",
        "credits.account.opened",
        json!({
            "account_id": account,
            "owners": [{"email": format!("boss@{account}.test"), "name": "Boss"}],
            "approval_mode": "automatic",
            "code": code,
        }),
    )
}

/// Runs the binary with `args` as `amqp_url`'s broker user: (success, output).
async fn binary(amqp_url: &str, database_url: &str, args: &[&str]) -> (bool, String) {
    let amqp_url = amqp_url.to_owned();
    let database_url = database_url.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(common::BINARY);
        for variable in common::contract_variables() {
            command.env_remove(variable);
        }
        command
            .args(&args)
            .env("AMQP_URL", amqp_url)
            .env("DATABASE_URL", database_url)
            .env("RETRY_DELAYS", "200ms,400ms")
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("the command's thread");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// (event id, reason) of every dead letter.
async fn dead_letters(amqp_url: &str, database_url: &str) -> Vec<(String, String)> {
    let (ok, out) = binary(amqp_url, database_url, &["dlq", "list", "--json"]).await;
    assert!(ok, "dlq list: {out}");
    let mut letters: Vec<(String, String)> = out
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|l| {
            (
                l["id"].as_str().unwrap_or_default().to_owned(),
                l["x-error-reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    letters.sort();
    letters
}

async fn only_the_users_bound_to_a_source_may_claim_it<S: Store>(store: S, url: String) {
    let vhost = Vhost::new();
    // The permissions SECURITY.md recommends: a publisher writes to the
    // inbound exchange only; an operator may also replay, and the one bound
    // to `*` is trusted whatever it replays.
    let shop = BrokerUser::with(&vhost, "shop", PASSWORD, BrokerUser::PUBLISHER);
    let other = BrokerUser::with(&vhost, "other", PASSWORD, BrokerUser::OPERATOR);
    let star = BrokerUser::with(&vhost, "operator", PASSWORD, BrokerUser::OPERATOR);
    let client = Client::new(&vhost).await;
    let mail_dir = tempfile::tempdir().expect("a folder");
    let bindings = format!("shop={},portal=guest,*={}", shop.name, star.name);
    let publishers = Config::from_vars(|name| (name == "PUBLISHERS").then(|| bindings.clone()))
        .expect("PUBLISHERS parses")
        .publishers;
    assert!(publishers.is_some());
    let worker = TestWorker::start(
        store.clone(),
        Config {
            publishers,
            ..config(&vhost, &url, None, mail_dir.path())
        },
    )
    .await;
    let guest = Client::new(&vhost).await;

    // guest is bound to `portal`.
    let opened = open("acme", "ACME-1234");
    guest
        .publish_with(
            "credits.account.opened",
            opened.to_string().as_bytes(),
            persistent_cloudevent(opened["id"].as_str().unwrap_or_default())
                .with_user_id("guest".into()),
        )
        .await;
    client
        .await_outbound("training-credits.account.opened", 1)
        .await;

    let bound = purchase("shop", "acme", "p-bound");
    publish_as(&shop, &bound, true).await;
    let another_user = purchase("shop", "acme", "p-other");
    publish_as(&other, &another_user, true).await;
    let no_user_id = purchase("shop", "acme", "p-none");
    publish_as(&shop, &no_user_id, false).await;
    let unlisted = purchase("lms", "acme", "p-unlisted");
    publish_as(&shop, &unlisted, true).await;
    let starred = purchase("shop", "acme", "p-star");
    publish_as(&star, &starred, true).await;
    // Overtakes its account: retried by the worker (as guest), still the
    // shop's when it comes back.
    let early = purchase("shop", "beta", "p-early");
    publish_as(&shop, &early, true).await;
    let recorded = client
        .await_outbound("training-credits.purchase.recorded", 2)
        .await;
    let mut ids: Vec<&str> = recorded
        .iter()
        .map(|e| e["data"]["purchase_id"].as_str().unwrap_or_default())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["p-bound", "p-star"]);
    let untrusted = |events: &[&Value]| -> Vec<(String, String)> {
        let mut letters: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or_default().to_owned(),
                    "untrusted_source".to_owned(),
                )
            })
            .collect();
        letters.sort();
        letters
    };
    let expected = untrusted(&[&another_user, &no_user_id, &unlisted]);
    eventually(
        Duration::from_secs(10),
        "three untrusted dead letters",
        || async { dead_letters(&vhost.url(), &url).await == expected },
    )
    .await;

    guest
        .publish_with(
            "credits.account.opened",
            open("beta", "BETA-1234").to_string().as_bytes(),
            persistent_cloudevent("ev-open-beta").with_user_id("guest".into()),
        )
        .await;
    client
        .await_outbound("training-credits.purchase.recorded", 3)
        .await;
    assert!(
        client
            .outbound_of("training-credits.purchase.recorded")
            .iter()
            .any(|e| e["data"]["purchase_id"] == "p-early"),
        "the retried purchase kept its publisher"
    );

    // `publish` sends as its own broker user (without its `user_id` the
    // operator could not claim `shop`).
    let file = mail_dir.path().join("events.jsonl");
    std::fs::write(&file, format!("{}\n", purchase("shop", "acme", "p-cli"))).expect("written");
    let (ok, out) = binary(&star.url(), &url, &["publish", &file.display().to_string()]).await;
    assert!(ok, "publish: {out}");
    client
        .await_outbound("training-credits.purchase.recorded", 4)
        .await;

    // A replay is judged by who replays: another user's is refused again,
    // the star user's is applied.
    let (ok, out) = binary(&other.url(), &url, &["dlq", "replay", "--all"]).await;
    assert!(ok, "replay by another user: {out}");
    eventually(
        Duration::from_secs(10),
        "the replayed letters back",
        || async { dead_letters(&vhost.url(), &url).await == expected },
    )
    .await;
    let (ok, out) = binary(&star.url(), &url, &["dlq", "replay", "--all"]).await;
    assert!(ok, "replay by the star user: {out}");
    client
        .await_outbound("training-credits.purchase.recorded", 7)
        .await;
    assert!(dead_letters(&vhost.url(), &url).await.is_empty());
    worker.stop().await;
    common::assert_verified(&store).await;
}

on_both_stores!(only_the_users_bound_to_a_source_may_claim_it);
