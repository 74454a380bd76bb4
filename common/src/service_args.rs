//! Command-line and file settings every component service shares (process server, master
//! target, agent): where its data lives, where it listens, where metrics go, how it logs.
use crate::telemetry::LogFormat;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Fields of a component's `--config` TOML file common to all roles.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct CommonFileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
}

/// Flags of a component's `run` and `register` commands; they override the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// TOML configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory (identity, and the component's own state).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address (process server and master target).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address others use to reach this component (default: the listen address, with
    /// 127.0.0.1 for an unspecified IP).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The address others reach a service at when none is configured: the listen address, with
/// 127.0.0.1 in place of an unspecified IP (0.0.0.0 cannot be dialled).
pub fn default_advertise(listen: SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        format!("127.0.0.1:{}", listen.port())
    } else {
        listen.to_string()
    }
}

/// Resolved common settings.
#[derive(Debug, Clone)]
pub struct CommonSettings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    pub metrics_listen: SocketAddr,
    pub log_format: LogFormat,
}

/// Defaults of one role.
pub struct RoleDefaults {
    pub data_dir: &'static str,
    pub listen: &'static str,
    pub metrics_listen: &'static str,
}

impl CommonArgs {
    pub fn resolve(
        &self,
        file: &CommonFileConfig,
        defaults: &RoleDefaults,
    ) -> anyhow::Result<CommonSettings> {
        let listen = match self.listen.or(file.listen) {
            Some(l) => l,
            None => defaults.listen.parse()?,
        };
        let advertise = self
            .advertise
            .clone()
            .or(file.advertise.clone())
            .unwrap_or_else(|| default_advertise(listen));
        Ok(CommonSettings {
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir.clone())
                .unwrap_or_else(|| PathBuf::from(defaults.data_dir)),
            listen,
            advertise,
            metrics_listen: match self.metrics_listen.or(file.metrics_listen) {
                Some(m) => m,
                None => defaults.metrics_listen.parse()?,
            },
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}
