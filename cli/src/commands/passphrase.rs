//! `lifeboat passphrase show|regenerate`.
use crate::context::{status_error, ContextArgs};
use lifeboat_proto::v1::Empty;
use std::io::{IsTerminal, Write};

#[derive(Debug, clap::Subcommand)]
pub enum PassphraseCommand {
    /// Print the current connection passphrase.
    Show,
    /// Make a new passphrase. Every process server, master target and agent identity issued
    /// under the old one is revoked: those components must register again.
    Regenerate {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

pub async fn run(ctx: &ContextArgs, command: PassphraseCommand) -> anyhow::Result<()> {
    match command {
        PassphraseCommand::Show => {
            let mut admin = ctx.admin().await?;
            let p = admin
                .show_passphrase(Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", p.passphrase);
            eprintln!("(generation {})", p.generation);
        }
        PassphraseCommand::Regenerate { yes } => {
            if !yes {
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(
                        "regenerating revokes every component identity: pass --yes to confirm"
                    );
                }
                print!("Every process server, master target and agent must register again. Continue? [y/N] ");
                std::io::stdout().flush()?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    anyhow::bail!("cancelled; nothing changed");
                }
            }
            let mut admin = ctx.admin().await?;
            let p = admin
                .regenerate_passphrase(Empty {})
                .await
                .map_err(status_error)?
                .into_inner();
            println!("New connection passphrase (generation {}):", p.generation);
            println!();
            println!("    {}", p.passphrase);
            println!();
            println!("{} component identities were revoked. Register each again with the new passphrase,", p.revoked_identities);
            println!(
                "e.g. `process-server register --force --cs HOST:PORT --passphrase-file FILE [--data-dir DIR]`"
            );
            println!("(each keeps its name and data; then restart it).");
        }
    }
    Ok(())
}
