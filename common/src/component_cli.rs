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
                &format!("start it with `{}`", run_command_after_register()),
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

/// The `run` command to give after `register`: this process's own command line with `run`
/// for `register` and without the flags only `register` takes, so the component runs with
/// the data directory, configuration and disks it registered with.
pub fn run_command_after_register() -> String {
    run_command_from(&std::env::args().collect::<Vec<_>>())
}

fn run_command_from(args: &[String]) -> String {
    // The flags only `register` takes (`RegisterArgs`), and whether each takes a value (as the
    // next argument or after `=`), as clap knows them.
    let register_only: Vec<(String, bool)> =
        <RegisterArgs as clap::Args>::augment_args(clap::Command::new("register"))
            .get_arguments()
            .filter_map(|a| {
                let long = a.get_long()?;
                Some((format!("--{long}"), a.get_action().takes_values()))
            })
            .collect();
    let mut out = vec![args.first().cloned().unwrap_or_default(), "run".to_string()];
    let mut rest = args.iter().skip(1).peekable();
    if rest.peek().is_some_and(|a| *a == "register") {
        rest.next();
    }
    while let Some(arg) = rest.next() {
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, _)) => (name, true),
            None => (arg.as_str(), false),
        };
        match register_only.iter().find(|(flag, _)| flag == name) {
            Some((_, takes_value)) => {
                if *takes_value && !inline_value {
                    rest.next();
                }
            }
            None => out.push(shell_word(arg)),
        }
    }
    out.join(" ")
}

/// `word` as a shell reads it back: single-quoted when it holds anything but plain characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::run_command_from;

    fn args(line: &[&str]) -> Vec<String> {
        line.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_run_command_keeps_what_run_needs_and_drops_what_only_register_takes() {
        let line = args(&[
            "./mobility-agent",
            "register",
            "--cs",
            "127.0.0.1:7443",
            "--passphrase-file=/tmp/pass",
            "--data-dir",
            "/tmp/my agent",
            "--name",
            "web01",
            "--disk",
            "disk0=/tmp/web01.img",
            "--force",
        ]);
        assert_eq!(
            run_command_from(&line),
            "./mobility-agent run --data-dir '/tmp/my agent' --disk disk0=/tmp/web01.img"
        );
        assert_eq!(
            run_command_from(&args(&[
                "process-server",
                "register",
                "--cs=a:1",
                "--keep-existing"
            ])),
            "process-server run"
        );
    }
}
