//! Configuration of a configuration server node: the TOML file (`--config`), overridden by
//! command-line flags, resolved into the settings the node runs with.
use lifeboat_common::telemetry::LogFormat;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
pub const DEFAULT_METRICS: &str = "0.0.0.0:9100";
pub const DEFAULT_HEARTBEAT_SECS: u32 = 5;

/// The `--config` file. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub heartbeat_interval_secs: Option<u32>,
    pub log_format: Option<LogFormat>,
}

/// Flags shared by `init`, `run` and `join`; each overrides the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LIFEBOAT_CS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (Raft log and state, identity, passphrase). Default: /var/lib/lifeboat/config-server
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address. Default: 0.0.0.0:8443
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Address other nodes and components use to reach this node (host:port).
    /// Default: the listen address, with 127.0.0.1 for an unspecified IP.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Prometheus metrics listen address. Default: 0.0.0.0:9100
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds between component heartbeats. Default: 5
    #[arg(long)]
    pub heartbeat_interval_secs: Option<u32>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub advertise: String,
    pub metrics_listen: SocketAddr,
    pub heartbeat_interval_secs: u32,
    pub log_format: LogFormat,
}

impl ServeArgs {
    pub fn resolve(&self) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(self.config.as_deref())?;
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let advertise = self
            .advertise
            .clone()
            .or(file.advertise)
            .unwrap_or_else(|| lifeboat_common::service_args::default_advertise(listen));
        let heartbeat_interval_secs = self
            .heartbeat_interval_secs
            .or(file.heartbeat_interval_secs)
            .unwrap_or(DEFAULT_HEARTBEAT_SECS);
        if heartbeat_interval_secs == 0 || heartbeat_interval_secs > 300 {
            anyhow::bail!("heartbeat interval must be 1-300 seconds");
        }
        Ok(Settings {
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/lifeboat/config-server")),
            listen,
            advertise,
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or_else(|| DEFAULT_METRICS.parse().expect("valid default")),
            heartbeat_interval_secs,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/cs\"\nlisten = \"0.0.0.0:7000\"\nheartbeat_interval_secs = 2\nlog_format = \"json\"\n",
        )
        .unwrap();
        let path = file.display().to_string();
        let cli = Cli::parse_from(["x", "--config", &path, "--listen", "127.0.0.1:7100"]);
        let s = cli.serve.resolve().unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/srv/cs"));
        assert_eq!(s.listen.to_string(), "127.0.0.1:7100");
        assert_eq!(s.advertise, "127.0.0.1:7100");
        assert_eq!(s.heartbeat_interval_secs, 2);
        assert_eq!(s.log_format, LogFormat::Json);
        assert_eq!(s.metrics_listen.to_string(), DEFAULT_METRICS);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cs.toml");
        std::fs::write(&file, "listen = \"nonsense\"\n").unwrap();
        let path = file.display().to_string();
        let err = Cli::parse_from(["x", "--config", &path])
            .serve
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("is invalid"), "{err}");
        std::fs::write(&file, "unknown_key = 1\n").unwrap();
        assert!(Cli::parse_from(["x", "--config", &path])
            .serve
            .resolve()
            .is_err());
        let missing = Cli::parse_from(["x", "--config", "/nonexistent.toml"])
            .serve
            .resolve()
            .unwrap_err();
        assert!(missing.to_string().contains("cannot read config file"));
        std::fs::write(&file, "heartbeat_interval_secs = 0\n").unwrap();
        assert!(Cli::parse_from(["x", "--config", &path])
            .serve
            .resolve()
            .is_err());
    }
}
