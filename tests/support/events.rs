//! Inbound CloudEvents as a publisher sends them through the broker, for the
//! tests that drive the worker rather than a [`super::World`].

use serde_json::{Value, json};
use training_credits::domain::Ts;

/// A minimal inbound CloudEvent.
pub fn event(id: &str, source: &str, type_name: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": source, "type": type_name, "data": data})
}

/// An automatic account with code `<ACCOUNT_ID>-CODE`, owned by `owners`.
pub fn opened(event_id: &str, account_id: &str, owners: &[&str]) -> Value {
    let owners: Vec<Value> = owners
        .iter()
        .map(|email| json!({"email": email, "name": format!("Owner {email}")}))
        .collect();
    event(
        event_id,
        "portal",
        "credits.account.opened",
        json!({
            "account_id": account_id, "owners": owners, "approval_mode": "automatic",
            "code": format!("{}-CODE", account_id.to_uppercase()),
        }),
    )
}

/// A purchase of `credits` from the shop, made now.
pub fn purchase(event_id: &str, account_id: &str, purchase_id: &str, credits: &str) -> Value {
    event(
        event_id,
        "shop",
        "credits.purchase.completed",
        json!({
            "account_id": account_id, "purchase_id": purchase_id, "credits": credits,
            "purchased_at": Ts::now(),
        }),
    )
}
