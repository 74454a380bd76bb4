//! The command line every server component shares: `register` (with the passphrase) and `run`.
//! A component supplies its settings type; this module does the rest, so the process server
//! and master target binaries are a few lines each.
use crate::component::{register_command, RegisterArgs};
use crate::service_args::{CommonArgs, CommonSettings};
use crate::{shutdown, telemetry, Role};
use lifeboat_proto::v1;
use std::future::Future;
use tokio_util::sync::CancellationToken;

/// What a component's settings must offer to be driven by `run_cli`.
pub trait ComponentSettings: Sized {
    const ROLE: Role;
    /// The role's own flags of `register` and `run` (`NoFlags` if none).
    type Flags: clap::Args;
    fn resolve(args: &CommonArgs, flags: &Self::Flags) -> anyhow::Result<Self>;
    /// Creates the directories the component writes.
    fn prepare(&self) -> anyhow::Result<()>;
    fn facts(&self) -> v1::ComponentFacts;
    fn common(&self) -> &CommonSettings;
}

/// A role without flags of its own.
#[derive(Debug, Default, clap::Args)]
pub struct NoFlags {}

#[derive(Debug, clap::Subcommand)]
pub enum ComponentCommand<F: clap::Args> {
    /// Register with a configuration server using the connection passphrase.
    Register {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        flags: F,
        #[command(flatten)]
        register: RegisterArgs,
    },
    /// Serve.
    Run {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        flags: F,
    },
}

/// Carries out `command` for a component whose settings are `S` and whose service is `run`.
pub async fn run_cli<S, F, Fut>(command: ComponentCommand<S::Flags>, run: F) -> anyhow::Result<()>
where
    S: ComponentSettings,
    F: FnOnce(S, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    match command {
        ComponentCommand::Register {
            common,
            flags,
            register,
        } => {
            let settings = S::resolve(&common, &flags)?;
            settings.prepare()?;
            let registered = register_command(
                S::ROLE,
                &register,
                &settings.common().data_dir,
                settings.facts(),
            )
            .await?;
            registered.report(
                &S::ROLE.to_string(),
                &format!("start it with `{} run`", S::ROLE),
            );
            Ok(())
        }
        ComponentCommand::Run { common, flags } => {
            let settings = S::resolve(&common, &flags)?;
            telemetry::init_logging(settings.common().log_format);
            telemetry::init_metrics(settings.common().metrics_listen)?;
            run(settings, shutdown::on_signal()).await
        }
    }
}
