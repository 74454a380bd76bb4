//! Component roles: the name a role has in certificates, logs and the CLI, and its wire form.
use lifeboat_proto::v1;
use std::fmt;
use std::str::FromStr;

/// What a registered identity is allowed to do. Fixed in its certificate at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ConfigServer,
    ProcessServer,
    MasterTarget,
    Agent,
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::ConfigServer,
        Role::ProcessServer,
        Role::MasterTarget,
        Role::Agent,
        Role::Admin,
    ];

    /// Short stable name, used as the certificate's organizational unit and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ConfigServer => "config-server",
            Role::ProcessServer => "process-server",
            Role::MasterTarget => "master-target",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    /// The role in words, as messages and alert subjects name it ("process server ps1").
    pub fn noun(self) -> &'static str {
        match self {
            Role::ConfigServer => "configuration server",
            Role::ProcessServer => "process server",
            Role::MasterTarget => "master target",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    /// DNS name every server certificate of this role carries; clients verify it instead of a
    /// host name, so a component can be reached by any address it is given.
    pub fn server_name(self) -> &'static str {
        match self {
            Role::ConfigServer => "config-server.lifeboat.internal",
            Role::ProcessServer => "process-server.lifeboat.internal",
            Role::MasterTarget => "master-target.lifeboat.internal",
            Role::Agent => "agent.lifeboat.internal",
            Role::Admin => "admin.lifeboat.internal",
        }
    }

    /// Identities of these roles are issued under the connection passphrase and are revoked
    /// when it is regenerated (configuration servers and admins stay valid).
    pub fn bound_to_passphrase(self) -> bool {
        matches!(self, Role::ProcessServer | Role::MasterTarget | Role::Agent)
    }

    pub fn to_proto(self) -> v1::Role {
        match self {
            Role::ConfigServer => v1::Role::ConfigServer,
            Role::ProcessServer => v1::Role::ProcessServer,
            Role::MasterTarget => v1::Role::MasterTarget,
            Role::Agent => v1::Role::Agent,
            Role::Admin => v1::Role::Admin,
        }
    }

    /// `None` for `ROLE_UNSPECIFIED` or an unknown number.
    pub fn from_proto(value: i32) -> Option<Role> {
        match v1::Role::try_from(value).ok()? {
            v1::Role::Unspecified => None,
            v1::Role::ConfigServer => Some(Role::ConfigServer),
            v1::Role::ProcessServer => Some(Role::ProcessServer),
            v1::Role::MasterTarget => Some(Role::MasterTarget),
            v1::Role::Agent => Some(Role::Agent),
            v1::Role::Admin => Some(Role::Admin),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}: expected config-server, process-server, master-target, agent or admin")
            })
    }
}
