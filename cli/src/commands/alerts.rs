//! `lifeboat alerts`: conditions that need an operator — RPO over threshold, disks needing a
//! resync, components that stopped heartbeating.
use crate::context::{status_error, ContextArgs};
use crate::format::{age, table};
use lifeboat_proto::v1::Empty;
use serde_json::json;

pub async fn list(ctx: &ContextArgs, as_json: bool) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let alerts = client
        .list_alerts(Empty {})
        .await
        .map_err(status_error)?
        .into_inner()
        .alerts;
    if as_json {
        let rows: Vec<_> = alerts
            .iter()
            .map(|a| json!({"key": a.key, "severity": a.severity, "subject": a.subject, "message": a.message, "raised_at_unix_ms": a.raised_at_unix_ms}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "alerts": rows }))?
        );
        return Ok(());
    }
    if alerts.is_empty() {
        println!("No active alerts.");
        return Ok(());
    }
    let mut t = table(&["SEVERITY", "SUBJECT", "MESSAGE", "RAISED"]);
    for a in &alerts {
        t.add_row(vec![
            a.severity.clone(),
            a.subject.clone(),
            a.message.clone(),
            age(a.raised_at_unix_ms),
        ]);
    }
    println!("{t}");
    Ok(())
}
