//! `lifeboat audit`: registrations, refused attempts, revocations, passphrase changes.
use crate::context::{status_error, ContextArgs};
use crate::format::{table, time};
use lifeboat_proto::v1::ListAuditRequest;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Most recent entries to show.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Only entries newer than this (e.g. 30m, 2h, 7d).
    #[arg(long, value_parser = crate::durations::whole_seconds)]
    since: Option<u64>,
    #[arg(long)]
    json: bool,
}

pub async fn run(ctx: &ContextArgs, args: AuditArgs) -> anyhow::Result<()> {
    let since_unix_ms = match args.since {
        None => 0,
        Some(d) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            now.saturating_sub(std::time::Duration::from_secs(d))
                .as_millis() as i64
        }
    };
    let mut admin = ctx.admin().await?;
    let reply = admin
        .list_audit(ListAuditRequest {
            limit: args.limit,
            since_unix_ms,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if args.json {
        let rows: Vec<_> = reply
            .entries
            .iter()
            .map(|e| json!({"seq": e.seq, "at_unix_ms": e.at_unix_ms, "kind": e.kind, "source": e.source, "subject": e.subject, "detail": e.detail}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"entries": rows}))?
        );
        return Ok(());
    }
    let mut t = table(&["#", "TIME", "EVENT", "SOURCE", "SUBJECT", "DETAIL"]);
    for e in &reply.entries {
        t.add_row(vec![
            e.seq.to_string(),
            time(e.at_unix_ms),
            e.kind.clone(),
            e.source.clone(),
            e.subject.clone(),
            e.detail.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
