//! `lifeboat demo`: Lifeboat on one host, end to end, in one command. It starts the stack (as
//! `lifeboat up`, on free ports, in its own data directory and CLI context), creates a disk
//! image, protects it through an agent in nbd mode, runs a writer through the agent's NBD
//! export while showing live replication status, then waits for the replica to catch up,
//! compares it byte for byte with the source, and stops everything.
mod nbd_client;

use crate::commands::jobs;
use crate::commands::wait::Freshness;
use crate::context::{status_error, ContextArgs};
use crate::format::bytes;
use crate::up::{wait_for_servers, Stack, UpArgs};
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use lifeboat_common::component::register_command;
use lifeboat_common::service_args::CommonSettings;
use lifeboat_common::telemetry::LogFormat;
use lifeboat_common::Role;
use lifeboat_mobility_agent::{DiskConfig, Settings as AgentSettings};
use lifeboat_proto::v1::{self, ProtectRequest, StatusRequest};
use nbd_client::NbdClient;
use rand::{Rng, RngCore};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MACHINE: &str = "demo01";
const POLICY: &str = "demo";
const BLOCK: usize = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its stack, disk image and CLI context.
    #[arg(long, default_value = "./lifeboat-demo")]
    data_dir: PathBuf,
    /// Size of the demo disk in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// How long the writer runs, in seconds.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Writer rate in MiB/s of random 64 KiB writes.
    #[arg(long, default_value_t = 20)]
    rate_mib: u64,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The demo's addresses: free ports chosen on the first run and kept, because the cluster
/// and the registered components remember them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ports {
    cs: SocketAddr,
    ps: SocketAddr,
    mt: SocketAddr,
    metrics: SocketAddr,
    nbd: SocketAddr,
    /// Master target's NBD views (added later: older demo directories lack it).
    #[serde(default)]
    mt_nbd: Option<SocketAddr>,
}

impl Ports {
    fn load_or_choose(data_dir: &Path) -> anyhow::Result<Ports> {
        let path = data_dir.join("ports.toml");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return toml::from_str(&text).with_context(|| format!("{} is invalid", path.display()));
        }
        let ports = Ports {
            cs: free_addr()?,
            ps: free_addr()?,
            mt: free_addr()?,
            metrics: free_addr()?,
            nbd: free_addr()?,
            mt_nbd: Some(free_addr()?),
        };
        lifeboat_common::fsutil::durable_write(&path, toml::to_string(&ports)?.as_bytes(), 0o644)?;
        Ok(ports)
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    lifeboat_common::fsutil::create_private_dir(&args.data_dir)?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let context_file = data_dir.join("context.toml");
    let ctx = ContextArgs {
        context: Some(context_file.clone()),
        cs: Vec::new(),
    };
    let ports = Ports::load_or_choose(&data_dir)?;
    let up = UpArgs {
        data_dir: data_dir.join("stack"),
        cs_listen: ports.cs,
        ps_listen: ports.ps,
        ps_cache_quota_mib: 0,
        mt_listen: ports.mt,
        mt_nbd_listen: match ports.mt_nbd {
            Some(a) => a.to_string(),
            None => free_addr()?.to_string(),
        },
        metrics_listen: ports.metrics,
        log_format: LogFormat::Text,
        heartbeat_interval_secs: 1,
    };
    // Logs would drown the live display; the demo prints what matters.
    lifeboat_common::telemetry::init_metrics(up.metrics_listen)?;
    println!(
        "Starting a configuration server, process server and master target in {} …",
        up.data_dir.display()
    );
    let stack = Stack::start(&up, &ctx, lifeboat_common::shutdown::on_signal()).await?;
    let outcome = demonstrate(&args, &data_dir, &ctx, &stack, ports.nbd).await;
    println!("Stopping …");
    let stopped = stack.stop().await;
    outcome.and(stopped)?;
    println!(
        "Done. Everything the demo made is in {}; delete it when you like.\n\
         Next: `lifeboat up` runs the same stack on this host until you stop it, for your own \
         machines (docs/install.md). While a demo runs, \
         `LIFEBOAT_CONTEXT={} lifeboat status` looks at it from another terminal.",
        data_dir.display(),
        context_file.display()
    );
    Ok(())
}

async fn demonstrate(
    args: &DemoArgs,
    data_dir: &Path,
    ctx: &ContextArgs,
    stack: &Stack,
    nbd: SocketAddr,
) -> anyhow::Result<()> {
    // The protected machine's disk, with some data already on it.
    let disk = data_dir.join("disk0.img");
    let size = args.size_mib.max(16) << 20;
    if !disk.exists() {
        let file = std::fs::File::create(&disk)?;
        file.set_len(size)?;
        let mut block = vec![0u8; 1 << 20];
        rand::rng().fill_bytes(&mut block);
        for mib in 0..8u64 {
            file.write_all_at(&block, mib << 20)?;
        }
    }
    let size = std::fs::metadata(&disk)?.len();
    let agent = AgentSettings {
        common: CommonSettings {
            data_dir: data_dir.join("agent"),
            listen: "127.0.0.1:0".parse()?,
            advertise: String::new(),
            metrics_listen: "127.0.0.1:0".parse()?,
            log_format: LogFormat::Text,
        },
        disks: vec![DiskConfig {
            name: "disk0".into(),
            path: disk.clone(),
            mode: Default::default(),
        }],
        nbd_listen: nbd,
        tuning: Default::default(),
    };
    agent.prepare()?;
    let register = lifeboat_common::component::RegisterArgs {
        cs: vec![stack.cs_address.clone()],
        passphrase_file: stack.passphrase_file.clone(),
        name: Some(MACHINE.into()),
        force: true,
        keep_existing: false,
    };
    if !lifeboat_common::Identity::exists(&agent.common.data_dir) {
        println!(
            "Registering machine {MACHINE} (disk {}, {}) with the passphrase …",
            disk.display(),
            bytes(size)
        );
        register_command(
            Role::Agent,
            &register,
            &agent.common.data_dir,
            agent.facts(),
        )
        .await?;
    }
    let agent_task = tokio::spawn(lifeboat_mobility_agent::run(
        agent,
        stack.cancel.child_token(),
    ));

    let mut client = ctx.protection().await?;
    let policy = v1::PolicySpec {
        name: POLICY.into(),
        rpo_threshold_secs: 30,
        retention_secs: 3600,
        app_consistent_every_secs: 0,
        crash_consistent_every_secs: 300,
        compression: true,
    };
    if let Err(status) = client.create_policy(policy).await {
        if status.code() != tonic::Code::FailedPrecondition {
            return Err(status_error(status));
        }
    }
    wait_for_agent(ctx).await?;
    let job = client
        .protect(ProtectRequest {
            machine: MACHINE.into(),
            policy: POLICY.into(),
            ..Default::default()
        })
        .await;
    match job {
        Ok(job) => {
            println!("Protecting {MACHINE}: initial sync of the allocated data …");
            jobs::watch(&mut client, Some(vec![job.into_inner().id])).await?;
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            println!("{MACHINE} is already protected.")
        }
        Err(status) => return Err(status_error(status)),
    }

    println!(
        "Writing {} MiB/s of random 64 KiB blocks through nbd://{nbd}/disk0 for {} s:",
        args.rate_mib, args.seconds
    );
    let written = write_load(&nbd.to_string(), args, &mut client).await?;
    println!(
        "Wrote {}. Waiting for the replica to catch up …",
        bytes(written)
    );
    let disk_id = wait_caught_up(&mut client).await?;

    let replica = stack
        .mt_data_dir
        .join("replicas")
        .join(&disk_id)
        .join("disk.vhd");
    let compared = tokio::task::spawn_blocking(move || compare(&disk, &replica)).await??;
    println!(
        "Replica is identical to the source ({} compared byte for byte).",
        bytes(compared)
    );
    agent_task.abort();
    Ok(())
}

/// Writes random blocks at the requested rate, showing replication status every second.
async fn write_load(
    nbd: &str,
    args: &DemoArgs,
    client: &mut lifeboat_proto::v1::protection_client::ProtectionClient<tonic::transport::Channel>,
) -> anyhow::Result<u64> {
    let mut writer = NbdClient::connect(nbd, "disk0").await?;
    let blocks = (writer.size / BLOCK as u64).max(1);
    let per_sec = (args.rate_mib << 20) / BLOCK as u64;
    let bar = ProgressBar::new(args.seconds);
    bar.set_style(
        ProgressStyle::with_template("  [{bar:30}] {pos}/{len} s  {msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut written = 0u64;
    let mut data = vec![0u8; BLOCK];
    let mut rng = rand::rng();
    let mut next_status = Instant::now();
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let second = Instant::now();
        for _ in 0..per_sec.max(1) {
            rng.fill_bytes(&mut data);
            let offset = rng.random_range(0..blocks) * BLOCK as u64;
            writer.write(offset, &data).await?;
            written += BLOCK as u64;
            if second.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        if next_status <= Instant::now() {
            next_status = Instant::now() + Duration::from_secs(1);
            if let Ok(s) = client
                .status(StatusRequest {
                    machine: MACHINE.into(),
                    ..Default::default()
                })
                .await
            {
                if let Some(d) = s
                    .into_inner()
                    .machines
                    .first()
                    .and_then(|m| m.disks.first())
                {
                    let line = format!(
                        "{}  RPO {} s  pending {}  written {}",
                        d.state,
                        crate::format::rpo(d.rpo_secs, d.pending_bytes),
                        bytes(d.pending_bytes),
                        bytes(written)
                    );
                    if bar.is_hidden() {
                        println!("  {line}");
                    }
                    bar.set_message(line);
                }
            }
        }
        bar.set_position(started.elapsed().as_secs().min(args.seconds));
        if let Some(rest) = Duration::from_secs(1).checked_sub(second.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    writer.flush().await?;
    writer.disconnect().await?;
    bar.finish();
    Ok(written)
}

/// Waits until the demo machine's agent has heartbeated its disks: it cannot be protected
/// before (the stack's process server and master target are connected once it has started).
async fn wait_for_agent(ctx: &ContextArgs) -> anyhow::Result<()> {
    let mut admin = ctx.admin().await?;
    wait_for_servers(&mut admin, Duration::from_secs(60), |servers| {
        let reported = servers.iter().any(|s| {
            s.name == MACHINE
                && s.connected
                && s.facts.as_ref().is_some_and(|f| !f.disks.is_empty())
        });
        Ok(if reported {
            Vec::new()
        } else {
            vec![format!("the agent of {MACHINE}")]
        })
    })
    .await
}

/// Waits until the disk is Protected with nothing pending; returns its id.
async fn wait_caught_up(
    client: &mut lifeboat_proto::v1::protection_client::ProtectionClient<tonic::transport::Channel>,
) -> anyhow::Result<String> {
    let started = Instant::now();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    // Judged as `lifeboat wait --caught-up` judges it: on a report made after `since`.
    let mut freshness = Freshness::Before(since);
    loop {
        let s = client
            .status(StatusRequest {
                machine: MACHINE.into(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        if let Some(d) = s.machines.first().and_then(|m| m.disks.first()) {
            freshness = freshness.advance(d.last_report_unix_ms);
            let fresh = matches!(freshness, Freshness::Fresh);
            if fresh && d.state == "Protected" && d.pending_bytes == 0 && d.rpo_secs == 0.0 {
                return Ok(d.disk_id.clone());
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("the replica did not catch up within 120 s; see `lifeboat status`");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Compares the source image with the replica VHD; returns the bytes compared.
fn compare(source: &Path, replica: &Path) -> anyhow::Result<u64> {
    let src = std::fs::File::open(source)?;
    let image =
        vhd::Image::open(replica).with_context(|| format!("open replica {}", replica.display()))?;
    let size = src.metadata()?.len();
    if image.size() < size {
        anyhow::bail!("replica is {} bytes, the source {size}", image.size());
    }
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        let n = ((size - offset) as usize).min(a.len());
        src.read_exact_at(&mut a[..n], offset)?;
        image.read_at(&mut b[..n], offset)?;
        if a[..n] != b[..n] {
            anyhow::bail!("replica differs from the source in the MiB at offset {offset}");
        }
        offset += n as u64;
    }
    Ok(size)
}
