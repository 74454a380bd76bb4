//! The data path with real processes: change batches pushed with an agent's identity reach the
//! process server's cache, are forwarded to the master target and applied to a VHD replica
//! that `qemu-img` agrees with; corrupted, replayed, out-of-order and foreign batches change
//! nothing; kill -9 of the process server or the master target loses nothing acknowledged.
use lifeboat_common::{batch, tls, Identity, Role};
use lifeboat_e2e::*;
use lifeboat_proto::v1::{
    ingest_client::IngestClient, replica_client::ReplicaClient, ChangeBatch, Extent, IngestAck,
    ResumeRequest,
};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);
const DISK: u64 = 32 << 20;

/// A batch of `writes` random 4 KiB-aligned writes (and one zero-fill), also applied to `model`.
fn make_batch(
    rng: &mut rand::rngs::StdRng,
    disk_id: &str,
    seq: u64,
    model: &mut [u8],
) -> ChangeBatch {
    let mut extents = Vec::new();
    for i in 0..8 {
        let len = 4096 * rng.random_range(1..=16usize);
        let offset = 4096 * rng.random_range(0..(DISK as usize - len) / 4096);
        if i == 7 {
            model[offset..offset + len].fill(0);
            extents.push(Extent {
                offset: offset as u64,
                data: Default::default(),
                zero_length: len as u64,
            });
        } else {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            model[offset..offset + len].copy_from_slice(&data);
            extents.push(Extent {
                offset: offset as u64,
                data: data.into(),
                zero_length: 0,
            });
        }
    }
    let mut b = ChangeBatch {
        disk_id: disk_id.into(),
        seq,
        extents,
        kind: batch::KIND_STREAM.into(),
        first_write_unix_ms: 1,
        last_write_unix_ms: seq as i64,
        ..Default::default()
    };
    batch::seal(&mut b);
    b
}

async fn client(agent_dir: &Path, ps: &str) -> IngestClient<Channel> {
    let identity = Identity::load(agent_dir).unwrap();
    IngestClient::new(tls::mtls_channel(&identity, ps, Role::ProcessServer).unwrap())
        .max_encoding_message_size(64 << 20)
}

/// Pushes `batches`; returns the last ack or the error status.
async fn push(
    client: &mut IngestClient<Channel>,
    batches: Vec<ChangeBatch>,
) -> Result<Option<IngestAck>, tonic::Status> {
    let mut acks = client.push(tokio_stream::iter(batches)).await?.into_inner();
    let mut last = None;
    while let Some(ack) = acks.message().await? {
        last = Some(ack);
    }
    Ok(last)
}

async fn durable(client: &mut IngestClient<Channel>, disk: &str) -> (u64, u64) {
    let r = client.resume(take(disk, false)).await.unwrap().into_inner();
    (r.durable_seq, r.applied_seq)
}

fn replica_path(mt: &Component, disk: &str) -> PathBuf {
    mt.dir.join("replicas").join(disk).join("disk.vhd")
}

/// The seq the master target has durably applied to `disk`, as its process server `ps`
/// asks for it (`None` while the master target cannot answer).
fn applied_on_mt(ps: &Component, mt: &Component, disk: &str) -> Option<u64> {
    let identity = Identity::load(&ps.dir).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tls::mtls_channel(&identity, &mt.listen, Role::MasterTarget).ok()?;
        let request = take(disk, false);
        let status = ReplicaClient::new(channel).status(request).await.ok()?;
        Some(status.into_inner().applied_seq)
    })
}

/// Waits until the replica has applied `seq`, then checks it with qemu-img against `model`.
fn assert_replica_matches(
    ps: &Component,
    mt: &Component,
    disk: &str,
    seq: u64,
    model: &[u8],
    tmp: &Path,
) {
    wait_until(&format!("replica applied {seq}"), WAIT, || {
        applied_on_mt(ps, mt, disk) == Some(seq)
    });
    let expected = tmp.join("expected.raw");
    std::fs::write(&expected, model).unwrap();
    let vhd = replica_path(mt, disk);
    if !qemu_check_vpc(&vhd) {
        return;
    }
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(&expected)
        .arg(&vhd)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "replica differs from the source: {}",
        text(&cmp)
    );
}

#[test]
fn batches_reach_the_replica_exactly_once_through_crashes_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    for name in ["web01", "db01"] {
        let img = tmp.path().join(format!("{name}.img"));
        sparse_disk(&img, DISK);
        let disk = format!("disk0={}", img.display());
        Component::register("mobility-agent", name, tmp.path(), &cs, &["--disk", &disk]);
    }
    let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    ps.start();
    mt.start();
    wait_until("ps and mt connected", WAIT, || {
        servers(&ctx, "process-server")
            .iter()
            .chain(servers(&ctx, "master-target").iter())
            .all(|s| s["status"] == "Connected")
    });
    let out = lifeboat(&ctx, &["policy", "create", "gold"]);
    assert!(out.status.success(), "{}", text(&out));
    for m in ["web01", "db01"] {
        let out = lifeboat(&ctx, &["protect", m, "--policy", "gold"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let status = lifeboat_json(&ctx, &["status", "--json"]);
    let disk_of = |m: &str| -> String {
        status["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["machine"] == m)
            .unwrap()["disk_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (web, db) = (disk_of("web01"), disk_of("db01"));
    wait_until("replicas created", WAIT, || {
        replica_path(&mt, &web).exists() && replica_path(&mt, &db).exists()
    });

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let agent_dir = tmp.path().join("web01");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; DISK as usize];
    let batches: Vec<ChangeBatch> = (1..=45)
        .map(|s| make_batch(&mut rng, &web, s, &mut model))
        .collect();

    runtime.block_on(async {
        // Wait for the process server to learn of the disk.
        let mut c = client(&agent_dir, &ps.listen).await;
        wait_until_async(|| async { c.clone().resume(take(&web, false)).await.is_ok() }).await;
        let ack = push(&mut c, batches[..20].to_vec()).await.unwrap().unwrap();
        assert_eq!(ack.durable_seq, 20);

        // A corrupted batch is refused and nothing after it is stored.
        let mut bad = batches[20].clone();
        let mut flipped = bad.extents[0].data.to_vec();
        flipped[0] ^= 0xff;
        bad.extents[0].data = flipped.into();
        let err = push(&mut c, vec![bad, batches[21].clone()])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DataLoss, "{err:?}");
        assert_eq!(durable(&mut c, &web).await.0, 20);
        // A gap is refused.
        let err = push(&mut c, vec![batches[22].clone()]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        // A batch for another machine's disk is refused.
        let mut foreign = batches[20].clone();
        foreign.disk_id = db.clone();
        foreign.seq = 1;
        batch::seal(&mut foreign);
        let err = push(&mut c, vec![foreign]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    });
    assert_replica_matches(&ps, &mt, &web, 20, &model_at(&batches[..20]), tmp.path());

    runtime.block_on(async {
        // A replay changes nothing.
        let mut c = client(&agent_dir, &ps.listen).await;
        let ack = push(&mut c, batches[..20].to_vec()).await.unwrap().unwrap();
        assert_eq!(ack.durable_seq, 20);
    });
    assert_replica_matches(&ps, &mt, &web, 20, &model_at(&batches[..20]), tmp.path());

    // kill -9 of the process server while batches flow: what was acknowledged survives.
    let acked = runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        let stream = tokio_stream::iter(batches[20..30].to_vec());
        let mut acks = c.push(stream).await.unwrap().into_inner();
        let first = acks.message().await.unwrap().unwrap();
        first.durable_seq
    });
    ps.proc.as_mut().unwrap().kill9();
    ps.start();
    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        wait_until_async(|| async { c.clone().resume(take(&web, false)).await.is_ok() }).await;
        let (durable_after, _) = durable(&mut c, &web).await;
        assert!(
            durable_after >= acked,
            "acknowledged batch {acked} lost: durable is {durable_after}"
        );
        let rest = batches[durable_after as usize..30].to_vec();
        if !rest.is_empty() {
            assert_eq!(push(&mut c, rest).await.unwrap().unwrap().durable_seq, 30);
        }
    });
    assert_replica_matches(&ps, &mt, &web, 30, &model_at(&batches[..30]), tmp.path());

    // kill -9 of the master target while batches are applied: the replica converges.
    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        assert_eq!(
            push(&mut c, batches[30..40].to_vec())
                .await
                .unwrap()
                .unwrap()
                .durable_seq,
            40
        );
    });
    mt.proc.as_mut().unwrap().kill9();
    qemu_check_vpc(&replica_path(&mt, &web));
    mt.start();
    assert_replica_matches(&ps, &mt, &web, 40, &model_at(&batches[..40]), tmp.path());

    // The process server passes the master target's applied acknowledgement on while the
    // agent's stream stays open with nothing more to send (the end of an initial sync waits
    // on it): the ack of the store itself comes before the master target has applied.
    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for b in &batches[40..] {
            tx.send(b.clone()).await.unwrap();
        }
        let mut acks = c
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let last = batches.len() as u64;
        let applied = tokio::time::timeout(WAIT, async {
            loop {
                let ack = acks.message().await.unwrap().expect("the stream is open");
                if ack.applied_seq >= last {
                    return ack;
                }
            }
        })
        .await
        .expect("no acknowledgement of the applied batches came on the open stream");
        assert_eq!(applied.durable_seq, last);
        drop(tx);
    });
    assert_replica_matches(&ps, &mt, &web, 45, &model, tmp.path());

    // The configuration server sees the disks' progress and the PS cache empties.
    wait_until("cache released", WAIT, || {
        http_get(&ps.metrics, "/metrics").is_ok_and(|m| {
            m.contains("lifeboat_ps_cache_bytes ")
                && !m.contains("lifeboat_ps_ingest_bytes_total 0")
        })
    });

    // A restarted agent takes the disk's stream on its new connection: a batch of the old
    // process's stream that arrives afterwards (read late from its dead connection) is
    // refused, so it cannot take a seq the new process numbers its own batches with.
    let mut scratch = vec![0u8; DISK as usize];
    let late = make_batch(&mut rng, &web, 46, &mut scratch);
    runtime.block_on(async {
        let claim = take(&web, true);
        let mut old = client(&agent_dir, &ps.listen).await;
        old.resume(claim.clone()).await.unwrap();
        let mut new = client(&agent_dir, &ps.listen).await;
        assert_eq!(
            new.resume(claim).await.unwrap().into_inner().durable_seq,
            45
        );
        let err = push(&mut old, vec![late.clone()]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert_eq!(durable(&mut new, &web).await.0, 45);
        assert_eq!(
            push(&mut new, vec![late])
                .await
                .unwrap()
                .unwrap()
                .durable_seq,
            46
        );
    });
}

/// `b` as an initial-sync batch (the process server holds those in memory, not in its cache).
fn as_sync(mut b: ChangeBatch) -> ChangeBatch {
    b.kind = batch::KIND_SYNC.into();
    batch::seal(&mut b);
    b
}

/// Initial-sync batches skip the process server's cache: each is acknowledged only once the
/// master target has applied it, a kill -9 of the process server loses nothing acknowledged,
/// and held batches are cached when a workload write follows them or a new stream takes the
/// disk over.
#[test]
fn initial_sync_batches_are_acknowledged_once_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let img = tmp.path().join("web01.img");
    sparse_disk(&img, DISK);
    let disk = format!("disk0={}", img.display());
    Component::register(
        "mobility-agent",
        "web01",
        tmp.path(),
        &cs,
        &["--disk", &disk],
    );
    let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    ps.start();
    mt.start();
    for args in [
        &["policy", "create", "gold"][..],
        &["protect", "web01", "--policy", "gold"],
    ] {
        let out = lifeboat(&ctx, args);
        assert!(out.status.success(), "{}", text(&out));
    }
    let status = lifeboat_json(&ctx, &["status", "--json"]);
    let web = status["disks"][0]["disk_id"].as_str().unwrap().to_string();
    wait_until("replica created", WAIT, || replica_path(&mt, &web).exists());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let agent_dir = tmp.path().join("web01");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model = vec![0u8; DISK as usize];
    // 21 and 26 are workload writes made during the sync; the rest are the sync's reads.
    let batches: Vec<ChangeBatch> = (1..=31)
        .map(|s| make_batch(&mut rng, &web, s, &mut model))
        .map(|b| match b.seq {
            21 | 26 | 31 => b,
            _ => as_sync(b),
        })
        .collect();
    let held_total = || {
        let m = http_get(&ps.metrics, "/metrics").unwrap_or_default();
        m.lines()
            .find_map(|l| l.strip_prefix("lifeboat_ps_held_bytes_total "))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };

    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        wait_until_async(|| async { c.clone().resume(take(&web, false)).await.is_ok() }).await;
        // Every acknowledgement counts only what the master target has applied.
        let mut acks = c
            .push(tokio_stream::iter(batches[..10].to_vec()))
            .await
            .unwrap()
            .into_inner();
        while let Some(ack) = acks.message().await.unwrap() {
            assert!(ack.durable_seq <= ack.applied_seq, "{ack:?}");
        }
    });
    assert_replica_matches(&ps, &mt, &web, 10, &model_at(&batches[..10]), tmp.path());
    assert!(held_total() > 0.0, "the sync's batches were not held");

    // kill -9 of the process server while held batches flow: nothing acknowledged is lost.
    let acked = runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        let stream = tokio_stream::iter(batches[10..20].to_vec());
        let mut acks = c.push(stream).await.unwrap().into_inner();
        acks.message().await.unwrap().unwrap().durable_seq
    });
    ps.proc.as_mut().unwrap().kill9();
    ps.start();
    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        wait_until_async(|| async { c.clone().resume(take(&web, false)).await.is_ok() }).await;
        let (durable_after, applied) = durable(&mut c, &web).await;
        assert!(
            durable_after >= acked,
            "acknowledged {acked} lost: {durable_after}"
        );
        assert_eq!(
            durable_after, applied,
            "held batches are never cached by themselves"
        );
        push(&mut c, batches[durable_after as usize..20].to_vec())
            .await
            .unwrap();
    });
    assert_replica_matches(&ps, &mt, &web, 20, &model_at(&batches[..20]), tmp.path());

    runtime.block_on(async {
        let mut c = client(&agent_dir, &ps.listen).await;
        // A workload write after held batches: those not yet applied are cached with it, so
        // the write is acknowledged at once, durable in the cache.
        let ack = push(&mut c, batches[20..26].to_vec())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.durable_seq, 26);
        // A new stream takes the disk over while batches are held: they are cached, and the
        // new stream numbers on after them.
        push(&mut c, batches[26..30].to_vec()).await.unwrap();
        let mut new = client(&agent_dir, &ps.listen).await;
        let resumed = new.resume(take(&web, true)).await.unwrap().into_inner();
        assert_eq!(resumed.durable_seq, 30);
        let ack = push(&mut new, batches[30..].to_vec())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.durable_seq, 31);
    });
    assert_replica_matches(&ps, &mt, &web, 31, &model, tmp.path());

    // The master target fences apply streams as the process server fences agents' streams:
    // once a newer connection of the process server asked with `take_stream` (a restart),
    // what an older one still sends is refused, so it cannot take a seq the agent numbers on
    // with after that answer.
    let mut scratch = vec![0u8; DISK as usize];
    let late = make_batch(&mut rng, &web, 32, &mut scratch);
    runtime.block_on(async {
        let identity = Identity::load(&ps.dir).unwrap();
        let connect = || {
            ReplicaClient::new(
                tls::mtls_channel(&identity, &mt.listen, Role::MasterTarget).unwrap(),
            )
        };
        let (mut old, mut new) = (connect(), connect());
        old.status(take(&web, true)).await.unwrap();
        assert_eq!(
            new.status(take(&web, true))
                .await
                .unwrap()
                .into_inner()
                .applied_seq,
            31
        );
        let refused = async {
            let mut acks = old
                .apply(tokio_stream::iter(vec![late.clone()]))
                .await?
                .into_inner();
            while acks.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        };
        let err = refused.await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        let mut acks = new
            .apply(tokio_stream::iter(vec![late]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(acks.message().await.unwrap().unwrap().applied_seq, 32);
    });
}

fn take(disk: &str, take_stream: bool) -> ResumeRequest {
    ResumeRequest {
        disk_id: disk.into(),
        take_stream,
    }
}

/// The disk content after applying `batches` to zeros.
fn model_at(batches: &[ChangeBatch]) -> Vec<u8> {
    let mut model = vec![0u8; DISK as usize];
    for b in batches {
        for e in &b.extents {
            let o = e.offset as usize;
            if e.data.is_empty() {
                model[o..o + e.zero_length as usize].fill(0);
            } else {
                model[o..o + e.data.len()].copy_from_slice(&e.data);
            }
        }
    }
    model
}

async fn wait_until_async<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < WAIT, "timed out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
