//! Where the CLI finds the cluster and its admin identity: a small TOML context file written by
//! `lifeboat up` (or made by `config-server init` in DATA/admin/context.toml), and connecting to
//! the cluster with it — preferring the leader, whose view of liveness is the freshest.
use anyhow::Context as _;
use lifeboat_common::{tls, Identity, Role};
use lifeboat_config_server::init::CliContext;
use lifeboat_proto::v1::{
    admin_client::AdminClient, protection_client::ProtectionClient,
    recovery_client::RecoveryClient, Empty,
};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

/// Global options of every admin command.
#[derive(Debug, Clone, clap::Args)]
pub struct ContextArgs {
    /// Context file (CS addresses and admin identity).
    /// Default: $XDG_CONFIG_HOME/lifeboat/context.toml or ~/.config/lifeboat/context.toml
    #[arg(long, global = true, env = "LIFEBOAT_CONTEXT")]
    pub context: Option<PathBuf>,
    /// Configuration server address(es), overriding the context's.
    #[arg(long = "cs", global = true, value_delimiter = ',')]
    pub cs: Vec<String>,
}

/// The default context file path.
pub fn default_path() -> PathBuf {
    config_base(
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
    .join("lifeboat")
    .join("context.toml")
}

/// The directory for user configuration. As the XDG base directory specification says, an
/// XDG_CONFIG_HOME that is empty or relative is ignored: a relative one would put the context
/// wherever the CLI happens to run, and `lifeboat up` in one directory would not be found by
/// `lifeboat status` in another.
fn config_base(xdg_config_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let absolute =
        |value: Option<OsString>| value.map(PathBuf::from).filter(|path| path.is_absolute());
    absolute(xdg_config_home)
        .or_else(|| absolute(home).map(|home| home.join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
}

impl ContextArgs {
    pub fn path(&self) -> PathBuf {
        self.context.clone().unwrap_or_else(default_path)
    }

    pub fn load(&self) -> anyhow::Result<CliContext> {
        let path = self.path();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no Lifeboat context at {}: run `lifeboat up`, or set LIFEBOAT_CONTEXT to DATA/admin/context.toml made by `config-server init`",
                path.display()
            )
        })?;
        let mut context: CliContext = toml::from_str(&text)
            .with_context(|| format!("context file {} is invalid", path.display()))?;
        if !self.cs.is_empty() {
            context.cs = self.cs.clone();
        }
        // A relative identity_dir is the context file's neighbour, wherever the CLI runs.
        if context.identity_dir.is_relative() {
            if let Some(dir) = path.parent() {
                context.identity_dir = dir.join(&context.identity_dir);
            }
        }
        Ok(context)
    }

    /// The admin identity the context names.
    fn identity(&self, context: &CliContext) -> anyhow::Result<Identity> {
        Identity::load(&context.identity_dir).map_err(|e| match e {
            lifeboat_common::identity::IdentityError::Missing(dir) => anyhow::anyhow!(
                "no admin identity in {} (identity_dir of {}): point identity_dir at the \
                 folder holding identity/ (DATA/admin of the first configuration server node)",
                dir.display(),
                self.path().display()
            ),
            other => other.into(),
        })
    }

    /// A Protection client on the same connection rules as `admin`.
    pub async fn protection(&self) -> anyhow::Result<ProtectionClient<Channel>> {
        let channel = self.leader_channel().await?;
        Ok(ProtectionClient::new(channel))
    }

    /// Recovery and Protection clients (jobs are followed through the latter).
    pub async fn recovery(
        &self,
    ) -> anyhow::Result<(RecoveryClient<Channel>, ProtectionClient<Channel>)> {
        let channel = self.leader_channel().await?;
        Ok((
            RecoveryClient::new(channel.clone()),
            ProtectionClient::new(channel),
        ))
    }

    /// An admin client connected to the leader if it can be reached, else any node.
    pub async fn admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::new(self.leader_channel().await?))
    }

    /// A channel to the leader if it can be reached, else to any node.
    async fn leader_channel(&self) -> anyhow::Result<Channel> {
        let context = self.load()?;
        let identity = self.identity(&context)?;
        let (address, channel) =
            tls::mtls_connect_any(&identity, &context.cs, Role::ConfigServer).await?;
        let mut client = AdminClient::new(channel.clone());
        if let Ok(status) = client.cluster_status(Empty {}).await {
            let leader = status.into_inner().leader_address;
            if !leader.is_empty() && leader != address {
                if let Ok((_, channel)) =
                    tls::mtls_connect_any(&identity, &[leader], Role::ConfigServer).await
                {
                    return Ok(channel);
                }
            }
        }
        Ok(channel)
    }
}

/// Writes a context file (mode 0600: it points at an admin key).
pub fn save(path: &Path, context: &CliContext) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    lifeboat_common::fsutil::write_private(path, toml::to_string(context)?.as_bytes())?;
    Ok(())
}

/// Turns a gRPC error into a one-line message: the server's words, and the code for scripts.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    // tonic reports its own call deadline as Cancelled "Timeout expired": say what it means.
    let timed_out = status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Cancelled && status.message().contains("Timeout expired"));
    if timed_out {
        return anyhow::anyhow!(
            "no answer from the configuration server within {} s, so whether a change was made \
             is unknown; a change needs a majority of the cluster's nodes: `lifeboat cluster \
             status --cs HOST:PORT` asks one node at a time ({:?})",
            lifeboat_common::tls::CALL_TIMEOUT.as_secs(),
            status.code()
        );
    }
    anyhow::anyhow!("{} ({:?})", status.message(), status.code())
}

#[cfg(test)]
mod tests {
    use super::config_base;
    use std::path::PathBuf;

    #[test]
    fn an_empty_or_relative_xdg_config_home_is_ignored() {
        let home = Some("/home/op".into());
        for ignored in ["", "relative/dir"] {
            assert_eq!(
                config_base(Some(ignored.into()), home.clone()),
                PathBuf::from("/home/op/.config"),
                "XDG_CONFIG_HOME={ignored:?}"
            );
        }
        assert_eq!(
            config_base(Some("/etc/xdg-op".into()), home),
            PathBuf::from("/etc/xdg-op")
        );
        assert_eq!(config_base(None, None), PathBuf::from("."));
    }
}
