//! A three-node configuration server cluster on 127.0.0.1: nodes join with the passphrase,
//! become voters, and after the leader is killed (SIGKILL) a new leader is elected and every
//! acknowledged write is still there. Writes sent to a follower are forwarded to the leader.
//! Components registered with a node that is lost follow the rest of the cluster.
use lifeboat_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn status(context: &Path, addr: &str) -> Option<Value> {
    let out = run(
        "lifeboat",
        &["--cs", addr, "cluster", "status", "--json"],
        &[("LIFEBOAT_CONTEXT", &context.display().to_string())],
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn voters(s: &Value) -> usize {
    s["members"]
        .as_array()
        .map(|m| m.iter().filter(|m| m["voter"] == true).count())
        .unwrap_or(0)
}

/// Registers an agent named `name` through the node at `addr`: one acknowledged Raft write.
fn register_agent(tmp: &Path, addr: &str, passphrase_file: &Path, name: &str) {
    let dir = tmp.join(name);
    let out = run(
        "mobility-agent",
        &[
            "register",
            "--data-dir",
            &dir.display().to_string(),
            "--cs",
            addr,
            "--passphrase-file",
            &passphrase_file.display().to_string(),
            "--name",
            name,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "register {name} via {addr}: {}",
        text(&out)
    );
}

fn agent_names(context: &Path, addr: &str) -> Vec<String> {
    let out = run(
        "lifeboat",
        &["--cs", addr, "servers", "list", "--role", "agent", "--json"],
        &[("LIFEBOAT_CONTEXT", &context.display().to_string())],
    );
    assert!(out.status.success(), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn three_nodes_elect_a_new_leader_and_keep_acknowledged_writes_after_leader_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, _) = CsNode::init(tmp.path().join("cs1"));
    let ctx = first.context();
    let mut nodes = vec![first];
    for i in 2..=3 {
        let pf = nodes[0].passphrase_file();
        let node = CsNode::join(tmp.path().join(format!("cs{i}")), &nodes[0].addr, &pf);
        nodes.push(node);
    }
    wait_until("three voters", WAIT, || {
        status(&ctx, &nodes[0].addr).is_some_and(|s| voters(&s) == 3)
    });
    // Exactly one node publishes itself as a leader a majority follows.
    wait_until("one node with lifeboat_raft_leader 1", WAIT, || {
        leaders_by_metrics(&nodes.iter().collect::<Vec<_>>()) == 1
    });
    let joined = tmp
        .path()
        .join("cs2")
        .join("private")
        .join("connection.passphrase");
    assert!(
        joined.exists(),
        "a joined node keeps the passphrase file too"
    );

    // Acknowledged writes, some through followers (forwarded to the leader).
    let pf = nodes[0].passphrase_file();
    let mut expected = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..3 {
            let name = format!("agent-{i}-{j}");
            register_agent(tmp.path(), &node.addr, &pf, &name);
            expected.push(name);
        }
    }
    expected.sort();
    for node in &nodes {
        wait_until("every node applied every write", WAIT, || {
            agent_names(&ctx, &node.addr) == expected
        });
    }

    // Kill the leader.
    let before = status(&ctx, &nodes[0].addr).unwrap();
    let leader_id = before["leader_id"].as_u64().unwrap();
    let old_term = before["term"].as_u64().unwrap();
    let leader_index = nodes
        .iter()
        .position(|n| n.addr == before["leader_address"].as_str().unwrap())
        .expect("leader is one of ours");
    nodes[leader_index].proc.as_mut().unwrap().kill9();
    let survivors: Vec<&CsNode> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader_index)
        .map(|(_, n)| n)
        .collect();

    wait_until("a new leader", WAIT, || {
        status(&ctx, &survivors[0].addr).is_some_and(|s| {
            let l = s["leader_id"].as_u64().unwrap_or(0);
            l != 0 && l != leader_id
        })
    });
    wait_until("a survivor with lifeboat_raft_leader 1", WAIT, || {
        leaders_by_metrics(&survivors) == 1
    });
    let after = status(&ctx, &survivors[0].addr).unwrap();
    assert!(
        after["term"].as_u64().unwrap() > old_term,
        "a new term began"
    );
    for node in &survivors {
        assert_eq!(
            agent_names(&ctx, &node.addr),
            expected,
            "acknowledged writes survive on {}",
            node.addr
        );
    }

    // The cluster still takes writes, through either survivor.
    for (i, node) in survivors.iter().enumerate() {
        let name = format!("after-{i}");
        register_agent(tmp.path(), &node.addr, &pf, &name);
        expected.push(name);
    }
    expected.sort();
    for node in &survivors {
        wait_until("writes after failover applied", WAIT, || {
            agent_names(&ctx, &node.addr) == expected
        });
    }

    // The killed node comes back, catches up and agrees.
    nodes[leader_index].start();
    let back = nodes[leader_index].addr.clone();
    wait_until("old leader caught up", WAIT, || {
        run(
            "lifeboat",
            &[
                "--cs", &back, "servers", "list", "--role", "agent", "--json",
            ],
            &[("LIFEBOAT_CONTEXT", &ctx.display().to_string())],
        )
        .status
        .success()
            && agent_names(&ctx, &back) == expected
    });
}

/// How many of `nodes` publish `lifeboat_raft_leader 1`.
fn leaders_by_metrics(nodes: &[&CsNode]) -> usize {
    nodes
        .iter()
        .filter(|n| {
            http_get(&n.metrics, "/metrics")
                .is_ok_and(|m| m.lines().any(|l| l == "lifeboat_raft_leader 1"))
        })
        .count()
}

/// Runs `lifeboat` against the node at `addr` with the cluster's admin context.
fn lifeboat_at(context: &Path, addr: &str, args: &[&str]) -> std::process::Output {
    let mut argv = vec!["--cs", addr];
    argv.extend_from_slice(args);
    run(
        "lifeboat",
        &argv,
        &[("LIFEBOAT_CONTEXT", &context.display().to_string())],
    )
}

/// Components registered with one node keep working after that node is lost: their
/// heartbeats learn the cluster's other members, and both the heartbeats and the long-poll
/// for assignments connect to the first of them that answers (a connection is made at once,
/// so a node that is down is skipped rather than handed out and failing at the first call).
#[test]
fn components_follow_the_cluster_after_losing_the_node_they_registered_with() {
    let tmp = tempfile::tempdir().unwrap();
    let (first, _) = CsNode::init(tmp.path().join("cs1"));
    let ctx = first.context();
    let pf = first.passphrase_file();
    let mut nodes = vec![first];
    for i in 2..=3 {
        let node = CsNode::join(tmp.path().join(format!("cs{i}")), &nodes[0].addr, &pf);
        nodes.push(node);
    }
    wait_until("three voters", WAIT, || {
        status(&ctx, &nodes[0].addr).is_some_and(|s| voters(&s) == 3)
    });
    // The node to lose is the one components try first (their address lists are sorted):
    // they register with it, so it is also the one they start with.
    nodes.sort_by(|a, b| a.addr.cmp(&b.addr));
    let (lost, survivors) = nodes.split_first_mut().expect("three nodes");
    let img = tmp.path().join("web01.img");
    std::fs::write(&img, vec![0x5a; 8 << 20]).unwrap();
    let disk = format!("disk0={}", img.display());
    let mut agent = Component::register(
        "mobility-agent",
        "web01",
        tmp.path(),
        lost,
        &["--disk", &disk],
    );
    let mut ps = Component::register("process-server", "ps1", tmp.path(), lost, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), lost, &[]);
    let out = lifeboat(&ctx, &["policy", "create", "gold"]);
    assert!(out.status.success(), "{}", text(&out));
    for c in [&mut ps, &mut mt, &mut agent] {
        c.start();
    }
    let knows_all = |dir: &Path| {
        std::fs::read_to_string(dir.join("identity").join("identity.toml"))
            .is_ok_and(|t| survivors.iter().all(|n| t.contains(&n.addr)))
    };
    wait_until("components learnt every node", WAIT, || {
        [&ps, &mt, &agent].iter().all(|c| knows_all(&c.dir))
    });

    lost.proc.as_mut().unwrap().kill9();
    let survivor = survivors[0].addr.clone();
    wait_until("a leader among the survivors", WAIT, || {
        status(&ctx, &survivor).is_some_and(|s| {
            s["leader_address"]
                .as_str()
                .is_some_and(|a| survivors.iter().any(|n| n.addr == a))
        })
    });
    // Placement needs the survivors to have heard from the process server and master target
    // since the election (the lost node may have died before its summary of their
    // heartbeats was committed).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = lifeboat_at(&ctx, &survivor, &["protect", "web01", "--policy", "gold"]);
        if out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the survivors never accepted protect: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = lifeboat_at(&ctx, &survivor, &["wait", "web01", "--timeout-secs", "120"]);
    assert!(
        out.status.success(),
        "web01 did not become Protected with its first node gone: {}",
        text(&out)
    );
}
