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
        let given = self.listen.or(file.listen);
        let listen = match given {
            Some(l) => l,
            None => defaults.listen.parse()?,
        };
        // A role whose default listen port is 0 does not serve (the agent): its listen
        // address is unused.
        let serves = defaults
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|d| d.port() != 0);
        let advertise = match self.advertise.clone().or(file.advertise.clone()) {
            Some(a) => a,
            None if serves && given.is_some_and(|l| l.port() == 0) => anyhow::bail!(
                "listen address {listen} has port 0, a port picked at random that others \
                 could not be told: give a fixed port (the configuration server hands this \
                 address to agents and process servers), or --advertise the address to reach"
            ),
            None => default_advertise(listen),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(listen: &str) -> CommonArgs {
        CommonArgs {
            config: None,
            data_dir: None,
            listen: Some(listen.parse().unwrap()),
            advertise: None,
            metrics_listen: None,
            log_format: None,
        }
    }

    const SERVER: RoleDefaults = RoleDefaults {
        data_dir: "/tmp/x",
        listen: "0.0.0.0:9443",
        metrics_listen: "0.0.0.0:9101",
    };
    const AGENT: RoleDefaults = RoleDefaults {
        data_dir: "/tmp/x",
        listen: "127.0.0.1:0",
        metrics_listen: "127.0.0.1:9103",
    };

    #[test]
    fn a_server_listening_on_port_0_must_say_where_it_is_reached() {
        let file = CommonFileConfig::default();
        let e = args("127.0.0.1:0").resolve(&file, &SERVER).unwrap_err();
        assert!(e.to_string().contains("fixed port"), "{e}");
        let mut advertised = args("127.0.0.1:0");
        advertised.advertise = Some("ps1.example:9443".into());
        assert_eq!(
            advertised.resolve(&file, &SERVER).unwrap().advertise,
            "ps1.example:9443"
        );
        let s = args("0.0.0.0:9555").resolve(&file, &SERVER).unwrap();
        assert_eq!(s.advertise, "127.0.0.1:9555");
        // The agent serves nothing on its listen address.
        assert!(args("127.0.0.1:0").resolve(&file, &AGENT).is_ok());
    }
}
