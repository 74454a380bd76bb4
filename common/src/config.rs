//! Loading a service's TOML configuration file. Each service has a serde struct with defaults;
//! command-line flags override what the file says.
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads `path` as TOML into `T`, or `T::default()` when no file is given.
pub fn load_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("config file {} is invalid: {e}", path.display()))
}

/// Reads a passphrase file, refusing an empty one.
pub fn read_passphrase_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read passphrase file {}: {e}", path.display()))?;
    let passphrase = text.trim().to_string();
    if passphrase.is_empty() {
        anyhow::bail!("passphrase file {} is empty", path.display());
    }
    Ok(passphrase)
}
