//! `lifeboat cluster status`: the Raft view of the configuration server cluster.
use crate::context::{status_error, ContextArgs};
use crate::format::table;
use lifeboat_proto::v1::Empty;
use serde_json::json;

pub async fn status(ctx: &ContextArgs, as_json: bool) -> anyhow::Result<()> {
    let mut admin = ctx.admin().await?;
    let s = admin
        .cluster_status(Empty {})
        .await
        .map_err(status_error)?
        .into_inner();
    if as_json {
        let members: Vec<_> = s
            .members
            .iter()
            .map(|m| json!({"node_id": m.node_id, "address": m.address, "voter": m.voter, "matched_index": m.matched_index}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "cluster_id": s.cluster_id, "node_id": s.node_id, "state": s.state,
                "leader_id": s.leader_id, "leader_address": s.leader_address, "term": s.term,
                "commit_index": s.commit_index, "last_applied": s.last_applied,
                "last_log_index": s.last_log_index, "members": members,
                "leader_without_quorum": s.leader_without_quorum,
            }))?
        );
        return Ok(());
    }
    println!("Cluster:       {}", s.cluster_id);
    if s.leader_id == 0 {
        println!("Leader:        none elected");
    } else {
        println!(
            "Leader:        node {} at {}",
            s.leader_id, s.leader_address
        );
    }
    if s.leader_without_quorum {
        let voters = s.members.iter().filter(|m| m.voter).count();
        println!(
            "               WITHOUT A MAJORITY: {} of {voters} voters must run for a change to \
             commit; start the nodes that are down (changes wait meanwhile)",
            voters / 2 + 1
        );
    }
    println!("Term:          {}", s.term);
    println!("Commit index:  {}", s.commit_index);
    println!("Applied:       {}", s.last_applied);
    println!("Answered by:   node {} ({})", s.node_id, s.state);
    println!();
    let mut t = table(&["NODE", "ADDRESS", "MEMBERSHIP", "LEADER", "MATCHED INDEX"]);
    for m in &s.members {
        t.add_row(vec![
            m.node_id.to_string(),
            m.address.clone(),
            if m.voter { "voter" } else { "learner" }.to_string(),
            if m.node_id == s.leader_id { "*" } else { "" }.to_string(),
            if m.matched_index == 0 {
                "-".into()
            } else {
                m.matched_index.to_string()
            },
        ]);
    }
    println!("{t}");
    Ok(())
}
